"""Label noise as a cause (docs/results.md): does the segmenter learn less from generated anomalies that do not
show what they are labelled? Of a generated folder (sample.py's layout), keep the faithful anomalies, those the toy
checks pass: the judge (toy_checks.train_judge) names their defect type and, where the caption names a colour, the
mask shows it (toy.drawn_colour). Beside them, as many per defect type drawn at random from all of them, at the
folder's own rate of unfaithful ones. evaluate.py then trains `real+axf` on each; the two differ only in the
filter, not in the count.

    python docs/faithful_subset.py --category bottle --generated samples/attention_levels/bottle-level1-s0/bottle \
        --out samples/label_noise --name bottle-level1-s0 --seed 0

writes <out>/<name>-faithful/<category> and <out>/<name>-random/<category> in sample.py's layout (test/<defect>/,
ground_truth/<defect>/, prompt/<defect>/: copies of the kept files) and prints the counts. docs/label_noise.sh runs
it and evaluate.py over generator runs.
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import evaluate  # noqa: E402
import toy  # noqa: E402
import toy_checks  # noqa: E402


def faithful(judge, anomalies, images, masks, defect_indices):
    """Per anomaly: the judge names its defect type and, where its caption names a colour, the mask shows it."""
    with torch.no_grad():
        named = judge(images).argmax(1) == defect_indices
    return [bool(ok) and (toy.caption_colour(a.caption) is None
                          or toy.drawn_colour(image, mask) == toy.caption_colour(a.caption))
            for a, image, mask, ok in zip(anomalies, images, masks, named)]


def equal_count_draw(defects, keep, generator):
    """Indices drawn at random from all anomalies, per defect type as many as `keep` holds of that type."""
    drawn = []
    for d in sorted(set(defects)):
        of_type = [i for i, x in enumerate(defects) if x == d]
        wanted = sum(keep[i] for i in of_type)
        drawn += [of_type[j] for j in torch.randperm(len(of_type), generator=generator)[:wanted].tolist()]
    return sorted(drawn)


def copy_anomalies(anomalies, folder):
    """The chosen anomalies' image, mask and caption files, in sample.py's layout, into a fresh folder."""
    if folder.exists():
        shutil.rmtree(folder)
    for a in anomalies:
        for sub, files in (("test", [a.image]), ("ground_truth", a.mask_files)):
            (folder / sub / a.defect).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, folder / sub / a.defect / f.name)
        (folder / "prompt" / a.defect).mkdir(parents=True, exist_ok=True)
        (folder / "prompt" / a.defect / f"{a.image.stem}.txt").write_text(a.caption + "\n", encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", required=True, choices=toy.TOY_CATEGORIES)
    parser.add_argument("--generated", required=True, help="a sample.py folder of the toy category")
    parser.add_argument("--out", required=True, help="the folder the two subsets go in")
    parser.add_argument("--name", required=True, help="the subsets' name: <out>/<name>-faithful, <name>-random")
    parser.add_argument("--seed", type=int, default=0, help="the random subset's draw")
    args = parser.parse_args(argv)
    category = data.load_category(toy.ensure_toy(args.category))
    eval_config = evaluate.resolve_eval_config("toy")   # the judge evaluate.py --toy uses, kept on disk
    judge = toy_checks.train_judge(category, eval_config, torch.device("cpu"))
    anomalies = data.load_generated(args.generated)
    images, masks, defect_indices = data.read_anomalies(anomalies, category.defects, eval_config["image_size"])
    keep = faithful(judge, anomalies, images, masks, defect_indices)
    chosen = {"faithful": [i for i, k in enumerate(keep) if k],
              "random": equal_count_draw([a.defect for a in anomalies], keep, torch.Generator().manual_seed(args.seed))}
    for kind, indices in chosen.items():
        copy_anomalies([anomalies[i] for i in indices], Path(args.out) / f"{args.name}-{kind}" / args.category)
    per_type = {d: f"{sum(keep[i] for i, a in enumerate(anomalies) if a.defect == d)}/"
                   f"{sum(a.defect == d for a in anomalies)}" for d in category.defects}
    print(f"{args.name}: faithful {sum(keep)}/{len(keep)} ({per_type}); random subset as many per type")
    return keep, chosen


if __name__ == "__main__":
    main()
