"""docs/compare.py, which makes the paired tables of docs/results.md: a generator run as the unit, or
(category, downstream seed) for a base row that does not depend on the generator."""
import json
import sys
from pathlib import Path

import pytest

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


def test_a_runs_files_in_two_folders_join_their_downstream_seeds_and_must_agree_where_both_hold_one(tmp_path, capsys):
    """Seeds 0,1 of both rows in one folder, seeds 2,3 of `new` and `base` in another: the run has four seeds of
    each; a row with only seeds 0,1 (`old`) is left out of the table; a seed two files hold with other values
    stops the comparison naming the file."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    one = _result([0.5, 0.6], [0.7, 0.8])
    one["old"] = one["base"]
    (first / "a-s0.json").write_text(json.dumps(one))
    (second / "a-s0.json").write_text(json.dumps({name: {"per_seed": {str(d + 2): v["per_seed"][str(d)]
                                                                      for d in (0, 1)}}
                                                  for name, v in _result([0.4, 0.3], [0.9, 1.0]).items()}))
    compare.methods_against([str(first / "a-s0.json"), str(second / "a-s0.json")], "base")
    out = capsys.readouterr().out
    assert "| old |" not in out
    n, mean, (low, high) = paired_difference([50, 60, 40, 30], [70, 80, 90, 100])
    assert f"vs base {mean:+.1f} [{low:+.1f}, {high:+.1f}] (n=4)" in out
    clash = _result([0.5, 0.6], [0.7, 0.81])
    (second / "a-s0.json").write_text(json.dumps(clash))
    with pytest.raises(ValueError, match="a-s0.json: new at downstream seed 1 differs"):
        compare.methods_against([str(first / "a-s0.json"), str(second / "a-s0.json")], "base")


def test_rows_named_by_file_read_the_real_plus_generated_row_where_a_run_has_no_generated_row_alone(tmp_path, capsys):
    """<category>-<row>-s<seed>.json files of evaluate.py runs with only `real+axf` and no control checks (a
    folder without its generator: docs/label_noise.sh): the pixel AP of the two rows, paired by generator seed, is
    that row's; a run with `axf` reads `axf`."""
    values = {"random": [0.80, 0.70, 0.90], "faithful": [0.85, 0.72, 0.89]}
    for row, per_seed in values.items():
        for s, v in enumerate(per_seed):
            result = {"real+axf": {"segmentation": {"pixel_ap": v, "pixel_au_pro": v}}, "real": {"segmentation": {
                "pixel_ap": 0.0, "pixel_au_pro": 0.0}}, "toy_checks": {"colour_named_is_drawn": None,
                                                                          "defect_type_recognised": None,
                                                                          "control": None}}
            if row == "faithful" and s == 0:   # a run with the generated row alone: that one is read
                result["axf"] = {"segmentation": {"pixel_ap": 0.95, "pixel_au_pro": 0.95}}
                values[row][0] = 0.95
            (tmp_path / f"bottle-{row}-s{s}.json").write_text(json.dumps(result))
    compare.main(tmp_path, ["random", "faithful"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| pixel AP | bottle |"))
    n, mean, (low, high) = paired_difference([100 * v for v in values["random"]], [100 * v for v in values["faithful"]])
    assert f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] (n=3)" in line
