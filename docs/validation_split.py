"""A validation folder to choose a recipe on (masks, normals, counts, guidance) without the test set
(data.validation_split): the category's few-shot anomalies alone, and its normal training images with every fifth
held as test/good. Its own few-shot split trains the generator on a third of the few-shot anomalies and holds out
the other two thirds, which evaluate.py scores; the held-out anomalies and the test images are never copied.

    python docs/validation_split.py --category bottle --toy --out data/validation
    python train.py --category bottle --data_root data/validation --preset toy --out_dir runs/validation/bottle
    python sample.py --category bottle --data_root data/validation --ckpt runs/validation/bottle --out_dir samples/validation/bottle
    python evaluate.py --category bottle --data_root data/validation --preset toy --generated samples/validation/bottle
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import toy  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", required=True, help="the category's folder name")
    parser.add_argument("--toy", action="store_true", help="the built-in toy world's category")
    parser.add_argument("--data_root", default="data/mvtec", help="folder holding <category>/ in MVTec layout")
    parser.add_argument("--out", required=True, help="the folder <category>/ is written in")
    args = parser.parse_args(argv)
    category = data.load_category(toy.ensure_toy(args.category) if args.toy else Path(args.data_root) / args.category)
    folder = data.validation_split(category, args.out)
    made = data.load_category(folder)
    fit, validation = data.few_shot_split(made.anomalies)
    print(f"wrote {folder}: the generator trains on {len(fit)} anomalies, {len(validation)} validate; "
          f"{len(made.train_good)} normal training images, {len(made.test_good)} held as test/good")
    return folder


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
