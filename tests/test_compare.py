"""docs/compare.py, which makes the paired tables of docs/results.md: a generator run as the unit, or
(category, downstream seed) for a base row that does not depend on the generator."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
import compare  # noqa: E402
from metrics import paired_difference  # noqa: E402


def _result(base, new):
    """An evaluate.py result of two rows, one value of every downstream metric per downstream seed."""
    row = lambda values: {"per_seed": {str(d): {"segmentation": {"pixel_ap": v, "pixel_au_pro": v, "image_auroc": v},
                                                "classification": {"accuracy": v}} for d, v in enumerate(values)}}
    return {"base": row(base), "new": row(new)}


def _pooled_new_cell(capsys, flag, paths):
    compare.methods_against([str(p) for p in paths], "base", by_seed=flag)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| pooled | new |"))
    return line.split(" | ")[2]   # the pixel AP cell


def test_by_seed_pairs_a_generator_free_base_once_per_category_and_downstream_seed(tmp_path, capsys):
    """Two categories x two generator runs x two downstream seeds; the base row repeats across a category's runs
    (it does not depend on the generator). By run: 4 units, each run's mean over its seeds. By seed: 4 units
    (category, seed), the new row averaged over the category's runs; the base counted once."""
    base = {"a": [0.50, 0.60], "b": [0.70, 0.90]}
    new = {("a", 0): [0.55, 0.70], ("a", 1): [0.65, 0.60], ("b", 0): [0.80, 0.90], ("b", 1): [0.70, 1.00]}
    paths = []
    for (c, s), values in new.items():
        paths.append(tmp_path / f"{c}-s{s}.json")
        paths[-1].write_text(json.dumps(_result(base[c], values)))
    by_run = [(sum(base[c]) / 2, sum(v) / 2) for (c, _), v in new.items()]
    by_seed = [(base[c][d], (new[c, 0][d] + new[c, 1][d]) / 2) for c in "ab" for d in (0, 1)]
    for flag, pairs in ((False, by_run), (True, by_seed)):
        n, mean, (low, high) = paired_difference([100 * b for b, _ in pairs], [100 * x for _, x in pairs])
        assert n == 4
        assert f"vs base {mean:+.1f} [{low:+.1f}, {high:+.1f}] (n=4)" in _pooled_new_cell(capsys, flag, paths)
