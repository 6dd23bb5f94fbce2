"""Rows of toy runs side by side: each metric's mean, sample std (ddof=1) and n per category and row, and the
paired difference between successive rows (the same categories and seeds) with its 95% interval.

    python docs/compare.py results/mask_channel on off          # rows named in the result files
    python docs/compare.py results/table6 none text text+mif text+ddf all
    python docs/compare.py results/label_noise random faithful  # real+axf rows where a run has no axf row
    python docs/compare.py --pairs text:text+mif,text:text+ddf results/table6 text text+mif text+ddf  # chosen pairs
    python docs/compare.py --methods out/evaluate_bottle.json real   # one evaluate.py JSON: each method against
                                                                     # `real`, paired by downstream seed
    python docs/compare.py --methods results/downstream/*.json real  # several (one per generator run, named
        # <category>-s<seed>.json): each run's mean over its downstream seeds, paired by run, per category and pooled
    python docs/compare.py --chain results/counts/merged/*.json real  # each row against the one before it
    python docs/compare.py --by_seed results/downstream/*.json real  # paired by (category, downstream seed), each
        # row's mean over the category's runs: for a base that does not depend on the generator
    python docs/compare.py --by_seed results/a/*.json results/b/*.json real  # a run's files in several folders
        # (the same name): their downstream seeds joined; only rows that have every seed of the base are shown

Reads <dir>/<category>-<row>-s<seed>.json (evaluate.py --toy) and, for the mean |generated - normal| inside
the masks, sample.py's line in runs/<name>/<category>/<row>-s<seed>/log.txt. Prints a markdown table.
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metrics import mean_std, paired_difference  # noqa: E402

METRICS = {  # name -> value of one run's result (a fraction in [0, 1]) or None where the run lacks it
    "colour drawn (recall)": lambda r, log: r["toy_checks"]["colour_named_is_drawn"],
    "defect type (recall)": lambda r, log: r["toy_checks"]["defect_type_recognised"],
    "colour drawn (control)": lambda r, log: (r["toy_checks"].get("control") or {}).get("colour_named_is_drawn"),
    "defect type (control)": lambda r, log: (r["toy_checks"].get("control") or {}).get("defect_type_recognised"),
    "pixel AP": lambda r, log: generated_row(r, "pixel_ap"),
    "pixel AU-PRO": lambda r, log: generated_row(r, "pixel_au_pro"),
    "mean abs change inside": lambda r, log: inside_change(log),
}


def generated_row(result, metric):
    """A segmentation metric of the row trained on the generated anomalies: `axf` alone, else `real+axf` (the real
    few with the generated ones in extra slots); None where the run has neither."""
    row = result.get("axf", result.get("real+axf"))
    return row["segmentation"][metric] if row else None


def inside_change(log):
    found = re.findall(r"mean \|generated - normal\| = ([\d.]+)", log)
    return float(found[-1]) if found else None


def runs(folder, category, row):
    """{seed: {metric: value}} of the finished runs of one category and row."""
    found = {}
    for path in folder.glob(f"{category}-{row}-s*.json"):
        seed = int(path.stem.rsplit("-s", 1)[1])
        log = Path("runs") / folder.name / category / f"{row}-s{seed}" / "log.txt"
        result, text = json.loads(path.read_text()), log.read_text() if log.exists() else ""
        found[seed] = {name: get(result, text) for name, get in METRICS.items()}
    return found


def cell(values, scale, digits):
    n, mean, std = mean_std([scale * v for v in values])
    if std is None or round(std, digits) == 0:  # one run, or runs that agree to the digits shown
        return f"{mean:.{digits}f} (n={n}" + (", all equal)" if n > 1 else ")")
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def difference(a, b, scale, digits):
    n, mean, interval = paired_difference([scale * v for v in a], [scale * v for v in b])
    if interval is None:
        return f"{mean:+.{digits}f} (n=1)"
    if n < 3:  # two pairs: an interval from one degree of freedom, zero-wide where both differ alike
        return f"{mean:+.{digits}f} [{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}] (n={n}): too few pairs to say"
    verdict = "not distinguishable" if interval[0] <= 0 <= interval[1] else "higher" if mean > 0 else "lower"
    return f"{mean:+.{digits}f} [{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}] (n={n}): {verdict}"


def main(folder, rows, pairs=None):
    """pairs: the (row, row) differences shown; default: successive rows."""
    folder = Path(folder)
    pairs = pairs or list(zip(rows, rows[1:]))
    categories = sorted({p.name.split("-")[0] for p in folder.glob("*-s*.json")})
    table = {(c, row): runs(folder, c, row) for c in categories for row in rows}
    print(f"| metric | category | {' | '.join(rows)} | " + " | ".join(f"{a} → {b}" for a, b in pairs) + " |")
    print("| --- " * (2 + len(rows) + len(pairs)) + "|")
    for name in METRICS:
        scale, digits = (1, 3) if name.startswith("mean abs") else (100, 1)  # pixel values, or percent
        for c in categories + ["pooled"] * (len(categories) > 1):
            cs = categories if c == "pooled" else [c]
            # a category's runs, as (category, seed) -> value, where the value exists
            per_row = [{(k, s): v[name] for k in cs for s, v in table[k, row].items() if v[name] is not None}
                       for row in rows]
            if not any(per_row):
                continue
            cells = [cell(list(r.values()), scale, digits) if r else "" for r in per_row]
            diffs = []
            for a, b in ((per_row[rows.index(x)], per_row[rows.index(y)]) for x, y in pairs):
                shared = sorted(a.keys() & b.keys())
                diffs.append(difference([a[k] for k in shared], [b[k] for k in shared], scale, digits) if shared else "")
            print(f"| {name} | {c} | " + " | ".join(cells + diffs) + " |")


DOWNSTREAM = {"pixel AP": ("segmentation", "pixel_ap"), "pixel AU-PRO": ("segmentation", "pixel_au_pro"),
              "image AUROC": ("segmentation", "image_auroc"), "accuracy": ("classification", "accuracy")}


def category_of(run):
    """A run's category: its file name's part before the first "-" (<category>-s<seed>.json)."""
    return run.split("-")[0]


def merge_seeds(into, result, path):
    """Add an evaluate.py result's rows to `into`, row by row and downstream seed by seed; a seed two files both
    hold must agree."""
    for name, row in result.items():
        if not (isinstance(row, dict) and "per_seed" in row):
            continue
        have = into.setdefault(name, {"per_seed": {}})["per_seed"]
        for seed, value in row["per_seed"].items():
            if have.setdefault(seed, value) != value:
                raise ValueError(f"{path}: {name} at downstream seed {seed} differs from another file's")


def methods_against(paths, base, chain=False, by_seed=False):
    """The rows of evaluate.py results against their row `base`. One file: mean ± sample std over its downstream
    seeds and the paired difference (the same seed trains both) with its 95% interval. Several files (one per
    generator run): the unit is the run, valued by its mean over its downstream seeds, so that the spread and the
    interval include the generator's seed; per category (the name's part before the first "-") and pooled. With
    chain, each row against the row before it (the files' order of rows) instead of against `base`.

    by_seed: the unit is (category, downstream seed), each row valued by its mean over the category's generator
    runs, for a base that does not depend on the generator (real, real+aug, real+crop_paste): paired by run, its
    value would count once per run though the runs of a category share it, and the interval would be too narrow."""
    results = {}
    for path in paths:  # one run's files in several folders (the same name): their downstream seeds joined
        merge_seeds(results.setdefault(Path(path).stem, {}), json.loads(Path(path).read_text()), path)
    seeds = lambda result, name: set(result.get(name, {}).get("per_seed", {}))
    # the rows every run has at every downstream seed of the base, in the order the files name them
    names = dict.fromkeys(name for result in results.values() for name in result)
    rows = [name for name in names if all(seeds(r, base) <= seeds(r, name) for r in results.values())]
    categories = sorted({category_of(run) for run in results})

    def values(runs_of, name, part, key):  # the group's values of a method, one per unit
        per_run = [[results[r][name]["per_seed"][s][part][key] for s in sorted(results[r][base]["per_seed"])]
                   for r in runs_of]
        if len(results) == 1:
            return per_run[0]
        if not by_seed:
            return [sum(v) / len(v) for v in per_run]
        units = []
        for c in sorted({category_of(r) for r in runs_of}):
            of_c = [v for r, v in zip(runs_of, per_run) if category_of(r) == c]
            units += [sum(v[i] for v in of_c) / len(of_c) for i in range(len(of_c[0]))]
        return units

    groups = [(c, [r for r in results if category_of(r) == c]) for c in categories]
    if len(results) > 1 and len(categories) > 1:
        groups.append(("pooled", list(results)))
    print("| category | method | " + " | ".join(DOWNSTREAM) + " |\n" + "| --- " * (len(DOWNSTREAM) + 2) + "|")
    for category, runs_of in groups:
        for i, name in enumerate(rows):
            against = rows[i - 1] if chain and i > 0 else None if chain else base
            cells = []
            for part, key in DOWNSTREAM.values():
                run_values = values(runs_of, name, part, key)
                text = cell(run_values, 100, 1)
                if against not in (None, name):
                    base_values = values(runs_of, against, part, key)
                    text += f"; vs {against} " + difference(base_values, run_values, 100, 1)
                cells.append(text)
            print(f"| {category} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1] == "--methods":
        methods_against(sys.argv[2:-1], sys.argv[-1])
    elif sys.argv[1] == "--by_seed":  # --by_seed FILE ... BASE: units (category, downstream seed)
        methods_against(sys.argv[2:-1], sys.argv[-1], by_seed=True)
    elif sys.argv[1] == "--chain":  # --chain FILE ... FIRST_ROW: each row against the one before it
        methods_against(sys.argv[2:-1], sys.argv[-1], chain=True)
    elif sys.argv[1] == "--pairs":  # --pairs text:text+mif,text:text+ddf FOLDER ROW ...
        main(sys.argv[3], sys.argv[4:], [tuple(pair.split(":")) for pair in sys.argv[2].split(",")])
    else:
        main(sys.argv[1], sys.argv[2:])
