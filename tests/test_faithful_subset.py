"""docs/faithful_subset.py, the label-noise comparison's two subsets of a generated folder: the faithful anomalies,
and as many per defect type drawn at random from all."""
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
import faithful_subset  # noqa: E402
import toy  # noqa: E402
from data import Anomaly  # noqa: E402


class FixedJudge(nn.Module):
    """Names the defect types it is given, whatever the image."""
    def __init__(self, named):
        super().__init__()
        self.named = torch.tensor(named)

    def forward(self, images):
        return nn.functional.one_hot(self.named, 3).float()


def test_faithful_needs_the_judge_to_name_the_type_and_the_mask_to_show_the_captions_colour():
    """Four anomalies, each 8x8 painted one toy colour inside its mask: a red one captioned red (kept), a red one
    captioned blue (colour wrong), one captioned with no colour (kept on the type alone), one the judge misnames."""
    colours = ["red", "red", "green", "blue"]
    captions = ["A red spot is on the pill", "A blue spot is on the pill", "The pill has a crack on its left half",
                "A blue spot is on the pill"]
    images = torch.stack([torch.tensor(toy.TOY_COLOURS[c], dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 8, 8)
                          for c in colours])
    masks = torch.ones(4, 1, 8, 8)
    anomalies = [Anomaly(Path(f"{i}.png"), (), caption, "color") for i, caption in enumerate(captions)]
    keep = faithful_subset.faithful(FixedJudge([0, 0, 1, 2]), anomalies, images, masks, torch.tensor([0, 0, 1, 0]))
    assert keep == [True, False, True, False]


def test_the_random_subset_has_the_faithful_count_of_each_type_drawn_from_all_of_that_type():
    defects = ["a"] * 10 + ["b"] * 6
    keep = [i % 3 != 0 for i in range(10)] + [True, False, False, True, True, False]
    for seed in range(5):
        drawn = faithful_subset.equal_count_draw(defects, keep, torch.Generator().manual_seed(seed))
        assert len(set(drawn)) == len(drawn)
        for d in "ab":
            assert sum(defects[i] == d for i in drawn) == sum(k for k, x in zip(keep, defects) if x == d)
    draws = {tuple(faithful_subset.equal_count_draw(defects, keep, torch.Generator().manual_seed(s))) for s in range(5)}
    assert len(draws) > 1   # a draw, not the faithful ones themselves
