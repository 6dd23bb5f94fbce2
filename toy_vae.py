"""A VAE pretrained on the toy world: the frozen autoencoder AnomalyXFusion's latent diffusion assumes.

The paper works in the latent space of Stable Diffusion's autoencoder (kl-f8), which was trained once, on a large
generic image set, and is frozen for everything built on it: AnomalyXFusion never trains a VAE. The toy preset
does the same with this file's VAE, made here once and shipped (toy_vae.pt.gz): train.py's own stage 1, the same
network, loss and batches (half normal images, half of them with a blob of a random colour; half anomalies whose
defect pixels weigh 10x), run on many toy worlds of every toy category instead of one category's training set:

    python toy_vae.py --out toy_vae.pt.gz          # the shipped file: about 25 minutes on one core
    python toy_vae.py --measure toy_vae.pt.gz      # its reconstruction error on toy world 0's few-shot anomalies

  1. data    toy_clip.load_world: toy worlds 1..--seeds of bottle, cable and pill (40 normal images and every
             anomaly of each), the same cache the toy CLIP was made from. Toy world 0, the one train.py --toy
             trains and evaluates on, is never seen.
  2. train   train.py's train_vae on them, the categories drawn evenly (train.draw_balanced), with its
             checkpoints in --work_dir (a killed run resumes)
  3. file    the state dict in fp16, gzip-compressed; train.py --vae_weights toy (the toy preset's default) reads it
             and measures the latent scale factor on the category it trains, as stage 1 does at its end

Depends on train.py (stage 1), toy_clip.py (the worlds), config.py, files.py and toy.py.
"""
import argparse
import time
from pathlib import Path

import torch

import axf
import config as config_table
import data
import files
import toy
import toy_clip
import train as train_script

SHIPPED = toy.TOY_VAE


def training_set(world):
    """toy_clip's world as train.py's training-set dict (the parts stage 1 reads), stored category after category
    as train.draw_balanced expects."""
    names = sorted(set(world["categories"]))
    by = {(c, a): [i for i, (n, t) in enumerate(zip(world["categories"], world["captions"])) if n == c and bool(t) == a]
          for c in names for a in (False, True)}
    normal_idx = [i for c in names for i in by[c, False]]
    anomaly_idx = [i for c in names for i in by[c, True]]
    images = world["images"].float() / 255
    return {"categories": {c: [] for c in names}, "normals": images[normal_idx], "images": images[anomaly_idx],
            "masks": world["masks"][anomaly_idx].float(),
            "num_normals": [len(by[c, False]) for c in names], "num_anomalies": [len(by[c, True]) for c in names]}


def save_toy_vae(vae, path):
    """The VAE's state dict (its latent scale factor included) in fp16, gzip-compressed, the same bytes each time."""
    return files.save_gzipped({k: v.detach().half().clone() for k, v in vae.state_dict().items()}, path)


@torch.no_grad()
def measure(vae, folders, size=64):
    """Mean L1 (in [0, 1] pixels) of vae's reconstructions of each category folder's few-shot anomalies, inside
    their masks and outside: what the diffusion model can draw is at best what the decoder gives back."""
    figures = {}
    for name, folder in folders.items():
        few_shot = data.few_shot_split(data.load_category(folder).anomalies)[0]
        x = torch.stack([data.read_image(a.image, size) for a in few_shot])
        m = torch.stack([data.read_mask(a, size) for a in few_shot])
        error = ((vae.decode(vae.encode(x * 2 - 1).mode()) + 1) / 2 - x).abs().mean(1, keepdim=True)
        figures[name] = ((error * m).sum() / m.sum()).item(), ((error * (1 - m)).sum() / (1 - m).sum()).item()
    return figures


def print_figures(vae, where):
    """measure() on toy world 0, the one train.py --toy trains on (never seen by the shipped file)."""
    for name, (inside, outside) in measure(vae.eval(), {c: toy.ensure_toy(c) for c in toy.TOY_CATEGORIES}).items():
        print(f"{where}: toy world 0, {name}: L1 inside the few-shot masks {inside:.4f}, outside {outside:.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED), help="the gzip-compressed VAE file to write")
    parser.add_argument("--measure", default="", help="only measure this file (a .pt.gz of this script, or a "
                                                      "train.py vae.pt)")
    parser.add_argument("--seeds", type=int, default=16, help="train on toy worlds 1..N of every category")
    parser.add_argument("--steps", type=int, default=1000, help="steps per category (train.py's --vae_steps)")
    parser.add_argument("--work_dir", default="runs/toy_vae", help="stage 1's checkpoints (vae.pt) go here")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the batches")
    args = parser.parse_args(argv)
    config = config_table.resolve("toy", {"vae_steps": args.steps, "seed": args.seed, "vae_weights": "train"})
    if args.measure:
        vae = axf.build_vae(config)
        vae.load_state_dict(toy.read_toy_vae(args.measure) if args.measure.endswith(".gz") else
                            files.read_torch(args.measure)["model"])
        print_figures(vae, args.measure)
        return
    if args.seeds >= min(toy_clip.HELD_OUT_SEEDS):
        raise SystemExit(f"error: --seeds {args.seeds} would train on toy_clip's held-out worlds")
    torch.manual_seed(args.seed)
    train = training_set(toy_clip.load_world(range(1, args.seeds + 1)))
    print(f"toy_vae: {vars(args)}; {len(train['normals'])} normal images, {len(train['images'])} anomalies")
    start, work_dir = time.time(), Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    vae = train_script.train_vae(train, config, work_dir, torch.device("cpu"))
    path = save_toy_vae(vae, args.out)
    print(f"trained in {(time.time() - start) / 60:.1f} min; wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    print_figures(vae, path)


if __name__ == "__main__":
    main()
