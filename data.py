"""Data: MVTec AD / MVTec LOCO with the MVTec Caption prompts, the few-shot split and mask sampling
(paper §3 for MVTec Caption, §5 for the protocol); the toy world in the same layout is toy.py.

What this file holds, in reading order:
  Anomaly, Category, load_category   one category folder, validated up front, errors in one line
  load_generated                     generated anomalies: sample.py's folder or AnomalyDiffusion's layout
  few_shot_split                     the first third of each defect type trains the generator (§5)
  validation_split                   a folder of the few-shot anomalies alone, to choose a recipe on
  read_image, read_mask              tensors: images [3, S, S] in [0, 1], masks [1, S, S] in {0, 1}
  perlin_mask, JITTER, sample_mask   masks to generate at: DRAEM's Perlin blobs or jittered real masks
  shifted, mask_centre, mixed_mask   new masks of a defect type: two of its examples mixed by the mask autoencoder
  save_grid, main                    preview grids; `python data.py --category cable --out DIR`
Depends on torch, numpy and pillow; main() on toy.py.
"""
import argparse
import math
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import toy

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
MVTEC_AD_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
MVTEC_CAPTION_URL = "https://github.com/hujiecpp/MVTec-Caption"

# ----------------------------------------------------------------------------------------------
# Loading one category. MVTec AD: ground_truth/<defect>/NNN_mask.png. MVTec LOCO: one PNG per region
# in ground_truth/<defect>/NNN/, or MVTec Caption's merged ground_truth_merge_mask/<defect>_merge_mask/NNN.png.


@dataclass(frozen=True)
class Anomaly:
    image: Path                    # test/<defect>/NNN.png
    mask_files: tuple[Path, ...]   # AD: (NNN_mask.png,); LOCO: one PNG per region, or the merged mask
    caption: str                   # prompt/<defect>/NNN.txt, UTF-8, stripped
    defect: str


@dataclass
class Category:
    name: str
    folder: Path
    train_good: list[Path]         # sorted
    test_good: list[Path]          # sorted
    anomalies: list[Anomaly]       # sorted by (defect, file name)
    validation_good: list[Path] = field(default_factory=list)   # MVTec LOCO only

    @property
    def defects(self) -> list[str]:
        return sorted({a.defect for a in self.anomalies})

    def anomalies_of(self, defect):
        """The anomalies of one defect type; an unknown name is the user's typo, so say which exist."""
        if defect not in self.defects:
            raise ValueError(f"{self.folder}: unknown defect type {defect!r}; this category has: "
                             f"{', '.join(self.defects) or 'none'}")
        return [a for a in self.anomalies if a.defect == defect]


def _images_in(folder, what=None):
    """Sorted image files of a folder (at least one if `what` names them); any other file is an error:
    nothing is skipped silently."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTS:
            raise ValueError(f"{p}: unexpected file in an image folder (expected {', '.join(IMAGE_EXTS)})")
    if not files and what:
        raise ValueError(f"{folder}: empty folder, expected {what} (*.png)")
    return files


def _decoded_size(path):
    """(width, height) after a full decode: a truncated or corrupt file fails here, not mid-training."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _mask_files(folder, defect, stem):
    """The mask file(s) of test/<defect>/<stem>.*: the merged LOCO mask if present, else the AD or LOCO ground truth."""
    merged = folder / "ground_truth_merge_mask" / f"{defect}_merge_mask" / f"{stem}.png"
    if merged.is_file():
        return (merged,)
    ad, loco = folder / "ground_truth" / defect / f"{stem}_mask.png", folder / "ground_truth" / defect / stem
    if ad.is_file():
        return (ad,)
    if loco.is_dir():
        return tuple(_images_in(loco, "one PNG per defect region: 000.png, 001.png, ..."))
    raise FileNotFoundError(f"{folder / 'test' / defect / stem}.*: no mask; missing {ad} (MVTec AD) "
                            f"or {loco}/ (MVTec LOCO)")


def _no_orphans(folder, stems, kind, test_folder):
    """A caption or mask whose image is missing: the prompts or masks belong to another version of the data."""
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        stem = p.name.removesuffix("_mask.png").removesuffix(".txt").removesuffix(".png")
        if stem not in stems and not p.name.startswith("."):
            raise ValueError(f"{p}: {kind} without an image (no {test_folder / stem}.png)")


def _read_caption(path, image):
    if not path.is_file():
        raise FileNotFoundError(f"{image}: no caption (missing {path})")
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: caption is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not caption:
        raise ValueError(f"{path}: empty caption")
    return caption


def _anomaly(image, masks, caption, defect):
    """One anomalous image with its mask file(s), each the same size as the image."""
    size = _decoded_size(image)
    for m in masks:
        if (msize := _decoded_size(m)) != size:
            raise ValueError(f"{image} is {size[0]}x{size[1]} but its mask {m} is {msize[0]}x{msize[1]}")
    return Anomaly(image, masks, caption, defect)


def load_category(folder):
    """Read and validate a whole MVTec AD / LOCO (+ MVTec Caption) category folder; a problem is one line
    naming the file (or missing file) and what is wrong with it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: a file, not a category folder (the MVTec layout: <category>/train/good/, "
                         f"<category>/test/, ...)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: MVTec category folder not found; download MVTec AD from {MVTEC_AD_URL} "
                                f"and the MVTec Caption prompts from {MVTEC_CAPTION_URL}, or pass --toy")
    for sub in ("train/good", "test"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{folder / sub}: missing folder; {folder} is not in the MVTec layout")
    train_good = _images_in(folder / "train" / "good", "the normal training images")
    optional = lambda sub: _images_in(folder / sub) if (folder / sub).is_dir() else []
    test_good, val_good = optional("test/good"), optional("validation/good")
    for p in train_good + test_good + val_good:
        _decoded_size(p)

    anomalies = []
    for dfolder in sorted(p for p in (folder / "test").iterdir() if p.is_dir() and p.name != "good"):
        defect, images = dfolder.name, _images_in(dfolder, "anomalous test images")
        prompts = folder / "prompt" / defect
        if not prompts.is_dir():
            raise FileNotFoundError(f"{prompts}: missing MVTec Caption prompts for {dfolder} "
                                    f"(get them from {MVTEC_CAPTION_URL})")
        for image in images:   # each image's own files first, so a missing one is named
            caption = _read_caption(prompts / f"{image.stem}.txt", image)
            anomalies.append(_anomaly(image, _mask_files(folder, defect, image.stem), caption, defect))
        stems = {p.stem for p in images}
        _no_orphans(prompts, stems, "caption", dfolder)
        if not (folder / "ground_truth_merge_mask").is_dir():
            _no_orphans(folder / "ground_truth" / defect, stems, "mask", dfolder)
    return Category(folder.name, folder, train_good, test_good, anomalies, val_good)


def load_generated(folder):
    """The anomalies of a generated folder, in sample.py's MVTec layout (test/<defect>/, ground_truth/, prompt/;
    its train/good and test/good hold real images and are ignored) or AnomalyDiffusion's release
    (<defect>/image/*.png, <defect>/mask/*.png of the same name). Captions are empty where none is written."""
    folder, anomalies = Path(folder), []
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: generated folder not found (--generated: sample.py's output folder, "
                                f"or AnomalyDiffusion's <category>/ holding <defect>/image/ and <defect>/mask/)")
    for dfolder in sorted(p for p in (folder / "test").glob("*") if p.is_dir() and p.name != "good"):
        for image in _images_in(dfolder, "generated anomalies"):
            caption = folder / "prompt" / dfolder.name / f"{image.stem}.txt"
            caption = _read_caption(caption, image) if caption.is_file() else ""
            masks = _mask_files(folder, dfolder.name, image.stem)
            anomalies.append(_anomaly(image, masks, caption, dfolder.name))
    for dfolder in sorted(p for p in folder.iterdir() if (p / "image").is_dir()):
        for image in _images_in(dfolder / "image", "generated anomalies"):
            mask = [m for m in (dfolder / "mask" / image.name, dfolder / "mask" / f"{image.stem}_mask.png")
                    if m.is_file()]
            if not mask:
                raise FileNotFoundError(f"{image}: no mask (missing {dfolder / 'mask' / image.name})")
            anomalies.append(_anomaly(image, tuple(mask[:1]), "", dfolder.name))
    if not anomalies:
        raise ValueError(f"{folder}: no generated anomalies (expected test/<defect>/*.png or <defect>/image/*.png)")
    return anomalies


def few_shot_split(anomalies):
    """Per defect type, the first third by sorted file name (at least one) may train the generator;
    the rest is held out for evaluation, so no image is ever in both (AnomalyDiffusion's protocol)."""
    train, held_out = [], []
    for defect in sorted({a.defect for a in anomalies}):
        items = sorted((a for a in anomalies if a.defect == defect), key=lambda a: a.image.name)
        train, held_out = train + items[:max(1, len(items) // 3)], held_out + items[max(1, len(items) // 3):]
    return train, held_out


def validation_split(category, out, good_every=5):
    """A category folder for choosing a recipe without the test set: its anomalies are the few-shot ones alone
    (so few_shot_split of it gives the generator the first third of those and holds out the rest as validation),
    its test/good every `good_every`-th normal training image, its train/good the others. train.py, sample.py and
    evaluate.py run on it unchanged (--data_root); no held-out anomaly and no test image is copied. Returns
    out/<category name>, written whole: any earlier copy there is replaced."""
    target = Path(out) / category.name
    if target.resolve() == category.folder.resolve():
        raise ValueError(f"{out}: the validation folder would replace {category.folder} itself; choose another")
    if target.exists():
        shutil.rmtree(target)
    few, _ = few_shot_split(category.anomalies)
    held_goods = set(category.train_good[good_every - 1::good_every])
    copies = [(p, Path("train/good") / p.name) for p in category.train_good if p not in held_goods]
    copies += [(p, Path("test/good") / p.name) for p in sorted(held_goods)]
    for a in few:   # the image, its mask file(s) and its caption, each at its place in the layout
        caption = category.folder / "prompt" / a.defect / f"{a.image.stem}.txt"
        copies += [(p, p.relative_to(category.folder)) for p in (a.image, *a.mask_files, caption)]
    for source, relative in copies:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / relative)
    return target


def read_image(path, size):
    """An RGB image as float32 [3, size, size] in [0, 1]; grayscale MVTec categories become 3-channel."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)  # PIL widens the filter when shrinking
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def read_mask(anomaly_or_files, size):
    """The union of an anomaly's mask files (LOCO regions merge into one), binarised at > 127: [1, size, size].
    A mask without a single pixel is refused: an anomaly needs a place, and a sample drawn inside an empty
    mask would change nothing."""
    files = anomaly_or_files.mask_files if isinstance(anomaly_or_files, Anomaly) else anomaly_or_files
    files = [files] if isinstance(files, (str, Path)) else list(files)
    if not files:
        raise ValueError("read_mask: no mask files given")
    union = None
    for f in files:
        with Image.open(f) as im:
            m = np.asarray(im.convert("L")) > 127
        if union is not None and m.shape != union.shape:
            raise ValueError(f"{f}: mask size {m.shape[::-1]} differs from {files[0]} {union.shape[::-1]}")
        union = m if union is None else union | m
    if not union.any():
        raise ValueError(f"{files[0]}: empty mask; an anomaly needs at least one mask pixel")
    # area resampling, then > 0: an output pixel is anomalous if any pixel it covers is, so a 1-px scratch
    # survives downsampling (nearest would drop it and turn the anomaly into a "good" image)
    m = torch.from_numpy(union).float()[None, None]
    return (F.interpolate(m, size=(size, size), mode="area") > 0).float()[0]


# ----------------------------------------------------------------------------------------------
# Masks to generate at. DRAEM (Zavrtanik et al., 2021) thresholds Perlin noise at a random lattice
# scale; AnomalyDiffusion-style sampling jitters the real masks of the defect type instead.


def _affine(x, generator, angle_range, shift=0.0, scale=(1.0, 1.0), flip=False, mode="nearest"):
    """Random rotation / shift / scale / flips of x [N, 1, S, S] with one affine grid (zeros outside)."""
    u = torch.rand(6, generator=generator).tolist()
    a = (2 * u[0] - 1) * angle_range * math.pi / 180
    s = scale[0] + (scale[1] - scale[0]) * u[1]
    fx = -1.0 if flip and u[2] < 0.5 else 1.0
    fy = -1.0 if flip and u[3] < 0.5 else 1.0
    # affine_grid maps output to input coordinates, hence the inverse scale
    theta = torch.tensor([[fx * math.cos(a) / s, -fy * math.sin(a) / s, (2 * u[4] - 1) * shift],
                          [fx * math.sin(a) / s, fy * math.cos(a) / s, (2 * u[5] - 1) * shift]],
                         dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta[None].expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _perlin(size, res_y, res_x, generator):
    """2-D Perlin gradient noise [size, size] in about [-1, 1] (Perlin, 2002: quintic fade)."""
    angles = 2 * math.pi * torch.rand(res_y + 1, res_x + 1, generator=generator)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], -1)         # [ry+1, rx+1, 2]
    y, x = torch.arange(size) * res_y / size, torch.arange(size) * res_x / size
    y0, x0 = torch.meshgrid(y.floor().long(), x.floor().long(), indexing="ij")
    fy, fx = torch.meshgrid(y - y.floor(), x - x.floor(), indexing="ij")   # [S, S] position in the cell

    def corner(dy, dx):  # dot product of a lattice gradient with the offset to that lattice point
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
    top = torch.lerp(corner(0, 0), corner(0, 1), fade(fx))
    bottom = torch.lerp(corner(1, 0), corner(1, 1), fade(fx))
    return math.sqrt(2) * torch.lerp(top, bottom, fade(fy))


def perlin_mask(size, generator, threshold=0.5, max_area=0.5, tries=50):
    """DRAEM's anomaly mask: Perlin noise, lattice 2^0..2^5 per axis (cells >= 8 px), rotated by up to
    90 degrees, thresholded at 0.5; redrawn until non-empty and covering at most max_area. [1, S, S]"""
    levels = max(1, min(6, int(math.log2(max(size // 8, 1))) + 1))
    for _ in range(tries):
        ry, rx = (2 ** torch.randint(0, levels, (2,), generator=generator)).tolist()
        noise = _affine(_perlin(size, ry, rx, generator)[None, None], generator, 90, mode="bilinear")[0]
        mask = (noise > threshold).float()
        if 0 < mask.mean() <= max_area:
            return mask
    # rare: every draw was empty or too large; keep the top 5% of the last noise (still non-empty)
    return (noise >= noise.flatten().kthvalue(int(0.95 * noise.numel())).values).float()


# How far a real mask may move. A caption describes what lies under its mask ("the green cable"), so
# sample.py's default keeps a mask on its part of the object: flipped or turned by 20 degrees, the
# green wire's ring of MVTec cable lands on the filler or on the blue wire. "large" suits objects that
# look the same turned or mirrored (bottle, the textures) and gives the mask encoder variety.
JITTER = {"none": None,
          "small": dict(angle_range=5, shift=0.03, scale=(0.95, 1.05), flip=False),
          "large": dict(angle_range=20, shift=0.1, scale=(0.85, 1.15), flip=True)}


def similar_normals(category, anomalies, k, size=64):
    """For each anomaly, the indices of the k normal training images most like it outside its mask.

    A few-shot mask marks a part of the object as posed in its own image ("the green cable"); on a
    normal image posed the same way it lands on that part, not beside it. The distance is the L2
    over the pixels outside the dilated mask, at `size` px: pose, not detail, is what matters.
    """
    normals = torch.stack([read_image(p, size) for p in category.train_good])  # [N, 3, s, s]
    nearest = {}
    for anomaly in anomalies:
        image, mask = read_image(anomaly.image, size), read_mask(anomaly, size)
        outside = 1 - F.max_pool2d(mask[None], 5, stride=1, padding=2)[0]
        distance = ((normals - image) ** 2 * outside).sum((1, 2, 3))
        nearest[anomaly.image] = distance.topk(min(k, len(normals)), largest=False).indices.tolist()
    return nearest


def read_anomalies(anomalies, defects, size):
    """Anomalies as (images [N, 3, S, S], masks [N, 1, S, S], each one's defect type as its index in defects [N])."""
    return (torch.stack([read_image(a.image, size) for a in anomalies]),
            torch.stack([read_mask(a, size) for a in anomalies]),
            torch.tensor([defects.index(a.defect) for a in anomalies]))  # each anomaly's defect type, as a class


def sample_mask(size, generator, real_masks=None, p_real=0.5, jitter="large"):
    """A binary, non-empty mask [1, size, size]: with probability p_real one of real_masks [N, 1, h, w]
    (one defect type) under a JITTER of flips, rotation, shift and scale; otherwise DRAEM Perlin blobs."""
    if jitter not in JITTER:
        raise ValueError(f"jitter {jitter!r}: choose from {', '.join(JITTER)}")
    if real_masks is None or len(real_masks) == 0 or torch.rand(1, generator=generator).item() >= p_real:
        return perlin_mask(size, generator)
    i = torch.randint(0, len(real_masks), (1,), generator=generator).item()
    real = F.interpolate((real_masks[i:i + 1].float().cpu() > 0.5).float(), size=(size, size), mode="nearest")
    if real.sum() == 0:
        raise ValueError(f"real_masks[{i}] is empty; pass only the non-empty masks of real anomalies")
    if JITTER[jitter] is None:
        return real[0]
    for _ in range(10):  # a shift can push a small mask off the image: draw again
        mask = (_affine(real, generator, **JITTER[jitter], mode="nearest") > 0.5).float()
        if mask.sum() > 0:
            return mask[0]
    return real[0]


def shifted(mask, dy, dx):
    """mask [1, S, S] moved dy rows down and dx columns right; what leaves the square is gone, never wrapped round."""
    S, out = mask.shape[-1], torch.zeros_like(mask)
    out[:, max(dy, 0):S + min(dy, 0), max(dx, 0):S + min(dx, 0)] = mask[:, max(-dy, 0):S - max(dy, 0),
                                                                        max(-dx, 0):S - max(dx, 0)]
    return out


def mask_centre(mask):
    """The (row, column) of a non-empty mask's centre of mass, rounded."""
    return [int(v) for v in torch.nonzero(mask[0]).float().mean(0).round()]


@torch.no_grad()
def mixed_mask(autoencoder, mask, partner, generator, weights=(0.25, 0.75), tries=10):
    """A new mask of a defect type from two of its examples [1, S, S]: a shape between theirs, at the first one's
    place. Both are moved so that their centres are the image's, encoded by the stage-2 mask autoencoder
    (mask_encoder.MaskAutoencoder), their 8x8 features mixed with a weight w drawn from `weights` (w of the
    partner's), decoded (logits > 0), and moved to the first mask's centre, where its caption says the defect is.
    An empty decode is drawn again; after `tries` empty ones, the first mask itself."""
    S = mask.shape[-1]
    centred = lambda m: shifted(m, S // 2 - mask_centre(m)[0], S // 2 - mask_centre(m)[1])
    device = next(autoencoder.parameters()).device
    features = autoencoder.encoder(torch.stack([centred(mask), centred(partner)]).to(device))
    for _ in range(tries):
        w = weights[0] + (weights[1] - weights[0]) * torch.rand(1, generator=generator).item()
        logits = autoencoder.decoder((1 - w) * features[:1] + w * features[1:])
        new = (logits[0] > 0).float().cpu()
        if new.sum() > 0:
            (y, x), (ny, nx) = mask_centre(mask), mask_centre(new)
            new = shifted(new, y - ny, x - nx)
            if new.sum() > 0:
                return new
    return mask


# ----------------------------------------------------------------------------------------------
# Preview grids: rows of images [3, S, S], masks [1, S, S] and caption strings.


def save_grid(rows, path, cell=128):
    """Save rows of cells (tensors in [0, 1], [C, S, S]; or str, drawn as wrapped text) as one PNG."""
    widths = [cell * 3 if isinstance(c, str) else cell for c in rows[0]]
    grid = Image.new("RGB", (sum(widths) + 2 * len(widths), (cell + 2) * len(rows)), (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for r, row in enumerate(rows):
        x = 0
        for c, w in zip(row, widths):
            if isinstance(c, str):
                draw.multiline_text((x + 4, r * (cell + 2) + 4), textwrap.fill(c, w // 7), fill=(0, 0, 0), font=font)
            else:
                t = c.detach().float().cpu().clamp(0, 1).expand(3, -1, -1)
                arr = (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                grid.paste(Image.fromarray(arr).resize((w, cell), Image.NEAREST), (x, r * (cell + 2)))
            x += w + 2
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return Path(path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a toy category (MVTec + MVTec Caption layout) and a preview grid.")
    p.add_argument("--category", default="cable", help=f"one of {', '.join(toy.TOY_CATEGORIES)} (default: cable)")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--rows", type=int, default=3, help="preview rows per defect type (default: 3)")
    args = p.parse_args(argv)
    t0 = time.time()
    cat = load_category(toy.make_toy(args.out, args.category, args.size, args.seed))
    rows = [[read_image(a.image, 128), read_mask(a, 128), f"{a.defect}: {a.caption}"]
            for d in cat.defects for a in cat.anomalies_of(d)[:args.rows]]
    path = save_grid(rows, Path(args.out) / f"{cat.name}_preview.png")
    print(f"wrote toy category {cat.folder} in {time.time() - t0:.1f} s: {len(cat.train_good)} train, "
          f"{len(cat.test_good)} good test, {len(cat.anomalies)} anomalies ({', '.join(cat.defects)}); preview: {path}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as error:  # a bad flag or folder: one line, no traceback
        raise SystemExit(f"error: {error}")
