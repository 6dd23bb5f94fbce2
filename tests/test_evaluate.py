"""evaluate.py: metric parity with scikit-learn and the reference LPIPS (fixtures), IS and IC-LPIPS
invariants, the baselines' anomalies, and the downstream pipeline end to end on a tiny MVTec tree."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import data
import toy
import toy_checks
import evaluate as E
import metrics as M

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ("ties", "continuous", "all_tied", "tiny", "int_scores", "informative")


def seeded_vgg16_features(features, seed=1234):
    """Copy of make_metric_fixtures.seeded_vgg16_features (the fixture's checksum ties the two together)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in features:
            if isinstance(layer, nn.Conv2d):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.01)
    return sum(float(p.double().sum()) for p in features.parameters())


@pytest.fixture(scope="module")
def lpips():
    model = E.LPIPS()
    info = json.loads((FIXTURES / "metric_versions.json").read_text())
    assert seeded_vgg16_features(model.features) == pytest.approx(info["vgg_checksum"], rel=1e-9)
    return model


# ---------------------------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("case", CASES)
def test_metrics_match_sklearn_with_ties(case):
    """AUROC, AP and F1-max equal scikit-learn's on arrays full of ties (numpy and torch inputs)."""
    f = np.load(FIXTURES / "metric_sklearn.npz")
    scores, labels, expected = f[f"{case}_scores"], f[f"{case}_labels"], f[f"{case}_expected"]
    for s, y in ((scores, labels), (torch.from_numpy(scores), torch.from_numpy(labels))):
        got = [E.auroc(s, y), E.average_precision(s, y), E.f1_max(s, y)]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_metrics_on_a_perfect_and_a_reversed_ranking():
    """A score that separates the classes gets 1 everywhere; reversed, AUROC is 0."""
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9], dtype=np.float32)
    assert (E.auroc(scores, labels), E.average_precision(scores, labels), E.f1_max(scores, labels)) == (1.0, 1.0, 1.0)
    assert E.auroc(-scores, labels) == 0.0


def test_metrics_reject_bad_input_with_one_line():
    """Mismatched lengths and a single class are user errors that must say what is wrong."""
    with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
        E.auroc(np.zeros(3), np.array([0, 1]))
    for metric in (E.auroc, E.average_precision, E.f1_max):
        with pytest.raises(ValueError, match="single class"):
            metric(np.random.rand(4), np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        E.f1_max(np.array([0.1, np.nan]), np.array([0, 1]))


def test_inception_score_bounds():
    """IS is 1 when every image gets the same prediction and C for C distinct confident classes."""
    same = torch.softmax(torch.randn(1, 7), 1).repeat(20, 1)
    mean, std = E.inception_score(same, splits=2)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, std = E.inception_score(torch.eye(5), splits=1)   # one-hot: 0 log 0 must not produce NaN
    assert mean == pytest.approx(5.0, rel=1e-12) and std == 0.0


def test_inception_score_needs_enough_images():
    with pytest.raises(ValueError, match="N >= splits=10"):
        E.inception_score(torch.eye(5), splits=10)


def test_inception_probs_feeds_299px_in_minus_one_one():
    """Inception-v3's TensorFlow weights expect 299x299 inputs in [-1, 1]; outputs are distributions."""
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            seen.append(x)
            return self.fc(x.mean((2, 3)))

    probs = E.inception_probs(Probe(), torch.rand(5, 3, 32, 32), batch_size=2)
    assert probs.shape == (5, 4) and torch.allclose(probs.sum(1), torch.ones(5))
    assert seen[0].shape[-2:] == (299, 299) and min(x.min() for x in seen) < -0.5 < 0.5 < max(x.max() for x in seen)


def test_missing_weight_files_are_named():
    for call, flag in ((lambda: E.load_inception("nope.pth", "cpu"), "--inception"),
                       (lambda: E.LPIPS("nope.pth"), "--vgg"), (lambda: E.build_resnet(3, "nope.pth"), "--resnet")):
        with pytest.raises(FileNotFoundError, match=f"nope.pth: .*{flag}"):
            call()


def test_resnet_weights_load_without_the_head(tmp_path):
    """An ImageNet ResNet-34 file starts the classifier (new head); another file is refused by name."""
    ref = E.build_resnet(1000)
    torch.save(ref.state_dict(), tmp_path / "r34.pth")
    model = E.build_resnet(3, tmp_path / "r34.pth")
    assert torch.equal(model.conv1.weight, ref.conv1.weight) and model.fc.out_features == 3
    torch.save({"conv1.weight": ref.conv1.weight}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: not a torchvision ResNet-34"):
        E.build_resnet(3, tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------------- LPIPS

def test_lpips_matches_reference_implementation(lpips):
    """Same backbone weights and the official linear layers: distances equal lpips 0.1.4's."""
    f = np.load(FIXTURES / "lpips_vgg_random.npz")
    images, pairs = torch.from_numpy(f["images"]), torch.from_numpy(f["pairs"])
    with torch.no_grad():
        d = lpips(images[pairs[:, 0]], images[pairs[:, 1]])
    np.testing.assert_allclose(d.numpy(), f["distances"], rtol=1e-4, atol=1e-6)


def test_lpips_is_symmetric_and_zero_on_identical_inputs(lpips):
    x, y = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(lpips(x, y), lpips(y, x), rtol=1e-5)
        assert torch.all(lpips(x, y) > 0) and torch.all(lpips(x, x) == 0)


def test_ic_lpips_matches_hand_computation():
    """Clusters by nearest centre, mean pairwise distance per cluster of >= 2, mean over clusters."""
    dist = lambda a, b: (a - b).abs().flatten(1).mean(1)   # a stand-in distance, values by hand
    centres = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    gen = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.2, 0.4, 0.9, 0.7)])
    # cluster 0: {0, 0.2, 0.4} -> pairs 0.2, 0.4, 0.2; cluster 1: {0.9, 0.7} -> 0.2
    assert E.ic_lpips(gen, centres, dist, batch_size=2) == pytest.approx(((0.8 / 3) + 0.2) / 2)
    with pytest.raises(ValueError, match="fewer|2 or more"):
        E.ic_lpips(gen[[0, 3]], centres, dist)   # two singleton clusters only


def test_ic_lpips_zero_for_identical_images_positive_otherwise(lpips):
    centres = torch.rand(2, 3, 16, 16)
    same = torch.rand(1, 3, 16, 16).repeat(2, 1, 1, 1)
    assert E.ic_lpips(same, centres, lpips) == 0.0
    assert E.ic_lpips(torch.rand(3, 3, 16, 16), centres[:1], lpips) > 0.0


class Probe(nn.Module):
    """A stand-in Inception: 3 'pool features' (the mean colour) and 3 classes from them, through .fc."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return 10 * self.fc(x.mean((2, 3)))


def test_generation_metrics_per_defect_type_and_their_mean(lpips):
    """IS, KID, FID and IC-LPIPS per defect type (KID and FID against that type's held-out real anomalies),
    and their means over the types."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(7, 3, 16, 16, generator=g)
    anomalies = (images, torch.ones(7, 1, 16, 16), torch.tensor([0, 0, 0, 0, 1, 1, 1]))
    held = torch.rand(6, 3, 16, 16, generator=g)
    probe = Probe()
    ctx = dict(defects=["a", "b"], real=(images[[0, 4]], torch.ones(2, 1, 16, 16), torch.tensor([0, 1])),
               held=(held, None, torch.tensor([0, 0, 0, 1, 1, 1])), held_features=E.inception_features(probe, held)[0])
    eval_config = dict(batch_size=4, is_splits=2, seed=0, kid_subsets=5)
    out = E.generation_metrics(anomalies, ctx, eval_config, "cpu", inception=probe, lpips=lpips)
    assert len(out["is"]) == 2 and out["is"][0] >= 1.0 and out["is"][1] >= 0.0
    expected = np.mean([E.ic_lpips(images[:4], images[[0]], lpips), E.ic_lpips(images[4:], images[[4]], lpips)])
    assert out["ic_lpips"] == pytest.approx(expected) and out["ic_lpips"] > 0
    fids = [E.fid(ctx["held_features"][3 * d:3 * d + 3], E.inception_features(probe, x)[0])
            for d, x in enumerate((images[:4], images[4:]))]
    assert out["fid"] == pytest.approx(np.mean(fids)) and out["per_defect"]["b"]["fid"] == pytest.approx(fids[1])
    assert out["kid"][0] == pytest.approx(np.mean([out["per_defect"][d]["kid"][0] for d in "ab"]))


def test_kid_and_fid_match_torchmetrics():
    """Same features, same subsets (seeded alike): torchmetrics' KernelInceptionDistance and
    FrechetInceptionDistance values (tests/fixtures/make_metric_fixtures.py) to 1e-4."""
    f = np.load(FIXTURES / "kid_fid_torchmetrics.npz")
    case = json.loads((FIXTURES / "metric_versions.json").read_text())["kid_fid"]
    got = E.kid(f["real_features"], f["fake_features"], case["subsets"], case["subset_size"],
                torch.Generator().manual_seed(case["seed"]))
    np.testing.assert_allclose(got, f["kid"], rtol=1e-4, atol=1e-6)
    assert E.fid(f["real_features"], f["fake_features"]) == pytest.approx(float(f["fid"]), rel=1e-4)


def test_kid_is_unbiased_and_fid_zero_on_one_set():
    """KID of two samples of one distribution averages near 0 (it may be negative: unbiased); FID(x, x) = 0;
    with fewer images than features FID still equals the eigenvalue formula."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    mean, std = E.kid(a, b, subsets=50, subset_size=100, generator=g)
    assert abs(mean) < 2 * std + 1e-3 and E.kid(a, b + 1, subsets=5, subset_size=100, generator=g)[0] > 10 * std
    assert E.fid(a, a) == pytest.approx(0.0, abs=1e-6) and E.fid(a, a + 1) == pytest.approx(8.0, rel=1e-6)
    x, y = torch.randn(12, 64, generator=g, dtype=torch.float64), torch.rand(9, 64, generator=g, dtype=torch.float64)
    s_x, s_y = torch.cov(x.T), torch.cov(y.T)   # fewer images than features: the direct formula, eigenvalues
    direct = (x.mean(0) - y.mean(0)).square().sum() + s_x.trace() + s_y.trace() - 2 * torch.linalg.eigvals(
        s_x @ s_y).sqrt().real.sum()
    assert E.fid(x, y) == pytest.approx(float(direct), rel=1e-6)


def _regions_by_flood_fill(mask):
    """Reference 8-connected labelling, written independently of metrics.connected_regions."""
    labels, n = np.zeros(mask.shape, int), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        stack = [start]
        labels[start] = n
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not labels[q]:
                        labels[q] = n
                        stack.append(q)
    return labels, n


def _au_pro_slow(maps, masks, limit=0.3):
    """AU-PRO the direct way: at every distinct threshold, the mean overlap of each ground-truth region and
    the false-positive rate; the curve from (0, 0), trapezoids up to the limit, interpolated at it."""
    regions = [(i, labels == k) for i, m in enumerate(masks) for labels, n in [_regions_by_flood_fill(m)]
               for k in range(1, n + 1)]
    good = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        points.append(((pred & good).sum() / good.sum(), np.mean([pred[i][r].mean() for i, r in regions])))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:   # cut the trapezoid at the limit
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_au_pro_matches_a_direct_per_threshold_computation():
    """Regions of very different sizes count equally; ties and a good image included; against a slow
    implementation with its own flood-fill labelling."""
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 2:12, 3:15] = True         # a big region
    masks[0, 18, 18] = masks[0, 19, 19] = True   # two diagonal pixels: one 8-connected region
    masks[1, 5:7, 20:23] = True          # a small one; image 2 is good
    maps = np.round(rng.random(masks.shape) * 0.6 + 0.4 * masks, 2)   # 2 decimals: many ties
    for limit in (0.3, 0.05, 1.0):
        assert E.au_pro(maps, masks, limit) == pytest.approx(_au_pro_slow(maps, masks, limit), abs=1e-9)
    labels = M.connected_regions(masks[:1])[0].numpy()
    assert len(np.unique(labels)) - 1 == _regions_by_flood_fill(masks[0])[1] == 2
    assert E.au_pro(masks.astype(float), masks) == pytest.approx(1.0)


def test_lpips_embedding_gives_the_same_distances_as_the_forward(lpips):
    """IC-LPIPS runs VGG once per image: |embed(x) - embed(y)|² is LPIPS(x, y)."""
    x, y = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose((lpips.embed(x) - lpips.embed(y)).pow(2).sum(1), lpips(x, y), rtol=1e-4)
    gen, centres = torch.rand(6, 3, 16, 16), torch.rand(2, 3, 16, 16)
    per_pair = E.ic_lpips(gen, centres, lambda a, b: lpips(a, b))   # a plain callable: VGG per pair
    assert E.ic_lpips(gen, centres, lpips) == pytest.approx(per_pair, rel=1e-4)


# ---------------------------------------------------------------------------------------------- downstream

def test_segmenter_keeps_the_image_size_and_focal_loss_reduces_to_cross_entropy():
    """The U-Net maps [B, 3, S, S] to two-class logits [B, 2, S, S]; gamma=0 focal loss is cross-entropy."""
    logits = E.SegmentationUNet(base=2)(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 2, 32, 32)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    ce = nn.functional.cross_entropy(logits, mask[:, 0].long())
    assert E.focal_loss(logits, mask, gamma=0.0).item() == pytest.approx(ce.item(), abs=1e-4)
    assert E.focal_loss(logits, mask).item() < ce.item()   # easy pixels are down-weighted


def test_baselines_change_only_the_masked_pixels():
    """DRAEM and crop-paste anomalies are normal images outside their (non-empty) masks, per defect counts."""
    g = torch.Generator().manual_seed(0)
    normals = torch.rand(4, 3, 32, 32)
    real_masks = torch.zeros(2, 1, 32, 32)
    real_masks[0, :, 2:6, 3:9] = 1
    real_masks[1, :, 20:30, 10:12] = 1
    real = (torch.rand(2, 3, 32, 32), real_masks, torch.tensor([0, 1]))
    counts = {0: 3, 1: 2}
    for images, masks, labels in (E.draem_anomalies(normals, counts, g, 32),
                                  E.crop_paste_anomalies(real, normals, counts, g),
                                  E.augmented_anomalies(real, counts, g)):
        assert images.shape == (5, 3, 32, 32) and masks.shape == (5, 1, 32, 32)
        assert labels.tolist() == [0, 0, 0, 1, 1] and torch.all(masks.flatten(1).sum(1) > 0)
    images, masks, _ = E.crop_paste_anomalies(real, normals, counts, g)
    for x, m in zip(images, masks):   # outside the mask, exactly one of the normal images
        assert any(torch.equal(x * (1 - m), n * (1 - m)) for n in normals)
    assert [m.sum().item() for m in masks] == [24] * 3 + [20] * 2   # pasted shapes keep their area


def _turns_and_flips(t):
    """The 8 turns by multiples of 90 degrees and flips of an image or mask [C, H, W]."""
    return [v.rot90(k, (1, 2)) for v in (t, t.flip(-1)) for k in range(4)]


def test_augmented_anomalies_turn_and_flip_the_mask_with_its_image():
    """Each aug anomaly is a real one of its type, flipped and/or turned by a multiple of 90 degrees (the mask
    exactly so), its pixels an affine brightness/contrast change of the same turned image within U(0.9, 1.1)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, 1:4, 2:9], masks[1, :, 9:15, 12:14] = 1, 1
    real = (torch.rand(2, 3, 16, 16) * 0.5 + 0.25, masks, torch.tensor([0, 1]))   # no clamping at 0 or 1
    images, aug_masks, labels = E.augmented_anomalies(real, {0: 6, 1: 6}, g)
    seen = set()
    for image, mask, d in zip(images, aug_masks, labels.tolist()):
        matches = [i for i, m in enumerate(_turns_and_flips(masks[d])) if torch.equal(m, mask)]
        assert matches, "the mask is not a turn or flip of its type's real mask"
        fits = []
        for i in matches:
            view = _turns_and_flips(real[0][d])[i]
            mean = view.mean()
            contrast = ((image - image.mean()) * (view - mean)).sum() / ((view - mean) ** 2).sum()
            brightness = (image.mean() / mean).item()
            fits.append(torch.allclose(image, (view - mean) * contrast + mean * brightness, atol=1e-5)
                        and 0.9 <= contrast <= 1.1 and 0.9 <= brightness <= 1.1)
        assert any(fits)
        seen.add(matches[0])
    assert len(seen) > 2   # several different turns and flips were drawn


def test_real_plus_a_method_sees_the_real_anomalies_exactly_as_real_does():
    """real+<method> keeps real's anomaly and normal slots draw for draw (the same seed) and adds the method's
    anomalies in extra slots of their own: real exposure is held constant, the method only adds."""
    eval_config = E.resolve_eval_config("toy", {"batch_size": 4, "seg_epochs": 2})
    real = (torch.rand(5, 3, 8, 8), torch.rand(5, 1, 8, 8), torch.arange(5) % 2)
    extra = (torch.rand(7, 3, 8, 8) + 2, torch.rand(7, 1, 8, 8) + 2, torch.arange(7) % 2)   # values > 1: told apart
    normals = torch.rand(6, 3, 8, 8) - 2
    alone = list(E.segmenter_batches(real, normals, eval_config, torch.Generator().manual_seed(3)))
    added = list(E.segmenter_batches(real, normals, eval_config, torch.Generator().manual_seed(3), extra,
                                     torch.Generator().manual_seed(9)))
    assert len(alone) == len(added) == 2 * 3   # 2 epochs of 6 normals / 2 a step
    for (x, y), (x2, y2) in zip(alone, added):
        assert torch.equal(x2[:4], x) and torch.equal(y2[:4], y)   # real's slots, unchanged
        assert x2.shape[0] == 6 and torch.all(x2[4:] >= 2) and torch.all(y2[4:] >= 2)   # + 2 extra slots
    for epoch in (added[:3], added[3:]):   # each epoch's 6 extra draws: 6 different of the 7 (a permutation)
        rows = torch.cat([x2[4:] for x2, _ in epoch])
        assert len({tuple(r.flatten()[:3].tolist()) for r in rows}) == 6
    ctx = {"normals": normals, "real": real, "defects": ["a", "b"]}
    sets = E.anomaly_sets(["real", "real+axf", "real+aug"], extra, ctx, eval_config)
    assert sets["real"][1] is None and sets["real+axf"][0] is real and sets["real+axf"][1] is extra
    assert sets["real+aug"][0] is real and len(sets["real+aug"][1][0]) == len(extra[0])   # aug at the same count


def test_real_plus_aug_plus_axf_mixes_half_real_half_generated_each_augmented_with_draws_of_its_own():
    """real+aug+axf's extra pool: per defect type as many as were generated, half of them (rounded down) the real
    few augmented and the rest the generated ones augmented (told apart by their mask values), each mask a turn or
    flip of one of its source's masks of that type; the pool is the same whichever rows run beside it, and the aug
    row is unchanged by it."""
    eval_config = E.resolve_eval_config("toy", {"batch_size": 4})
    real = (torch.rand(4, 3, 8, 8), torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]))            # masks < 1
    generated = (torch.rand(7, 3, 8, 8), torch.rand(7, 1, 8, 8) + 2, torch.tensor([0, 0, 0, 0, 0, 1, 1]))  # >= 2
    ctx = {"normals": torch.rand(6, 3, 8, 8), "real": real, "defects": ["a", "b"]}
    alone = E.anomaly_sets(["real+aug+axf"], generated, ctx, eval_config)["real+aug+axf"]
    beside = E.anomaly_sets(["real+aug", "real+aug+axf"], generated, ctx, eval_config)
    assert alone[0] is real and all(torch.equal(a, b) for a, b in zip(alone[1], beside["real+aug+axf"][1]))
    aug_only = E.anomaly_sets(["real+aug"], generated, ctx, eval_config)["real+aug"][1]
    assert all(torch.equal(a, b) for a, b in zip(aug_only, beside["real+aug"][1]))
    _, masks, labels = alone[1]
    from_real = masks.flatten(1).amax(1) < 1
    assert [int((labels == d).sum()) for d in (0, 1)] == [5, 2]                  # as many as generated per type
    assert [int((from_real & (labels == d)).sum()) for d in (0, 1)] == [2, 1]    # half of them real (5 // 2, 2 // 2)
    for mask, d, is_real in zip(masks, labels.tolist(), from_real.tolist()):
        source = real if is_real else generated
        same_type = torch.nonzero(source[2] == d).flatten()
        assert any(torch.equal(mask, v) for k in same_type for v in _turns_and_flips(source[1][k]))
    with pytest.raises(ValueError, match="real\\+aug\\+axf"):   # opt-in rows are named when refusing others
        E.main(["--toy", "--category", "bottle", "--generated", "nowhere", "--methods", "real,real+typo"])



def test_real_plus_crop_paste_plus_axf_pools_the_crop_paste_rows_very_anomalies_and_the_generated_ones():
    """real+crop_paste+axf's extra pool is the real+crop_paste row's pool followed by every generated anomaly,
    whether or not that row (or the draem and aug rows, which draw from the same generator after it) runs beside
    it; and it leaves their pools as they are without it."""
    eval_config = E.resolve_eval_config("toy", {"batch_size": 4, "image_size": 32})
    real = (torch.rand(4, 3, 32, 32), (torch.rand(4, 1, 32, 32) > 0.5).float(), torch.tensor([0, 0, 1, 1]))
    generated = (torch.rand(5, 3, 32, 32), torch.rand(5, 1, 32, 32) + 2, torch.tensor([0, 0, 0, 1, 1]))
    ctx = {"normals": torch.rand(6, 3, 32, 32), "real": real, "defects": ["a", "b"]}
    rows = ["real+crop_paste", "real+draem", "real+aug"]
    without = E.anomaly_sets(rows, generated, ctx, eval_config)
    beside = E.anomaly_sets(rows + ["real+crop_paste+axf"], generated, ctx, eval_config)
    alone = E.anomaly_sets(["real+aug", "real+crop_paste+axf"], generated, ctx, eval_config)
    pasted = without["real+crop_paste"][1]
    for sets in (beside, alone):
        anomalies, extra = sets["real+crop_paste+axf"]
        assert anomalies is real and len(extra[0]) == len(pasted[0]) + len(generated[0])
        assert all(torch.equal(e, torch.cat([p, g])) for e, p, g in zip(extra, pasted, generated))
    for row in rows:
        assert all(torch.equal(a, b) for a, b in zip(without[row][1], beside[row][1]))

def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _tiny_category(root, n_train=6, n_good=3, per_defect=3, size=32, seed=0):
    """A hand-built MVTec AD + MVTec Caption tree: two defect types drawn as coloured squares."""
    rng = np.random.default_rng(seed)
    folder = root / "widget"
    base = lambda: (rng.random((size, size, 3)) * 60 + 100).astype(np.uint8)
    for i in range(n_train):
        _write_png(folder / "train" / "good" / f"{i:03d}.png", base())
    for i in range(n_good):
        _write_png(folder / "test" / "good" / f"{i:03d}.png", base())
    for defect, colour in (("red_spot", (220, 20, 20)), ("blue_spot", (20, 20, 220))):
        for i in range(per_defect):
            image, mask = base(), np.zeros((size, size), np.uint8)
            y, x = rng.integers(0, size - 10, 2)
            image[y:y + 8, x:x + 8], mask[y:y + 8, x:x + 8] = colour, 255
            _write_png(folder / "test" / defect / f"{i:03d}.png", image)
            _write_png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
            (folder / "prompt" / defect).mkdir(parents=True, exist_ok=True)
            (folder / "prompt" / defect / f"{i:03d}.txt").write_text(f"a {defect.replace('_', ' ')}\n")
    return folder


SEG_KEYS = {"pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_au_pro", "image_auroc", "image_ap", "image_f1_max"}


def test_pipeline_end_to_end_writes_rows_over_seeds_and_the_protocol_stamp(tmp_path, capsys):
    """Each row has the contract's keys, fractions in [0, 1], means over the seeds with their std and every
    seed's value; the stamp names the split counts, epochs, seeds and commit; nulls are explained once."""
    _tiny_category(tmp_path, n_train=4)   # 4 normals: 2 segmenter steps, 1 classifier step a run
    generated = _tiny_category(tmp_path / "gen", n_train=1, n_good=0, per_defect=2, seed=1)
    out = tmp_path / "res" / "eval.json"
    out.parent.mkdir()
    out.with_suffix(".md").write_text(E.TABLE_MARK + "\nan older table\n")   # evaluate.py's own: replaced
    results = E.main(["--category", "widget", "--data_root", str(tmp_path), "--generated", str(generated),
                      "--out", str(out), "--device", "cpu", "--image_size", "32", "--seg_width", "2",
                      "--seg_epochs", "1", "--cls_epochs", "1", "--batch_size", "4", "--preset", "toy",
                      "--methods", "real,real+axf", "--seeds", "0,1"])
    assert json.loads(out.read_text()) == results
    assert list(results) == ["real", "real+axf", "protocol"]
    for name in ("real", "real+axf"):
        row = results[name]
        assert set(row) == {"generation", "segmentation", "classification", "std", "per_seed"}
        assert {k: row["generation"][k] for k in ("is", "ic_lpips", "kid", "fid")} == dict.fromkeys(
            ("is", "ic_lpips", "kid", "fid"))
        assert set(row["segmentation"]) == SEG_KEYS and set(row["classification"]) == {"accuracy"}
        values = list(row["segmentation"].values()) + [row["classification"]["accuracy"]]
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)
        seeds = [row["per_seed"][s]["segmentation"]["pixel_ap"] for s in ("0", "1")]
        assert row["segmentation"]["pixel_ap"] == pytest.approx(np.mean(seeds))
        assert row["std"]["segmentation"]["pixel_ap"] == pytest.approx(np.std(seeds, ddof=1))  # the sample std
    stamp = results["protocol"]
    assert stamp["few_shot"] == {"blue_spot": 1, "red_spot": 1} and stamp["test"] == {"blue_spot": 2, "red_spot": 2,
                                                                                        "good": 3}
    assert stamp["generated"] == {"blue_spot": 2, "red_spot": 2} and stamp["seeds"] == [0, 1]
    assert stamp["epochs"] == {"segmenter": 1, "classifier": 1} and stamp["git_commit"]
    printed = capsys.readouterr().out
    assert printed.count("null: IS, KID and FID need Inception-v3 weights") == 1
    assert "estimated time for the downstream models" in printed
    table = out.with_suffix(".md").read_text()
    assert "| real+axf |" in table and "Protocol: per defect type" in table and " ± " in table
    assert table.splitlines()[0] == E.TABLE_MARK and "an older table" not in table


@pytest.mark.parametrize("name, message", [
    ("notes.json", "the table would overwrite .*notes.md, which evaluate.py did not write"),
    ("table.md", "--out .*table.md: expected a .json file name"),
    ("folder", "--out .*folder: expected a .json file name"),
    ("folder.json", "--out .*folder.json: expected a .json file name"),
], ids=["a_user_md_beside", "a_md", "a_folder", "a_folder_named_json"])
def test_out_is_checked_before_any_work_and_overwrites_no_file_of_the_user(tmp_path, monkeypatch, name, message):
    """--out must name a .json file, and the .md table beside it may replace only a table evaluate.py wrote (its
    first line says so): anything else is refused in one line before the evaluation starts, the files as they were."""
    (tmp_path / "notes.md").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.json").mkdir()
    monkeypatch.setattr(E.data, "load_category", lambda *args: pytest.fail("the evaluation began"))
    with pytest.raises(ValueError, match=message):
        E.main(["--category", "widget", "--data_root", str(tmp_path), "--generated", str(tmp_path), "--device", "cpu",
                "--out", str(tmp_path / name)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "folder.json", "notes.md"]
    assert (tmp_path / "notes.md").read_text() == "mine" and not any((tmp_path / "folder").iterdir())


def test_generated_folder_layouts_sample_py_and_anomalydiffusion(tmp_path):
    """sample.py's MVTec layout (its train/good and test/good are real images, ignored) and AnomalyDiffusion's
    release, <defect>/image/*.png with <defect>/mask/*.png, give the same anomalies."""
    folder = _tiny_category(tmp_path, per_defect=2)   # train/good and test/good present, as sample.py writes
    ours = data.load_generated(folder)
    assert [(a.defect, a.image.name) for a in ours] == [(d, f"00{i}.png") for d in ("blue_spot", "red_spot")
                                                        for i in (0, 1)]
    theirs = tmp_path / "released" / "widget"
    for a in ours:
        _write_png(theirs / a.defect / "image" / a.image.name, np.asarray(Image.open(a.image)))
        _write_png(theirs / a.defect / "mask" / a.image.name, np.asarray(Image.open(a.mask_files[0])))
    loaded = data.load_generated(theirs)
    assert [(a.defect, a.image.name, a.caption) for a in loaded] == [(a.defect, a.image.name, "") for a in ours]
    assert all(torch.equal(data.read_mask(a, 32), data.read_mask(b, 32)) for a, b in zip(ours, loaded))
    with pytest.raises(FileNotFoundError, match="nowhere: generated folder not found"):
        data.load_generated(tmp_path / "nowhere")


@pytest.mark.parametrize("preset, resnet, says", [("mvtec", False, True), ("mvtec", True, False), ("toy", False, False)])
def test_the_mvtec_preset_says_before_any_work_when_the_classifier_has_no_imagenet_weights(
        tmp_path, capsys, preset, resnet, says):
    """The paper's accuracies come from an ImageNet ResNet-34; without --resnet, the mvtec preset says so at the
    start (here the run then stops at a leak, before any training); the toy preset trains from scratch silently."""
    folder = _tiny_category(tmp_path, n_train=4)
    generated = _tiny_category(tmp_path / "gen", n_train=1, n_good=0, per_defect=2, seed=1)
    held = data.few_shot_split(data.load_category(folder).anomalies)[1][0]
    (generated / "test" / held.defect / "001.png").write_bytes(held.image.read_bytes())
    weights = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None, num_classes=2).state_dict(), weights)
    with pytest.raises(ValueError, match="identical to the held-out real anomaly"):
        E.main(["--category", "widget", "--data_root", str(tmp_path), "--generated", str(generated), "--device", "cpu",
                "--preset", preset, "--image_size", "32", "--out", str(tmp_path / "x.json")]
               + ["--resnet", str(weights)] * resnet)
    assert ("--resnet not given" in capsys.readouterr().out) == says


def test_a_generated_copy_of_a_held_out_anomaly_is_refused(tmp_path):
    """A test image among the generated ones is a leak: refused in one line naming both files."""
    folder = _tiny_category(tmp_path, n_train=4)
    generated = _tiny_category(tmp_path / "gen", n_train=1, n_good=0, per_defect=2, seed=1)
    held = data.few_shot_split(data.load_category(folder).anomalies)[1][0]   # a held-out red/blue spot
    (generated / "test" / held.defect / "001.png").write_bytes(held.image.read_bytes())
    with pytest.raises(ValueError, match=f"001.png: identical to the held-out real anomaly .*{held.image.name}"):
        E.main(["--category", "widget", "--data_root", str(tmp_path), "--generated", str(generated),
                "--device", "cpu", "--image_size", "32", "--out", str(tmp_path / "x.json")])


def test_image_labels_come_from_the_test_set_not_from_the_mask():
    """An anomaly whose mask lost every pixel at this size still counts as an anomalous image."""
    maps = torch.zeros(3, 1, 8, 8)
    maps[0, 0, 2, 2] = 1.0   # the anomaly scores highest; its mask is empty at this size
    masks = torch.zeros(3, 1, 8, 8)
    masks[1, 0, 4, 4] = 1
    maps[1, 0, 4, 4] = 0.8
    scores = E.segmentation_scores(maps, masks, torch.tensor([1.0, 1.0, 0.0]), window=1)
    assert scores["image_auroc"] == 1.0


def test_cli_errors_name_the_problem(tmp_path, capsys, monkeypatch):
    """A missing --generated, an unknown key or method, a malformed list, a wrong type or size, a missing folder or
    --resnet file (before any training) are reported;
    on a CPU without --preset the toy preset is picked and said."""
    folder = _tiny_category(tmp_path)
    base = ["--category", "widget", "--data_root", str(tmp_path), "--generated", str(folder), "--device", "cpu"]
    with pytest.raises(SystemExit):
        E.main(base[:4])   # --generated is required: it sizes every row
    with pytest.raises(SystemExit):
        E.main(base + ["--no_such_key", "1"])
    with pytest.raises(SystemExit):
        E.main(base + ["--seg_epochs", "many"])
    with pytest.raises(ValueError, match="unknown \\['gan'\\]"):
        E.main(base + ["--methods", "draem,gan"])
    for flag, value in (("--seeds", "0,,1"), ("--seeds", "0,one"), ("--seeds", "1,1"), ("--methods", "draem,,real")):
        with pytest.raises(ValueError, match=f"{flag} '{value}': expected distinct"):
            E.main(base + [flag, value])
    monkeypatch.setattr(E, "train_segmenter", lambda *args: pytest.fail("the training began"))
    generated = _tiny_category(tmp_path / "gen", n_train=1, n_good=0, per_defect=2, seed=1)
    with pytest.raises(FileNotFoundError, match="nope.pth: ResNet-34 weights file not found"):
        E.main(base[:4] + ["--generated", str(generated), "--resnet", str(tmp_path / "nope.pth"), "--image_size", "32"])
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="nowhere/widget: MVTec category folder not found"):
        E.main(["--category", "widget", "--data_root", str(tmp_path / "nowhere"), "--generated", str(folder)])
    with pytest.raises(FileNotFoundError, match="nope: generated folder not found"):
        E.main(["--category", "widget", "--data_root", str(tmp_path), "--generated", str(tmp_path / "nope"),
                "--device", "cpu"])
    assert "preset toy (32 px images, cpu)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--image_size must be >= 32, a multiple of 32, not 48"):
        E.main(base + ["--image_size", "48", "--methods", "draem"])
    with pytest.raises(ValueError, match="--seg_epochs must be >= 1, not 0; --seg_lr must be > 0, not -0.1"):
        E.main(base + ["--seg_epochs", "0", "--seg_lr", "-0.1"])


def test_eval_config_is_the_table_then_the_preset_then_the_flags(capsys):
    """One table holds every evaluation key: --help shows each with its toy default and what it allows, the mvtec
    preset overrides a few, and a flag overrides both."""
    with pytest.raises(SystemExit):
        E.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, key in E.EVAL_KEYS.items():
        assert f"--{name}" in shown and f"(default: {key.default}) [allowed: {E.allowed(key)}]" in shown
    mvtec = E.resolve_eval_config("mvtec", {"seg_epochs": 7})
    assert mvtec["image_size"] == 256 and mvtec["seg_epochs"] == 7 and mvtec["preset"] == "mvtec"
    assert mvtec["kid_subsets"] == E.EVAL_KEYS["kid_subsets"].default


def test_toy_checks_give_full_marks_to_real_toy_anomalies(tmp_path):
    """Real toy anomalies draw exactly the colour their caption names; every check is a fraction."""
    folder = toy.make_toy(tmp_path, "cable", size=64, seed=0)
    category = data.load_category(folder)
    eval_config = E.resolve_eval_config("toy", {"image_size": 64, "batch_size": 4})
    real = data.read_anomalies(category.anomalies, category.defects, 64)
    checks = toy_checks.toy_checks(category.anomalies, real, category, eval_config, torch.device("cpu"), steps=10,
                                   judge_root=tmp_path / "judge", worlds=1)
    assert checks["colour_named_is_drawn"] == 1.0 and checks["control"] is None  # no checkpoint: no control
    assert all(0 <= v <= 1 for k, v in checks.items() if k != "control" and not k.startswith("n_"))


def test_toy_judge_is_trained_once_and_kept(tmp_path):
    """The judge depends on no generated image: a second call loads the kept judge (no training, no fresh toy
    worlds) and gives the same verdicts; another setting (here the seed) trains its own."""
    folder = toy.make_toy(tmp_path, "pill", size=32, seed=0)
    category = data.load_category(folder)
    eval_config = E.resolve_eval_config("toy", {"image_size": 32, "batch_size": 4})
    real = data.read_anomalies(category.anomalies, category.defects, 32)
    judge_root = tmp_path / "judge"
    first = toy_checks.toy_checks(category.anomalies, real, category, eval_config, torch.device("cpu"), steps=3,
                         judge_root=judge_root, worlds=1)
    kept = sorted(judge_root.glob("*.pt"))
    assert len(kept) == 1 and "pill_32px_3steps_batch4_seed" in kept[0].name
    for world in judge_root.glob("seed*"):   # a second call must not need the toy worlds the judge trained on
        shutil.rmtree(world)
    again = toy_checks.toy_checks(category.anomalies, real, category, eval_config, torch.device("cpu"), steps=3,
                         judge_root=judge_root, worlds=1)
    assert again == first and not list(judge_root.glob("seed*"))
    toy_checks.toy_checks(category.anomalies, real, category, {**eval_config, "seed": eval_config["seed"] + 1},
                 torch.device("cpu"), steps=3, judge_root=judge_root, worlds=1)
    assert len(list(judge_root.glob("*.pt"))) == 2
