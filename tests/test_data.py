"""data.py: MVTec AD / LOCO + MVTec Caption loading, its error messages, the few-shot split, mask sampling
and the toy world (layout, determinism, and that the picture follows the caption)."""
import hashlib
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import toy

SIZE = 64  # toy images in tests: small, so a whole category is quick to generate


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def _text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _square(h, w, y0, y1, x0, x1, value=255):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def _ad_tree(root, n=3):
    """A tiny MVTec AD category (+ MVTec Caption prompts): 2 defect types, grayscale images as in some AD categories."""
    cat = root / "screw"
    for i in range(4):
        _png(cat / "train" / "good" / f"{i:03d}.png", np.full((16, 16), 100 + i))
    _png(cat / "test" / "good" / "000.png", np.full((16, 16), 90))
    for defect in ("scratch", "crack"):
        for i in range(n):
            _png(cat / "test" / defect / f"{i:03d}.png", np.full((16, 16), 50 + i))
            _png(cat / "ground_truth" / defect / f"{i:03d}_mask.png", _square(16, 16, 2, 6, 2, 6))
            _text(cat / "prompt" / defect / f"{i:03d}.txt", f"  A naïve {defect} number {i}\n\n")
    return cat


def _loco_tree(root):
    """A tiny MVTec LOCO category: one anomaly with two mask regions in ground_truth/<defect>/000/."""
    cat = root / "juice_bottle"
    _png(cat / "train" / "good" / "000.png", np.zeros((20, 20, 3)))
    _png(cat / "validation" / "good" / "000.png", np.zeros((20, 20, 3)))
    _png(cat / "test" / "logical_anomalies" / "000.png", np.zeros((20, 20, 3)))
    _png(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png", _square(20, 20, 0, 5, 0, 5))
    _png(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", _square(20, 20, 10, 20, 10, 20))
    _text(cat / "prompt" / "logical_anomalies" / "000.txt", "The label is missing")
    return cat


def _files_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return {c: data.load_category(toy.make_toy(root, c, size=SIZE, seed=0)) for c in toy.TOY_CATEGORIES}


# ---------------------------------------------------------------------------------------------- loading


def test_toy_category_has_the_mvtec_layout_and_counts(toy_world):
    """Every code path is the real one only if the toy world is a valid MVTec + MVTec Caption folder."""
    for name, cat in toy_world.items():
        assert cat.name == name and cat.defects == sorted(toy.TOY_DEFECTS[name])
        assert len(cat.train_good) >= 200 and len(cat.test_good) >= 20
        for defect in cat.defects:
            items = cat.anomalies_of(defect)
            assert len(items) >= 15
            assert [a.image.name for a in items] == sorted(a.image.name for a in items)
        for a in cat.anomalies:
            assert a.mask_files == (cat.folder / "ground_truth" / a.defect / f"{a.image.stem}_mask.png",)
            assert a.caption and a.caption == a.caption.strip()


def test_read_image_and_mask_give_the_documented_tensors(toy_world):
    """Models rely on images being float [3, S, S] in [0, 1] and masks exactly {0, 1} of shape [1, S, S]."""
    a = toy_world["cable"].anomalies[0]
    image, mask = data.read_image(a.image, 48), data.read_mask(a, 48)
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05
    assert mask.shape == (1, 48, 48) and set(mask.unique().tolist()) == {0.0, 1.0}


def test_thin_mask_survives_downsampling(tmp_path):
    """A 1-px scratch must stay in the mask at a quarter of the size, else its image would count as good."""
    thin = np.zeros((256, 256), np.uint8)
    thin[101, 30:200] = 255   # a horizontal line on a row that nearest-neighbour sampling at 64 px skips
    thin[150:220, 37] = 255
    mask = data.read_mask(_png(tmp_path / "m.png", thin), 64)[0]
    assert mask[25, 8:50].all() and mask[37:55, 9].all() and mask.sum() == 43 + 18
    assert data.read_mask(tmp_path / "m.png", 256)[0].sum() == 170 + 70   # at full size: exactly the pixels


def test_empty_mask_is_refused_in_one_line_naming_the_file(tmp_path):
    """An anomaly needs a place: a mask without a single pixel is an error naming its (first) file."""
    empty = _png(tmp_path / "empty.png", np.zeros((16, 16)))
    for files in (empty, str(empty), [empty, _png(tmp_path / "also_empty.png", np.zeros((16, 16)))]):
        with pytest.raises(ValueError) as e:
            data.read_mask(files, 8)
        assert str(e.value) == f"{empty}: empty mask; an anomaly needs at least one mask pixel"
    region = _png(tmp_path / "region.png", _square(16, 16, 2, 4, 2, 4))   # one non-empty LOCO region is enough
    assert data.read_mask([empty, region], 16).sum() == 4


def test_ad_tree_is_parsed_with_stripped_captions_and_binarised_masks(tmp_path):
    """MVTec AD + Caption: one caption per anomaly with the same index, UTF-8, stripped; grayscale -> RGB."""
    cat_dir = _ad_tree(tmp_path)
    half = np.where(_square(16, 16, 0, 8, 0, 16) > 0, 128, 127)  # 128 is foreground, 127 is not (> 127)
    _png(cat_dir / "ground_truth" / "crack" / "001_mask.png", half)
    cat = data.load_category(cat_dir)
    assert cat.defects == ["crack", "scratch"] and len(cat.train_good) == 4 and len(cat.test_good) == 1
    assert [(a.defect, a.image.name) for a in cat.anomalies][:2] == [("crack", "000.png"), ("crack", "001.png")]
    assert cat.anomalies[1].caption == "A naïve crack number 1"
    image = data.read_image(cat.anomalies[0].image, 16)
    assert image.shape == (3, 16, 16) and torch.equal(image[0], image[2])
    mask = data.read_mask(cat.anomalies[1], 16)
    assert mask[0, :8].eq(1).all() and mask[0, 8:].eq(0).all()


def test_folder_without_test_good_loads(tmp_path):
    """A folder written by sample.py has no test/good and must still load."""
    cat_dir = _ad_tree(tmp_path)
    for p in (cat_dir / "test" / "good").iterdir():
        p.unlink()
    (cat_dir / "test" / "good").rmdir()
    assert data.load_category(cat_dir).test_good == []


def test_loco_region_masks_merge_as_a_union(tmp_path):
    """MVTec LOCO stores one PNG per defect region; the anomaly's mask is all of them together."""
    cat = data.load_category(_loco_tree(tmp_path))
    a = cat.anomalies[0]
    assert len(a.mask_files) == 2 and len(cat.validation_good) == 1
    mask = data.read_mask(a, 20)[0]
    assert mask.sum() == 25 + 100 and mask[:5, :5].all() and mask[10:, 10:].all()


def test_loco_merged_mask_folder_is_preferred(tmp_path):
    """MVTec Caption's merged masks are used when present, instead of the per-region folder."""
    cat_dir = _loco_tree(tmp_path)
    merged_dir = cat_dir / "ground_truth_merge_mask" / "logical_anomalies_merge_mask"
    merged = _png(merged_dir / "000.png", _square(20, 20, 0, 2, 0, 2))
    a = data.load_category(cat_dir).anomalies[0]
    assert a.mask_files == (merged,) and data.read_mask(a, 20).sum() == 4


# ---------------------------------------------------------------------------------------------- errors


def test_missing_category_folder_says_where_to_download_and_hints_toy(tmp_path):
    """A first-time user without the dataset must learn where to get it, or to try --toy."""
    with pytest.raises(FileNotFoundError, match="--toy") as e:
        data.load_category(tmp_path / "bottle")
    assert str(tmp_path / "bottle") in str(e.value) and data.MVTEC_AD_URL in str(e.value)
    assert "\n" not in str(e.value)


def _truncate(path):
    _png(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3)))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _empty(folder):
    for p in folder.iterdir():
        p.unlink()


# (damage to a valid tree, the file the message must name, what it must say). Every check load_category makes.
DAMAGES = {
    "missing mask": (lambda c: (c / "ground_truth/crack/001_mask.png").unlink(),
                     "test/crack/001", r"no mask; missing \S*ground_truth/crack/001_mask.png"),
    "missing LOCO region folder": (lambda c: shutil.rmtree(c / "ground_truth/logical_anomalies/000"),
                                   "test/logical_anomalies/000", r"ground_truth/logical_anomalies/000/ \(MVTec LOCO\)"),
    "empty LOCO region folder": (lambda c: _empty(c / "ground_truth/logical_anomalies/000"),
                                 "ground_truth/logical_anomalies/000", "empty folder, expected one PNG per defect region"),
    "extra mask": (lambda c: _png(c / "ground_truth/crack/007_mask.png", np.zeros((16, 16))),
                   "ground_truth/crack/007_mask.png", r"mask without an image \(no \S*test/crack/007.png\)"),
    "missing caption": (lambda c: (c / "prompt/crack/002.txt").unlink(), "test/crack/002.png",
                        r"no caption \(missing \S*prompt/crack/002.txt\)"),
    "extra caption": (lambda c: _text(c / "prompt/scratch/003.txt", "extra"), "prompt/scratch/003.txt",
                      "caption without an image"),
    "empty caption": (lambda c: _text(c / "prompt/scratch/001.txt", " \n"), "prompt/scratch/001.txt", "empty caption"),
    "non-UTF-8 caption": (lambda c: (c / "prompt/scratch/001.txt").write_bytes(b"\xff\xfe bad"),
                          "prompt/scratch/001.txt", "not UTF-8 text"),
    "missing prompts": (lambda c: shutil.rmtree(c / "prompt/scratch"), "prompt/scratch", "missing MVTec Caption prompts"),
    "image/mask size": (lambda c: _png(c / "ground_truth/crack/001_mask.png", np.zeros((8, 8))),
                        "test/crack/001.png", r"is 16x16 but its mask \S*crack/001_mask.png is 8x8"),
    "LOCO region size": (lambda c: _png(c / "ground_truth/logical_anomalies/000/001.png", np.zeros((8, 8))),
                         "test/logical_anomalies/000.png", r"is 20x20 but its mask \S*000/001.png is 8x8"),
    "truncated PNG": (lambda c: _truncate(c / "train/good/002.png"), "train/good/002.png", "unreadable image"),
    "truncated mask": (lambda c: _truncate(c / "ground_truth/crack/000_mask.png"), "ground_truth/crack/000_mask.png",
                       "unreadable image"),
    "stray file": (lambda c: _text(c / "test/crack/notes.txt", "x"), "test/crack/notes.txt", "unexpected file"),
    "empty train/good": (lambda c: _empty(c / "train/good"), "train/good", "empty folder, expected the normal training"),
    "empty defect folder": (lambda c: _empty(c / "test/crack"), "test/crack", "empty folder, expected anomalous"),
    "missing train/good": (lambda c: shutil.rmtree(c / "train"), "train/good", "missing folder"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_validation_error_is_one_line_naming_the_file(tmp_path, damage):
    """Bad data is reported before anything trains, as one line that names the bad (or missing) file."""
    harm, name, what = DAMAGES[damage]
    cat_dir = _loco_tree(tmp_path) if "LOCO" in damage else _ad_tree(tmp_path)
    harm(cat_dir)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        data.load_category(cat_dir)
    message = str(e.value)
    assert str(cat_dir / name) in message and "\n" not in message
    assert re.search(what, message), message


def test_unknown_defect_type_lists_the_known_ones(tmp_path):
    """A typo in --defect must show the defect types that exist."""
    cat = data.load_category(_ad_tree(tmp_path))
    with pytest.raises(ValueError, match=r"unknown defect type 'scrach'; this category has: crack, scratch"):
        cat.anomalies_of("scrach")


# ---------------------------------------------------------------------------------------------- split


def test_few_shot_split_is_first_third_disjoint_and_deterministic():
    """The generator may see only the first third of each defect type; evaluation never sees those."""
    counts = (("a", 10), ("b", 2), ("c", 1))
    items = [data.Anomaly(Path(f"test/{d}/{i:03d}.png"), (), "c", d) for d, n in counts for i in range(n)]
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    train, held = data.few_shot_split(shuffled)
    assert (train, held) == data.few_shot_split(items)
    assert not set(train) & set(held) and len(train) + len(held) == len(items)
    assert [sum(a.defect == d for a in train) for d in "abc"] == [3, 1, 1]  # floor of a third, at least one
    for d in "abc":
        names_t = [a.image.name for a in train if a.defect == d]
        names_h = [a.image.name for a in held if a.defect == d]
        assert all(t < h for t in names_t for h in names_h)


def test_validation_split_holds_the_few_shot_anomalies_alone_and_a_fifth_of_the_normals(toy_world, tmp_path):
    """The validation folder reads as a category: its anomalies are the few-shot ones (same bytes, masks and
    captions), none held out; its normal images split the training ones, every fifth one held as test/good; and
    its own few-shot split gives the generator a third of those, so validation anomalies are never trained on."""
    cable = toy_world["cable"]
    folder = data.validation_split(cable, tmp_path / "val")
    assert folder == tmp_path / "val" / "cable"
    val = data.load_category(folder)
    few, held = data.few_shot_split(cable.anomalies)
    key = lambda a: (a.defect, a.image.name, a.caption)
    assert sorted(map(key, val.anomalies)) == sorted(map(key, few))
    assert not {(a.defect, a.image.name) for a in val.anomalies} & {(a.defect, a.image.name) for a in held}
    for a, b in zip(sorted(val.anomalies, key=key), sorted(few, key=key)):
        assert a.image.read_bytes() == b.image.read_bytes()
        assert torch.equal(data.read_mask(a, SIZE), data.read_mask(b, SIZE))
    names = lambda paths: [p.name for p in paths]
    assert names(val.test_good) == names(cable.train_good)[4::5]
    assert sorted(names(val.train_good) + names(val.test_good)) == names(cable.train_good)
    fit, validation = data.few_shot_split(val.anomalies)
    assert len(fit) < len(validation) and not set(map(key, fit)) & set(map(key, validation))
    with pytest.raises(ValueError, match="would replace"):
        data.validation_split(cable, cable.folder.parent)


# ---------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("size", [32, 64, 100])
def test_perlin_mask_is_binary_nonempty_and_bounded(size):
    """A generation mask must exist (non-empty), be binary, and never swallow the whole image."""
    g = torch.Generator().manual_seed(size)
    for _ in range(8):
        m = data.perlin_mask(size, g)
        assert m.shape == (1, size, size) and set(m.unique().tolist()) <= {0.0, 1.0}
        assert 0 < m.mean() <= 0.5


def test_sample_mask_is_deterministic_per_generator_seed():
    """Re-running a sampling job with the same seed must reproduce the same masks."""
    real = torch.zeros(2, 1, 40, 40)
    real[0, :, 10:20, 10:30] = 1
    real[1, :, 25:35, 5:15] = 1
    draw = lambda seed: [data.sample_mask(64, g, real) for g in [torch.Generator().manual_seed(seed)] for _ in range(6)]
    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(m.shape == (1, 64, 64) and m.sum() > 0 and set(m.unique().tolist()) <= {0.0, 1.0} for m in a)


def test_jittered_real_mask_keeps_roughly_its_area_but_moves():
    """Jitter varies a real mask's place and pose, not its size: scale is 0.85-1.15 (area 0.72-1.32)."""
    real = torch.zeros(1, 1, 64, 64)
    real[..., 20:40, 24:40] = 1  # 320 px, away from the borders
    g = torch.Generator().manual_seed(0)
    masks = [data.sample_mask(64, g, real, p_real=1.0) for _ in range(20)]
    areas = torch.stack([m.sum() for m in masks]) / real.sum()
    assert areas.min() > 0.6 and areas.max() < 1.45
    assert sum(not torch.equal(m, real[0]) for m in masks) >= 18


def test_small_jitter_keeps_a_mask_on_its_part_and_none_keeps_it_exactly():
    """sample.py's default jitter must leave a mask mostly where it was (its caption names what lies
    under it); "large" moves it much further (flips, 20 degrees); "none" is the mask itself."""
    real = torch.zeros(1, 1, 64, 64)
    real[..., 8:20, 10:22] = 1  # off-centre, where a flip or a turn moves it far
    g = torch.Generator().manual_seed(0)
    iou = lambda m: float((m * real[0]).sum() / ((m + real[0]) > 0).sum())
    small = [iou(data.sample_mask(64, g, real, p_real=1.0, jitter="small")) for _ in range(30)]
    large = [iou(data.sample_mask(64, g, real, p_real=1.0, jitter="large")) for _ in range(30)]
    assert min(small) > 0.5 and sum(small) / 30 > 0.7
    assert sum(x < 0.2 for x in large) >= 10
    assert torch.equal(data.sample_mask(64, g, real, p_real=1.0, jitter="none"), real[0])
    with pytest.raises(ValueError, match="jitter 'huge'"):
        data.sample_mask(64, g, real, p_real=1.0, jitter="huge")


# ---------------------------------------------------------------------------------------------- toy world


class ThresholdAutoencoder(torch.nn.Module):
    """A stand-in for the stage-2 mask autoencoder whose features are the mask itself and whose decoder says
    "inside" where a feature exceeds one half: mixing two masks' features with weight w then decodes to the first
    mask's shape for w < 1/2 and to the partner's for w > 1/2, so mixed_mask's moves can be checked exactly."""

    def __init__(self, empty=False):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # mixed_mask reads the device off a parameter
        self.encoder = lambda masks: masks
        self.decoder = (lambda f: -torch.ones_like(f)) if empty else (lambda f: f * 2 - 1)


def square(size, top, left, h, w):
    mask = torch.zeros(1, size, size)
    mask[:, top:top + h, left:left + w] = 1
    return mask


def test_mixed_mask_takes_a_shape_between_two_examples_at_the_first_ones_place():
    """The shape comes from the features the weight favours, the place from the first mask: its own shape comes
    back where it was, the partner's is moved to the first one's centre; an empty decode gives the first mask."""
    g = torch.Generator().manual_seed(0)
    first, partner = square(32, 4, 6, 3, 3), square(32, 20, 18, 7, 5)
    autoencoder = ThresholdAutoencoder()
    assert torch.equal(data.mixed_mask(autoencoder, first, partner, g, weights=(0.1, 0.1)), first)
    moved = data.mixed_mask(autoencoder, first, partner, g, weights=(0.9, 0.9))
    assert torch.equal(moved, square(32, 2, 5, 7, 5))  # the 7x5 partner, its centre on the first one's, (5, 7)
    assert data.mask_centre(moved) == data.mask_centre(first)
    assert torch.equal(data.mixed_mask(ThresholdAutoencoder(empty=True), first, partner, g), first)


def test_shifted_cuts_what_leaves_the_square_instead_of_wrapping_it():
    mask = square(8, 0, 5, 2, 3)
    assert torch.equal(data.shifted(mask, 1, 2), square(8, 1, 7, 2, 1))
    assert torch.equal(data.shifted(mask, -1, -5), square(8, 0, 0, 1, 3))


def test_toy_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    """Experiments on the toy world are reproducible only if the same seed writes the same files."""
    a = _files_digest(toy.make_toy(tmp_path / "a", "bottle", size=32, seed=0))
    b = _files_digest(toy.make_toy(tmp_path / "b", "bottle", size=32, seed=0))
    c = _files_digest(toy.make_toy(tmp_path / "c", "bottle", size=32, seed=1))
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) > 0.9 * sum(k.endswith(".png") for k in a)


def test_ensure_toy_generates_once_and_refuses_to_overwrite_real_data(tmp_path):
    """The toy category is made on first use only; a real folder of the same name is never deleted."""
    folder = toy.ensure_toy("cable", root=tmp_path, size=32)
    first = folder / "train" / "good" / "000.png"
    stamp = first.stat().st_mtime_ns
    assert toy.ensure_toy("cable", root=tmp_path, size=32) == folder and first.stat().st_mtime_ns == stamp
    toy.ensure_toy("cable", root=tmp_path, size=40)  # another size: the old images must not be reused
    assert Image.open(first).size == (40, 40)
    (tmp_path / "bottle").mkdir()
    with pytest.raises(FileExistsError, match="not a toy category"):
        toy.ensure_toy("bottle", root=tmp_path, size=32)


def test_toy_anomaly_equals_its_normal_twin_outside_the_mask():
    """Masks tightly cover what changed: outside, the anomaly is its normal image pixel for pixel."""
    for category, defects in toy.TOY_DEFECTS.items():
        for k, defect in enumerate(defects):
            image, mask, caption, normal = toy._toy_sample(category, SIZE, np.random.default_rng([0, k]), defect, k)
            assert np.array_equal(image[~mask], normal[~mask])
            assert (np.abs(image[mask].astype(int) - normal[mask]).max(-1) > 8).mean() > 0.8


def test_toy_picture_draws_the_colour_its_caption_names(toy_world):
    """The caption decides what is drawn: the swap colour, the black hole, the copper core, the stain colour."""
    checked = [a for a in toy_world["cable"].anomalies] + toy_world["bottle"].anomalies_of("contamination")
    for a in checked:
        colour = toy.caption_colour(a.caption)
        assert colour is not None
        assert toy.drawn_colour(data.read_image(a.image, SIZE), data.read_mask(a, SIZE)) == colour, a.caption
    stains = {toy.caption_colour(a.caption) for a in toy_world["bottle"].anomalies_of("contamination")}
    assert stains >= {"red", "green", "blue", "yellow"}
    assert all(toy.caption_colour(a.caption) is None for a in toy_world["bottle"].anomalies_of("broken_large"))


def test_caption_colour_reads_the_drawn_colour_from_toy_captions():
    """Swap -> the replacing colour; missing -> black; cut -> copper; contamination -> its colour."""
    assert toy.caption_colour("The blue cable is replaced by a repeated green cable") == "green"
    assert toy.caption_colour("One gray cable is missing, replaced by a black hole") == "black"
    assert toy.caption_colour("One grey cable is missing") == "black"
    assert toy.caption_colour("The insulation of the green cable is cut, exposing the copper core") == "copper"
    assert toy.caption_colour("A small red contamination lies inside the bottle") == "red"
    assert toy.caption_colour("A large piece of the bottle rim is broken off at the top left") is None


def test_drawn_colour_is_the_nearest_named_colour_of_the_median():
    """The median ignores a few outlier pixels (edges, noise) inside the mask."""
    image = torch.zeros(3, 8, 8)
    image[:, :4] = torch.tensor([45, 150, 70]).view(3, 1, 1) / 255  # greenish
    image[:, 0, 0] = 1.0                                             # one white outlier
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1
    assert toy.drawn_colour(image, mask) == "green"
    with pytest.raises(ValueError, match="empty"):
        toy.drawn_colour(image, torch.zeros(1, 8, 8))


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_toy_category_and_a_preview(tmp_path, capsys):
    """`python data.py --category cable --out DIR` writes DIR/cable and a preview grid, and says where."""
    data.main(["--category", "cable", "--out", str(tmp_path), "--size", "32", "--rows", "2"])
    preview = tmp_path / "cable_preview.png"
    assert str(preview) in capsys.readouterr().out
    assert data.load_category(tmp_path / "cable").defects == sorted(toy.TOY_DEFECTS["cable"])
    with Image.open(preview) as im:
        assert im.size[1] == 3 * 2 * (128 + 2)  # 2 rows for each of 3 defect types
    with pytest.raises(SystemExit) as e:
        data.main(["--help"])
    assert e.value.code == 0 and "--toy" not in capsys.readouterr().out  # the toy world is all it writes
