"""Data: MVTec AD / MVTec LOCO with the MVTec Caption prompts, the few-shot split, mask sampling, and
a procedural toy world in the same layout (paper §3 for MVTec Caption, §5 for the protocol).

What this file holds, in reading order:
  Anomaly, Category, load_category   one category folder, validated up front, errors in one line
  load_generated                     generated anomalies: sample.py's folder or AnomalyDiffusion's layout
  few_shot_split                     the first third of each defect type trains the generator (§5)
  read_image, read_mask              tensors: images [3, S, S] in [0, 1], masks [1, S, S] in {0, 1}
  perlin_mask, JITTER, sample_mask   masks to generate at: DRAEM's Perlin blobs or jittered real masks
  TOY_COLOURS, make_toy, ensure_toy  the toy world (bottle, cable): the caption decides what is drawn
  caption_colour, drawn_colour       did a generator draw the colour its caption names?
  save_grid, main                    preview grids; `python data.py --toy --category cable --out DIR`
Depends on torch, numpy and pillow only.
"""
import argparse
import json
import math
import os
import re
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

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


def read_image(path, size):
    """An RGB image as float32 [3, size, size] in [0, 1]; grayscale MVTec categories become 3-channel."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)  # PIL widens the filter when shrinking
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def read_mask(anomaly_or_files, size):
    """The union of an anomaly's mask files (LOCO regions merge into one), binarised at > 127: [1, size, size]."""
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


# ----------------------------------------------------------------------------------------------
# The toy world: procedural bottles and cables in the exact MVTec + MVTec Caption layout. Each anomaly
# is drawn twice, without and with its defect, on the same pose, light and noise, so its mask is
# exactly the changed pixels and outside it the image is its normal twin.

TOY_CATEGORIES = ("bottle", "cable")
TOY_ROOT = Path(__file__).parent / "data" / "toy"
TOY_COLOURS = {"red": (200, 35, 35), "green": (40, 160, 60), "blue": (40, 70, 200), "gray": (140, 140, 140),
               "black": (15, 15, 15), "yellow": (225, 200, 40), "purple": (130, 50, 165), "copper": (190, 110, 50)}
TOY_DEFECTS = {"bottle": ("broken_large", "broken_small", "contamination"),
               "cable": ("cable_swap", "cut_inner_insulation", "missing_cable")}
TOY_COUNTS = dict(train=200, test_good=20, per_defect=24)  # 24 -> 8 few-shot anomalies per defect type
CABLE_WIRES = ("green", "blue", "gray")                       # top left, top right, bottom, as in MVTec cable
CONTAMINANTS = ("red", "green", "blue", "yellow", "purple")
WHERE = ("right", "bottom right", "bottom", "bottom left", "left", "top left", "top", "top right")  # y points down


def _blob(draw, cx, cy, r, rng, fill, n=9):
    """An irregular polygon around (cx, cy) of radius about r: chips and stains are not circles."""
    a = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)
    rr = r * rng.uniform(0.7, 1.1, n)
    draw.polygon([(cx + q * np.cos(t), cy + q * np.sin(t)) for q, t in zip(rr, a)], fill=fill)


def _disk(draw, cx, cy, r, fill):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _draw_bottle(s, pose, d, rng):
    """Top view of a bottle mouth on a light background: dark glass, a lighter lip, the dark inside."""
    im = Image.new("RGB", (s, s), (232, 228, 218))
    draw = ImageDraw.Draw(im)
    cx, cy, r = pose["cx"] * s, pose["cy"] * s, pose["r"] * s
    _disk(draw, cx, cy, r, (50, 62, 45))
    _disk(draw, cx, cy, 0.8 * r, (92, 106, 82))
    a = pose["rot"]  # the specular highlight on the lip turns with the bottle
    draw.arc([cx - 0.72 * r, cy - 0.72 * r, cx + 0.72 * r, cy + 0.72 * r], a, a + 70, fill=(170, 180, 160),
             width=max(1, int(0.06 * r)))
    _disk(draw, cx, cy, 0.62 * r, (68, 82, 60))
    _disk(draw, cx, cy, 0.5 * r, (30, 34, 27))
    if d and d["defect"].startswith("broken"):  # a chip bitten out of the rim shows the background
        t = np.deg2rad(d["angle"])
        _blob(draw, cx + r * np.cos(t), cy + r * np.sin(t), d["chip"] * r, rng, (232, 228, 218))
    elif d:  # contamination: a stain of the named colour inside the mouth
        _blob(draw, cx + d["dx"] * r, cy + d["dy"] * r, d["radius"] * r, rng, TOY_COLOURS[d["colour"]])
    return im


def _draw_cable(s, pose, d, rng):
    """Cross-section of a cable: black sheath, beige filler, three insulated wires with copper cores."""
    im = Image.new("RGB", (s, s), (72, 76, 82))
    draw = ImageDraw.Draw(im)
    cx, cy, r = pose["cx"] * s, pose["cy"] * s, pose["r"] * s
    _disk(draw, cx, cy, r, (32, 32, 36))
    _disk(draw, cx, cy, 0.88 * r, (205, 195, 172))
    for i, (wire, a) in enumerate(zip(CABLE_WIRES, (-150, -30, 90))):
        t = np.deg2rad(a + pose["rot"])
        wx, wy, wr = cx + 0.44 * r * np.cos(t), cy + 0.44 * r * np.sin(t), 0.33 * r
        hit = d is not None and d["wire"] == i
        if hit and d["defect"] == "missing_cable":
            _disk(draw, wx, wy, wr, TOY_COLOURS["black"])
            continue
        _disk(draw, wx, wy, wr, TOY_COLOURS[d["colour"] if hit and d["defect"] == "cable_swap" else wire])
        if hit and d["defect"] == "cut_inner_insulation":  # a slit through the insulation down to the core
            draw.pieslice([wx - wr, wy - wr, wx + wr, wy + wr], d["angle"], d["angle"] + d["span"],
                          fill=TOY_COLOURS["copper"])
        _disk(draw, wx, wy, 0.5 * wr, TOY_COLOURS["copper"])
    return im


def _toy_defect(defect, i, rng):
    """Defect parameters and caption; the main factor cycles with i so the few-shot third covers it."""
    size = ("small", "large")[rng.integers(2)]
    if defect.startswith("broken"):
        k = i % 8
        big = defect == "broken_large"
        d = dict(angle=45 * k + rng.uniform(-15, 15), chip=rng.uniform(0.24, 0.3) if big else rng.uniform(0.1, 0.13))
        caption = f"A {'large' if big else 'small'} piece of the bottle rim is broken off at the {WHERE[k]}"
    elif defect == "contamination":
        radius = rng.uniform(0.25, 0.3) if size == "large" else rng.uniform(0.13, 0.16)
        t, q = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.45 - radius)
        d = dict(colour=CONTAMINANTS[i % 5], radius=radius, dx=q * np.cos(t), dy=q * np.sin(t))
        caption = f"A {size} {d['colour']} contamination lies inside the bottle"
    elif defect == "cable_swap":  # (wire, colour): 3 wires x 2 other colours
        w, c = divmod(i % 6, 2)
        d = dict(wire=w, colour=[x for x in CABLE_WIRES if x != CABLE_WIRES[w]][c])
        caption = f"The {CABLE_WIRES[w]} cable is replaced by a repeated {d['colour']} cable"
    elif defect == "missing_cable":
        d = dict(wire=i % 3)
        caption = f"One {CABLE_WIRES[i % 3]} cable is missing, replaced by a black hole"
    else:
        d = dict(wire=i % 3, angle=rng.uniform(0, 360), span=rng.uniform(60, 100))
        caption = f"The insulation of the {CABLE_WIRES[i % 3]} cable is cut, exposing the copper core"
    return dict(d, defect=defect), caption


def _toy_sample(category, size, rng, defect=None, i=0):
    """One toy image (uint8 [S, S, 3]); for an anomaly also its mask (bool [S, S]), caption and normal twin."""
    pose = dict(cx=0.5 + rng.uniform(-0.05, 0.05), cy=0.5 + rng.uniform(-0.05, 0.05),
                r=rng.uniform(0.38, 0.42), rot=rng.uniform(-10, 10) if category == "cable" else rng.uniform(0, 360))
    d, caption = _toy_defect(defect, i, rng) if defect else (None, None)
    draw = _draw_bottle if category == "bottle" else _draw_cable
    shape_seed = int(rng.integers(2**31))  # the same irregular polygons in both renders

    def render(dd):  # drawn at 2x and box-filtered down: anti-aliased edges
        im = draw(2 * size, pose, dd, np.random.default_rng(shape_seed)).reduce(2)
        return np.asarray(im, dtype=np.float32)

    # light: overall brightness times a gentle gradient from a random direction, then sensor noise
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    phi = rng.uniform(0, 2 * np.pi)
    light = (rng.uniform(0.92, 1.08) * (1 + 0.06 * (np.cos(phi) * xx + np.sin(phi) * yy)))[..., None]
    noise = rng.normal(0, 2.0, (size, size, 3))
    normal = render(None) * light
    finish = lambda x: np.clip(np.round(x + noise), 0, 255).astype(np.uint8)
    if d is None:
        return finish(normal), None, None, None
    anomaly = render(d) * light
    mask = np.abs(anomaly - normal).max(-1) > 12  # the changed pixels, partial edge pixels included
    if not mask.any():
        raise RuntimeError(f"toy {category}/{defect} #{i}: the defect changed no pixel at size {size}")
    return finish(np.where(mask[..., None], anomaly, normal)), mask, caption, finish(normal)


def make_toy(root, category, size=128, seed=0):
    """Write <root>/<category> in the exact MVTec + MVTec Caption layout; deterministic for (size, seed)."""
    if category not in TOY_CATEGORIES:
        raise ValueError(f"--category {category!r}: the toy world has {', '.join(TOY_CATEGORIES)}")
    if size < 32:
        raise ValueError(f"--size {size}: toy images need at least 32 px for a small chip to show")
    root = Path(root)
    folder, tmp = root / category, root / f".{category}.tmp{os.getpid()}"
    if folder.exists() and not (folder / "toy.json").is_file():
        raise FileExistsError(f"{folder}: exists and is not a toy category (no toy.json); refusing to overwrite")
    shutil.rmtree(tmp, ignore_errors=True)
    save = lambda arr, path: (path.parent.mkdir(parents=True, exist_ok=True), Image.fromarray(arr).save(path))
    for split, n, k in (("train", TOY_COUNTS["train"], 0), ("test", TOY_COUNTS["test_good"], 1)):
        for i in range(n):
            image = _toy_sample(category, size, np.random.default_rng([seed, k, i]))[0]
            save(image, tmp / split / "good" / f"{i:03d}.png")
    for k, defect in enumerate(TOY_DEFECTS[category], start=2):
        for i in range(TOY_COUNTS["per_defect"]):
            image, mask, caption, _ = _toy_sample(category, size, np.random.default_rng([seed, k, i]), defect, i)
            save(image, tmp / "test" / defect / f"{i:03d}.png")
            save(mask.astype(np.uint8) * 255, tmp / "ground_truth" / defect / f"{i:03d}_mask.png")
            (tmp / "prompt" / defect).mkdir(parents=True, exist_ok=True)
            (tmp / "prompt" / defect / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    (tmp / "toy.json").write_text(json.dumps(dict(category=category, size=size, seed=seed, version=1)))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)  # atomic: a killed run never leaves a half-written category behind
    except OSError:  # another process finished the same category first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _toy_matches(folder, category, size, seed):
            raise
    return folder


def _toy_matches(folder, category, size, seed):
    marker, want = Path(folder) / "toy.json", dict(category=category, size=size, seed=seed, version=1)
    return marker.is_file() and json.loads(marker.read_text()) == want


def ensure_toy(category, root=TOY_ROOT, size=128, seed=0):
    """The toy category folder, generated on first use (or when size / seed changed)."""
    folder = Path(root) / category
    return folder if _toy_matches(folder, category, size, seed) else make_toy(root, category, size, seed)


def caption_colour(caption):
    """The TOY_COLOURS entry a toy caption says is drawn in the mask: the last colour it names
    ("... replaced by a repeated green cable" -> green, "... exposing the copper core" -> copper),
    black for a missing part, None if it names no colour."""
    words = re.findall(r"[a-z]+", caption.lower().replace("grey", "gray"))
    colours = [w for w in words if w in TOY_COLOURS]
    if "missing" in words and "black" not in colours:
        return "black"
    return colours[-1] if colours else None


def drawn_colour(image, mask):
    """Name of the TOY_COLOURS entry nearest to the median colour of image [3, S, S] inside mask [1, S, S]."""
    inside = mask.reshape(-1) > 0.5
    if not inside.any():
        raise ValueError("drawn_colour: the mask is empty")
    median = image.detach().float().cpu().reshape(3, -1)[:, inside.cpu()].median(dim=1).values * 255   # [3]
    table = torch.tensor(list(TOY_COLOURS.values()), dtype=torch.float32)
    return list(TOY_COLOURS)[int((table - median).norm(dim=1).argmin())]


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
    p.add_argument("--toy", action="store_true", required=True, help="generate the built-in toy category into --out")
    p.add_argument("--category", default="cable", help=f"one of {', '.join(TOY_CATEGORIES)} (default: cable)")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--rows", type=int, default=3, help="preview rows per defect type (default: 3)")
    args = p.parse_args(argv)
    t0 = time.time()
    cat = load_category(make_toy(args.out, args.category, args.size, args.seed))
    rows = [[read_image(a.image, 128), read_mask(a, 128), f"{a.defect}: {a.caption}"]
            for d in cat.defects for a in cat.anomalies_of(d)[:args.rows]]
    path = save_grid(rows, Path(args.out) / f"{cat.name}_preview.png")
    print(f"wrote toy category {cat.folder} in {time.time() - t0:.1f} s: {len(cat.train_good)} train, "
          f"{len(cat.test_good)} good test, {len(cat.anomalies)} anomalies ({', '.join(cat.defects)}); preview: {path}")


if __name__ == "__main__":
    main()
