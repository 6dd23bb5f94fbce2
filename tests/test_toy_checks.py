"""toy_checks.py: recall and control. Control draws new pairings from the checkpoint: captions that name another
colour on the few-shot masks, and the few-shot captions on blobs where no example's mask was."""
import pytest
import torch

import checkpoints
import data
import toy
import toy_checks
import train
from test_train_sample import TINY


def test_recoloured_names_each_other_colour_of_the_defect_type_where_the_drawn_one_was():
    assert toy.recoloured("The blue cable is replaced by a repeated green cable", "cable_swap") == [
        "The blue cable is replaced by a repeated gray cable"]  # green and blue are named: gray is left
    spots = toy.recoloured("A red spot is on the pill", "color")
    assert spots == ["A blue spot is on the pill", "A yellow spot is on the pill"]
    assert [toy.caption_colour(c) for c in spots] == ["blue", "yellow"]
    assert toy.recoloured("One gray cable is missing, replaced by a black hole", "missing_cable") == []


def test_a_blob_like_a_mask_sits_where_the_mask_was_and_is_of_its_size():
    mask = torch.zeros(1, 64, 64)
    mask[:, 10:22, 40:50] = 1
    for seed in range(5):
        blob = toy_checks.blob_like(mask, torch.Generator().manual_seed(seed))
        centre = torch.nonzero(blob[0]).float().mean(0)
        assert blob.sum() > 0 and blob.mean() <= 2 * mask.mean() + 1e-6
        assert (centre - torch.tensor([15.5, 44.5])).abs().max() <= 8  # wrapped pixels aside, about the same place


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    toy.make_toy(root, "bottle", size=64, seed=0)  # rendered at 64 px, trained on at TINY's 32
    out = tmp_path_factory.mktemp("run")
    train.main(["--category", "bottle", "--data_root", str(root), "--out_dir", str(out)] + TINY)
    return data.load_category(root / "bottle"), out / "axf.pt"


def test_control_draws_new_pairings_from_the_checkpoint(tiny_run, tmp_path):
    """Every colour-named few-shot anomaly with each other colour of its type, and every few-shot caption on a
    blob: counted, and each measured as a fraction; recall comes from the generated anomalies themselves."""
    category, checkpoint = tiny_run
    few_shot, _ = data.few_shot_split(category.anomalies)
    eval_config = {"image_size": 64, "batch_size": 4, "seed": 0}  # judged at 64 px, drawn at the model's 32
    real = data.read_anomalies(few_shot, category.defects, 64)
    checks = toy_checks.toy_checks(few_shot, real, category, eval_config, torch.device("cpu"), checkpoint,
                                   steps=3, judge_root=tmp_path / "judge", worlds=1)
    swapped = sum(len(toy.recoloured(a.caption, a.defect)) for a in few_shot)
    assert swapped == 4 * sum(a.defect == "contamination" for a in few_shot) > 0
    control = checks["control"]
    assert control["swapped_colour"]["n"] == swapped and control["new_masks"]["n"] == len(few_shot)
    assert control["swapped_colour"]["n_colour_named_is_drawn"] == swapped
    assert checks["colour_named_is_drawn"] == 1.0  # the real anomalies drew what they say
    for part in (control, control["swapped_colour"], control["new_masks"]):
        assert 0 <= part["colour_named_is_drawn"] <= 1 and 0 <= part["defect_type_recognised"] <= 1


def test_control_is_drawn_with_the_generated_folders_sampling_settings(tiny_run, monkeypatch):
    """Recall and control judge one sampler: the settings the generated folder was drawn with (its manifest, passed
    as `sampling`) replace the checkpoint's own; without them, the checkpoint's."""
    category, checkpoint = tiny_run
    model, _ = checkpoints.load_checkpoint(checkpoint, device=torch.device("cpu"))
    calls = []
    monkeypatch.setattr(model, "sample", lambda normals, *rest, **settings: calls.append(settings) or normals)
    jobs = toy_checks.control_jobs(category, model.config["image_size"], torch.Generator().manual_seed(0))[:2]
    assert model.config["guidance_scale"] != 1.0 and model.config["sample_steps"] != 7
    toy_checks.draw(model, category, jobs, 0, torch.device("cpu"), {"guidance_scale": 1.0, "sample_steps": 7})
    toy_checks.draw(model, category, jobs, 0, torch.device("cpu"))
    assert [(c["guidance_scale"], c["steps"], c["sampler"], c["eta"]) for c in calls] == [
        (1.0, 7, model.config["sampler"], model.config["eta"]),
        (model.config["guidance_scale"], model.config["sample_steps"], model.config["sampler"], model.config["eta"])]
