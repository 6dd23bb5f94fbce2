"""sample.py: synthesize anomalies with a trained AnomalyXFusion into an MVTec-layout folder.

    python sample.py --category bottle --toy --n 100
    python sample.py --category bottle --ckpt runs/bottle --n 1000 --defect broken_large
    python sample.py --category cable --toy --defect cable_swap --prompt "The blue cable is replaced by a repeated green cable"

For each defect type (or --defect), --n anomalies are drawn on normal training images (one of the
--similar_normals most like the few-shot source the mask and caption come from), inside
masks (a few-shot real mask of that defect under a small random affine --jitter, or Perlin-noise
blobs with --masks perlin), steered by a caption (the few-shot caption that goes with the mask, or
--prompt) and the defect's learned texture tokens (or the CLIP features of --reference and
--reference_mask, Eq. 3). Blended sampling (Eq. 16, axf.py) keeps the image outside the mask.

Written to --out_dir (default samples/<category>), readable by data.load_category and evaluate.py:
    test/<defect>/NNN.png   ground_truth/<defect>/NNN_mask.png   prompt/<defect>/NNN.txt
    train/good/ (links to the normal training images)   preview.png
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import axf
import data
from train import add_data_args, autocast, category_folder, pick_device

SAMPLING_KEYS = ("sampler", "sample_steps", "guidance_scale", "eta", "seed", "device")


def find_checkpoint(ckpt, category):
    """--ckpt may name a file or a train.py run folder; by default train.py's folder for the category."""
    path = Path(ckpt or Path("runs") / category)
    return path / "axf.pt" if path.is_dir() else path


def save_png(tensor, path):
    """A [C, H, W] tensor in [0, 1] as an 8-bit PNG (RGB, or L for a one-channel mask)."""
    pixels = (tensor.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def link_normals(paths, folder):
    """train/good holds the normal images, as links where the file system allows, else copies."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = folder / path.name
        if target.exists() or target.is_symlink():
            continue
        try:
            os.symlink(path.resolve(), target)
        except OSError:
            shutil.copy(path, target)


def similar_normals(category, anomalies, k, size=64):
    """For each anomaly, the indices of the k normal training images most like it outside its mask.

    A few-shot mask marks a part of the object as posed in its own image ("the green cable"); on a
    normal image posed the same way it lands on that part, not beside it. The distance is the L2
    over the pixels outside the dilated mask, at `size` px: pose, not detail, is what matters.
    """
    normals = torch.stack([data.read_image(p, size) for p in category.train_good])  # [N, 3, s, s]
    nearest = {}
    for anomaly in anomalies:
        image, mask = data.read_image(anomaly.image, size), data.read_mask(anomaly, size)
        outside = 1 - F.max_pool2d(mask[None], 5, stride=1, padding=2)[0]
        distance = ((normals - image) ** 2 * outside).sum((1, 2, 3))
        nearest[anomaly.image] = distance.topk(min(k, len(normals)), largest=False).indices.tolist()
    return nearest


def plan(category, few_shot, args, size, generator):
    """What to draw: (defect, normal image path, mask, caption) for every sample."""
    defects = [args.defect] if args.defect else category.defects
    nearest = similar_normals(category, few_shot, args.similar_normals) if args.similar_normals > 0 else None
    jobs = []
    for defect in defects:
        if defect not in category.defects:
            raise ValueError(f"--defect {defect!r} is not a defect type of {category.name}: {', '.join(category.defects)}")
        examples = [a for a in few_shot if a.defect == defect]
        for _ in range(args.n):
            source = examples[int(torch.randint(len(examples), (1,), generator=generator))]
            candidates = nearest[source.image] if nearest else range(len(category.train_good))
            normal = category.train_good[candidates[int(torch.randint(len(candidates), (1,), generator=generator))]]
            if args.masks == "perlin":
                mask = data.perlin_mask(size, generator)
            else:  # the source's own mask, jittered: the caption describes what lies under it
                mask = data.sample_mask(size, generator, real_masks=data.read_mask(source, size)[None], p_real=1.0,
                                        jitter=args.jitter)
            jobs.append((defect, normal, mask, args.prompt or source.caption))
    return jobs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--ckpt", help="checkpoint file or train.py --out_dir (default: runs/<category>)")
    parser.add_argument("--n", type=int, default=100, help="anomalies per defect type (default: 100)")
    parser.add_argument("--defect", help="only this defect type (default: every defect type)")
    parser.add_argument("--prompt", help="one caption for every sample (default: the few-shot captions)")
    parser.add_argument("--masks", choices=("real", "perlin"), default="real",
                        help="jittered few-shot masks (default) or Perlin-noise blobs")
    parser.add_argument("--jitter", choices=tuple(data.JITTER), default="small",
                        help="how far a real mask moves: none; small (default: 5 degrees, 1.5%% shift, 5%% scale, "
                             "so it stays on the part its caption names); large (also flips, 20 degrees, 5%% shift, "
                             "15%% scale: for objects that look the same turned or mirrored, like bottle)")
    parser.add_argument("--similar_normals", type=int, default=10, metavar="K",
                        help="draw each anomaly on one of the K normal training images most like its few-shot "
                             "source outside the mask, so the mask lands on the part it marks (default: 10); "
                             "0: on any normal image")
    parser.add_argument("--reference", help="an anomalous image whose masked pixels set the texture (Eq. 3)")
    parser.add_argument("--reference_mask", help="the mask of --reference")
    parser.add_argument("--out_dir", help="output folder (default: samples/<category>)")
    parser.add_argument("--batch_size", type=int, default=16, help="samples per sampler call (default: 16)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: the checkpoint's (ddim)")
    parser.add_argument("--sample_steps", type=int, help="DDIM steps (default: the checkpoint's, 50)")
    parser.add_argument("--guidance_scale", type=float, help="classifier-free guidance (default: the checkpoint's)")
    parser.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 like DDPM (default: 0)")
    parser.add_argument("--seed", type=int, help="default: the checkpoint's seed")
    parser.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if args.similar_normals < 0:
        raise ValueError(f"--similar_normals must be 0 (any normal image) or more, got {args.similar_normals}")
    if bool(args.reference) != bool(args.reference_mask):
        raise ValueError("--reference and --reference_mask go together")
    path = find_checkpoint(args.ckpt, args.category)
    model, checkpoint = axf.load_checkpoint(path, device="cpu")
    config = dict(checkpoint["config"], **{k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k) is not None})
    device = pick_device(config["device"])
    model = model.to(device)
    if args.toy or args.data_root:
        folder = category_folder(args)
    else:
        folder = Path(checkpoint["data_folder"])
    category = data.load_category(folder)
    if category.defects != model.defects[1:]:
        raise ValueError(f"{path} was trained on defects {model.defects[1:]}, but {folder} has {category.defects}")
    few_shot, _ = data.few_shot_split(category.anomalies)
    size = config["image_size"]
    generator = torch.Generator().manual_seed(config["seed"])
    jobs = plan(category, few_shot, args, size, generator)
    textures = None
    if args.reference:
        ref_image, ref_mask = data.read_image(args.reference, size)[None], data.read_mask((Path(args.reference_mask),), size)[None]
        features = model.encode_texture(ref_image.to(device), ref_mask.to(device))
        textures = axf.unit_tokens(features, config["num_tokens"])

    out = Path(args.out_dir or Path("samples") / args.category)
    link_normals(category.train_good, out / "train" / "good")
    for defect in sorted({job[0] for job in jobs}):  # a re-run replaces that defect's old samples
        for sub in ("test", "ground_truth", "prompt"):
            shutil.rmtree(out / sub / defect, ignore_errors=True)
    counters, preview, outside_max, inside_mean, colours = {}, [], 0.0, [], []
    print(f"sampling {len(jobs)} anomalies with {path} ({config['sampler']}, {config['sample_steps']} steps, "
          f"guidance {config['guidance_scale']}) into {out}")
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="sampling"):
        batch = jobs[start:start + args.batch_size]
        normals = torch.stack([data.read_image(j[1], size) for j in batch]).to(device)
        masks = torch.stack([j[2] for j in batch]).to(device)
        captions = [j[3] for j in batch]
        defect_ids = torch.tensor([model.defects.index(j[0]) for j in batch], device=device)
        batch_textures = None if textures is None else textures.expand(len(batch), -1, -1)
        with autocast(device):
            images = model.sample(normals, masks, captions, defect_ids, textures=batch_textures,
                                  sampler=config["sampler"], steps=config["sample_steps"],
                                  guidance_scale=config["guidance_scale"], eta=config["eta"],
                                  generator=torch.Generator(device).manual_seed(config["seed"] + start))
        # the promise of Eq. (16) and the final composite, checked on every sample: outside the dilated
        # mask the normal image exactly, inside something else
        weight = axf.composite_mask(masks, config["composite_radius"]).expand_as(images)
        outside_max = max(outside_max, (images - normals)[weight == 0].abs().max().item())
        inside_mean += [(i - n)[m.expand_as(i) > 0].abs().mean().item() for i, n, m in zip(images, normals, masks)]
        for (defect, _, mask, caption), normal, image in zip(batch, normals.cpu(), images.float().cpu()):
            index = counters.get(defect, 0)
            counters[defect] = index + 1
            for sub in ("test", "ground_truth", "prompt"):
                (out / sub / defect).mkdir(parents=True, exist_ok=True)
            save_png(image, out / "test" / defect / f"{index:03d}.png")
            save_png(mask, out / "ground_truth" / defect / f"{index:03d}_mask.png")
            (out / "prompt" / defect / f"{index:03d}.txt").write_text(caption + "\n", encoding="utf-8")
            if data.caption_colour(caption) and (folder / "toy.json").exists():  # the toy world's own check
                colours.append(data.drawn_colour(image, mask) == data.caption_colour(caption))
            if index < 4:  # the preview shows the first few of each defect type
                preview.append([normal, mask, image, caption])
    data.save_grid(preview, out / "preview.png")
    print(f"outside the masks: max |generated - normal| = {outside_max:.3g}; "
          f"inside: mean |generated - normal| = {sum(inside_mean) / len(inside_mean):.3f} (pixel values in [0, 1])")
    if colours:
        print(f"toy world: the colour the caption names is drawn in {sum(colours)} of {len(colours)} samples "
              f"({100 * sum(colours) / len(colours):.0f}%)")
    print(f"wrote {sum(counters.values())} anomalies ({', '.join(f'{d}: {n}' for d, n in counters.items())}) to {out}; preview: {out / 'preview.png'}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
