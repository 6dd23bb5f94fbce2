"""sample.py's masks, measured against the few-shot masks they come from: the default (a few-shot mask under a small
jitter) and --masks learned (a shape between two few-shot masks of the type, mixed by the run's stage-2 mask
autoencoder, at the place of the first: data.mixed_mask). Per defect type, for each kind of mask:

  nearest IoU   the largest IoU of a mask with any few-shot mask of the category, at their places (1: a copy)
  type          the share of masks whose most overlapping mask (IoU) among other toy worlds' real anomalies (the toy
                judge's worlds 1-5, which no run trains on) is of the type the mask was drawn for: a
                nearest-neighbour mask classifier that never saw the few-shot masks
  spread        the mean IoU of two masks of the type (lower: more varied shapes and places)
  area          the mean area in pixels

and a picture: per defect type a row of few-shot masks, then a row of learned ones.

    python docs/learned_masks.py --category bottle --run runs/bottle --n 48 --picture docs/learned_masks_bottle.png
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import sample  # noqa: E402
import toy  # noqa: E402


def iou_matrix(a, b):
    """IoU of every mask of a [N, 1, S, S] with every mask of b [M, 1, S, S]: [N, M]."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    return inter / (a.sum(1)[:, None] + b.sum(1)[None] - inter).clamp(min=1)


def drawn_masks(category, few_shot, kind, n, seed, size, autoencoder):
    """The masks sample.py would draw with --masks kind (its plan, the same generator): {defect: [n, 1, S, S]}."""
    args = argparse.Namespace(defect=None, n=n, similar_normals=10, masks=kind, jitter="small", prompt=None)
    jobs = sample.plan(category, few_shot, args, size, torch.Generator().manual_seed(seed), autoencoder)
    return {d: torch.stack([job[3] for job in jobs if job[0] == d]) for d in category.defects}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", required=True)
    parser.add_argument("--run", required=True, help="train.py's --out_dir (its mask_ae.pt mixes the masks)")
    parser.add_argument("--data_root", default=str(toy.TOY_ROOT))
    parser.add_argument("--n", type=int, default=48, help="masks per defect type and kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--picture", help="a PNG: per defect type a row of few-shot masks and a row of learned ones")
    args = parser.parse_args()
    size = 64
    category = data.load_category(toy.ensure_toy(args.category, Path(args.data_root), seed=0))
    few_shot, _ = data.few_shot_split(category.anomalies)
    autoencoder = sample.mask_autoencoder(Path(args.run) / "axf.pt", {"image_size": size})
    few = {d: torch.stack([data.read_mask(a, size) for a in few_shot if a.defect == d]) for d in category.defects}
    all_few = torch.cat(list(few.values()))
    others = [a for world in range(1, 6) for a in data.load_category(toy.ensure_toy(
        args.category, Path(args.data_root) / "judge" / f"seed{world}", seed=world)).anomalies]
    reference = torch.stack([data.read_mask(a, size) for a in others])
    reference_types = [category.defects.index(a.defect) for a in others]
    kinds = {"few-shot": few,
             "jittered (default)": drawn_masks(category, few_shot, "real", args.n, args.seed, size, None),
             "learned": drawn_masks(category, few_shot, "learned", args.n, args.seed, size, autoencoder)}
    print(f"{args.category}, {args.run}: {args.n} masks per type and kind; the classifier's references: "
          f"{len(others)} masks of 5 other toy worlds\n")
    print("| defect | masks | n | nearest IoU with a few-shot mask | type (nearest other-world mask) | spread (mean "
          "IoU of two) | area (px) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for t, defect in enumerate(category.defects):
        for kind, masks in kinds.items():
            m = masks[defect]
            nearest = iou_matrix(m, all_few)
            if kind == "few-shot":  # itself excluded
                nearest[torch.arange(len(m)), [sum(len(few[d]) for d in category.defects[:t]) + i
                                               for i in range(len(m))]] = 0
            typed = [reference_types[j] for j in iou_matrix(m, reference).argmax(1).tolist()]
            pairs = iou_matrix(m, m)[~torch.eye(len(m), dtype=torch.bool)]
            print(f"| {defect} | {kind} | {len(m)} | {nearest.max(1).values.mean():.2f} | "
                  f"{100 * sum(x == t for x in typed) / len(m):.0f}% | {pairs.mean():.2f} | "
                  f"{m.flatten(1).sum(1).mean():.0f} |")
    if args.picture:
        rows = []
        for defect in category.defects:
            for kind in ("few-shot", "learned"):
                rows.append([m.expand(3, -1, -1) for m in kinds[kind][defect][:8]])
        data.save_grid(rows, Path(args.picture))
        print(f"\npicture: {args.picture} (per defect type, {', '.join(category.defects)}: a row of few-shot "
              f"masks, then a row of learned ones)")


if __name__ == "__main__":
    main()
