"""train.py and sample.py end to end on a tiny toy category: every stage, resuming, the output layout, errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import axf
import checkpoints
import clip
import config
import data
import evaluate
import files
import toy
import training
import unet
import sample
import train
from helpers import kill_after_two_steps_and_resume

REPO = Path(__file__).resolve().parent.parent

# every stage at the smallest size that still runs the real code paths
TINY = ["--preset", "toy", "--clip", "random", "--vae_weights", "train", "--image_size", "32", "--vae_channels", "32", "--vae_channel_mult", "1,2",
        "--unet_channels", "32", "--unet_channel_mult", "1,2", "--unet_num_res_blocks", "1", "--context_dim", "32",
        "--unet_num_heads", "2", "--num_tokens", "2", "--mask_channels", "8", "--mask_feature_channels", "16",
        "--vae_steps", "2", "--mask_steps", "2", "--steps", "4", "--batch_size", "4", "--vae_batch_size", "4",
        "--checkpoint_every", "2", "--preview_every", "4", "--sample_steps", "2", "--num_diffusion_steps", "50"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    toy.make_toy(root, "bottle", size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(out)] + TINY)
    return out


def test_training_writes_every_stage_and_a_preview(trained):
    """One command runs VAE, mask-encoder pre-training and AnomalyXFusion, and shows a preview grid."""
    for name in ("vae.pt", "mask_ae.pt", "axf.pt", "preview_000004.png"):
        assert (trained / name).is_file(), name
    checkpoint = torch.load(trained / "axf.pt", weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["config"]["image_size"] == 32
    assert not any(k.startswith("clip.") for k in checkpoint["model"])  # CLIP is saved apart


def test_checkpoint_loads_by_itself_with_its_config(trained):
    """sample.py needs no size flags: the checkpoint carries its config, defects and the random CLIP."""
    model, checkpoint = checkpoints.load_checkpoint(trained / "axf.pt")
    assert model.config["unet_channels"] == 32 and model.texture_rows[0] == ("bottle", "good")
    assert model.categories["bottle"] == data.load_category(Path(checkpoint["data_folders"]["bottle"])).defects


@pytest.fixture(scope="module")
def sampled(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "bottle"
    sample.main(["--category", "bottle", "--ckpt", str(trained), "--n", "2", "--out_dir", str(out), "--sample_batch_size", "3"])
    return out


def test_sampling_writes_one_mvtec_category_folder(sampled, toy_root, trained):
    """sample.py's output is one MVTec AD category, read back by data.load_category, with the preview beside it;
    its manifest records the category and the data folder the samples were drawn on, and the checkpoint and
    sampling settings they were drawn with."""
    category, source = data.load_category(sampled), data.load_category(toy_root / "bottle")
    assert len(category.anomalies) == 2 * len(category.defects)
    assert (sampled.parent / "bottle_preview.png").is_file()
    manifest = json.loads((sampled / sample.MANIFEST).read_text())
    assert (manifest["category"], manifest["data_folder"]) == ("bottle", str((toy_root / "bottle").resolve()))
    model, _ = checkpoints.load_checkpoint(trained / "axf.pt")  # drawn with the checkpoint's settings, as no flag changed them
    assert manifest["sampling"] == {key: model.config[key] for key in ("sampler", "sample_steps", "guidance_scale", "eta")}
    checkpoint, sampling = evaluate.generator_of(sampled)  # what evaluate.py --toy's control is drawn with
    assert Path(checkpoint).samefile(trained / "axf.pt") and sampling == manifest["sampling"]
    assert len(category.train_good) == len(source.train_good) and len(category.test_good) == len(source.test_good)
    for anomaly in category.anomalies:
        assert anomaly.caption and (sampled / "prompt" / anomaly.defect).is_dir()


def test_generated_folder_reads_as_a_detector_library_reads_it(sampled):
    """What anomalib's MVTec AD reader does: every image under the category is <split>/<label>/<file>, none
    resolves outside the folder, every test/<defect>/NNN.png has ground_truth/<defect>/NNN_mask.png of its size."""
    read_as_anomalib_does(sampled)


def read_as_anomalib_does(sampled):
    """anomalib's make_mvtec_dataset takes every file with an image suffix, at any depth, for a sample."""
    root = sampled.resolve()
    images = [p for p in sampled.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")]
    for path in images:
        assert len(path.relative_to(sampled).parts) == 3, path
        split, label, _ = path.relative_to(sampled).parts
        assert split in ("train", "test", "ground_truth") and (split != "train" or label == "good"), path
        assert path.resolve().is_relative_to(root) and not path.is_symlink(), path
    anomalous = [p for p in images if p.parts[-3] == "test" and p.parts[-2] != "good"]
    masks = [p for p in images if p.parts[-3] == "ground_truth"]
    assert len(anomalous) == len(masks) == 6
    for image in anomalous:
        mask = sampled / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
        assert Image.open(mask).size == Image.open(image).size


def test_every_changed_pixel_of_a_saved_sample_lies_inside_its_saved_mask(sampled, trained, monkeypatch):
    """The files keep the promise: test image and normal image differ only where the saved mask is set."""
    drawn = []
    real_sample = axf.AnomalyXFusion.sample
    monkeypatch.setattr(axf.AnomalyXFusion, "sample",
                        lambda self, normals, *a, **k: drawn.append(normals) or real_sample(self, normals, *a, **k))
    out = sampled.parent / "again"
    sample.main(["--category", "bottle", "--ckpt", str(trained), "--n", "2", "--out_dir", str(out), "--sample_batch_size", "6"])
    normals = torch.cat(drawn)
    images = sorted(p for p in (out / "test").glob("*/*.png") if p.parent.name != "good")
    assert len(images) == len(normals) == 6
    for image_path, normal in zip(images, normals):
        image = data.read_image(image_path, 32)
        mask = data.read_mask(out / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png", 32)
        changed = (image != normal).any(0, keepdim=True)
        assert changed.any() and not (changed & (mask == 0)).any(), image_path


def test_sampling_never_deletes_files_it_did_not_write(trained, tmp_path):
    """Pointed at a dataset's own category folder, sample.py refuses and touches nothing; in its own output it
    replaces only what its manifest lists."""
    dataset = toy.make_toy(tmp_path, "bottle", size=32, seed=0)
    before = sorted(dataset.rglob("*"))
    with pytest.raises(ValueError, match="not written by sample.py"):
        sample.main(["--category", "bottle", "--ckpt", str(trained), "--n", "1", "--out_dir", str(dataset)])
    assert sorted(dataset.rglob("*")) == before
    out = tmp_path / "samples"
    args = ["--category", "bottle", "--ckpt", str(trained), "--out_dir", str(out), "--defect", "contamination"]
    sample.main(args + ["--n", "3"])
    (out / "notes.txt").write_text("mine")
    sample.main(args + ["--n", "1"])  # a re-run replaces its own samples: 3 become 1
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "test" / "contamination").iterdir()) == ["000.png"]
    written = json.loads((out / sample.MANIFEST).read_text())["written"]
    assert "notes.txt" not in written and "test/contamination/000.png" in written
    (out / "ground_truth" / "contamination" / "001_mask.png").write_bytes(b"mine")
    with pytest.raises(ValueError, match="sample.py did not write it"):
        sample.main(args + ["--n", "2"])
    assert (out / "ground_truth" / "contamination" / "001_mask.png").read_bytes() == b"mine"


@pytest.mark.parametrize("entry", ["train/good/../../../victim/precious.txt", "/VICTIM/precious.txt",
                                   "test/contamination/../../../victim/precious.txt", "test/linked/000.png"])
def test_a_manifest_naming_files_outside_its_folder_deletes_nothing(trained, tmp_path, entry):
    """A samples folder received from someone else whose manifest lists a file outside it (by '..', an absolute
    path or a folder that is a link to elsewhere) is refused before anything is deleted."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    (victim / "000.png").write_text("mine too")
    out = tmp_path / "samples"
    args = ["--category", "bottle", "--ckpt", str(trained), "--out_dir", str(out), "--n", "1"]
    sample.main(args)
    (out / "test" / "linked").symlink_to(victim)
    manifest = json.loads((out / sample.MANIFEST).read_text())
    manifest["written"].append(entry.replace("/VICTIM", str(victim)))
    (out / sample.MANIFEST).write_text(json.dumps(manifest))
    before = sorted(out.rglob("*"))
    with pytest.raises(ValueError, match="not a file sample.py writes inside"):
        sample.main(args)
    assert (victim / "precious.txt").read_text() == "mine" and (victim / "000.png").read_text() == "mine too"
    assert sorted(out.rglob("*")) == before


def snapshot(folder):
    """Every file under `folder` (links followed) with its bytes: what a refused run must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def loaded(trained):
    return checkpoints.load_checkpoint(trained / "axf.pt")


@pytest.fixture
def checkpoint_once(trained, loaded, monkeypatch):
    """The tiny checkpoint read once for the tests' many sample.py runs; each run still checks everything else."""
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda *args, **kwargs: loaded)
    return ["--category", "bottle", "--ckpt", str(trained), "--similar_normals", "0"]


def test_sampling_refuses_a_folder_of_another_category_or_data_folder(sampled, toy_root, tmp_path, checkpoint_once):
    """A re-run replaces train/good and test/good: into the samples of another category or data folder it would
    mix them, so it is refused in one line naming both, the folder as it was. A manifest older than these
    fields is taken for this run's only when what it lists fits this category."""
    other_root = tmp_path / "copy"
    shutil.copytree(toy_root / "bottle", other_root / "bottle")
    before = snapshot(sampled)
    with pytest.raises(ValueError, match=f"holds samples of bottle drawn on {toy_root.resolve() / 'bottle'}; this "
                                         f"run draws bottle on {other_root.resolve() / 'bottle'}: pass another --out_dir"):
        sample.main(checkpoint_once + ["--data_root", str(other_root), "--out_dir", str(sampled)])
    assert snapshot(sampled) == before
    older = tmp_path / "older"
    shutil.copytree(sampled, older)
    manifest = json.loads((older / sample.MANIFEST).read_text())
    manifest = {"written": manifest["written"], "checkpoint": manifest["checkpoint"]}  # before the fields existed
    (older / sample.MANIFEST).write_text(json.dumps(dict(manifest, written=manifest["written"] + [
        "test/cable_swap/000.png"])))
    before = snapshot(older)
    with pytest.raises(ValueError, match="older manifest"):
        sample.main(checkpoint_once + ["--out_dir", str(older)])
    assert snapshot(older) == before
    (older / sample.MANIFEST).write_text(json.dumps(manifest))
    sample.main(checkpoint_once + ["--out_dir", str(older), "--n", "1", "--defect", "contamination"])
    assert json.loads((older / sample.MANIFEST).read_text())["category"] == "bottle"


def test_learned_masks_fill_a_category_folder_and_need_the_mask_autoencoder(checkpoint_once, trained, tmp_path):
    """--masks learned draws every sample inside a new non-empty mask (data.load_category refuses an empty one) from
    the stage-2 mask autoencoder beside the checkpoint; without that file, or with one of another image size, it is
    refused before anything is written."""
    out = tmp_path / "learned"
    sample.main(checkpoint_once + ["--n", "2", "--masks", "learned", "--out_dir", str(out)])
    assert len(data.load_category(out).anomalies) == 2 * len(toy.TOY_DEFECTS["bottle"])
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(trained / "axf.pt", lone / "axf.pt")
    flags = checkpoint_once[:2] + ["--ckpt", str(lone), "--masks", "learned", "--out_dir", str(tmp_path / "none")]
    with pytest.raises(FileNotFoundError, match=r"lone/mask_ae.pt: no file there"):
        sample.main(flags)
    other = torch.load(trained / "mask_ae.pt", weights_only=True)  # another run's, of 64 px masks
    other["config"]["image_size"] = 64
    torch.save(other, lone / "mask_ae.pt")
    with pytest.raises(ValueError, match=r"lone/mask_ae.pt is of 64 px masks, .* of 32 px"):
        sample.main(flags)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("flags, message", [
    (["--sample_batch_size", "0"], "--sample_batch_size must be at least 1, got 0"),
    (["--sample_steps", "51"], "--sample_steps 51: this checkpoint has 50 diffusion steps"),
    (["--eta", "2"], r"--eta 2.0: 0 \(deterministic DDIM\) to 1"),
    (["--defect", "nope"], "--defect 'nope' is not a defect type of bottle"),
    (["--reference", "FOLDER", "--reference_mask", "FOLDER"], "--reference .*: no image file there"),
    (["--out_dir", "FILE"], "FILE is a file, not a folder"),
    (["--out_dir", "FILE/samples"], "FILE is a file, not a folder"),
    (["--out_dir", "LINK"], "LINK lies inside the data folder"),
], ids=["batch_size", "sample_steps", "eta", "defect", "reference", "out_dir_file", "out_dir_in_a_file",
        "out_dir_link_to_dataset"])
def test_every_flag_is_checked_before_anything_is_written(checkpoint_once, toy_root, tmp_path, flags, message):
    """A bad flag (here one of each kind) stops sample.py in one line before it writes a file: no half-filled
    folder, no manifest of samples that do not exist, a file or a linked dataset folder as they were."""
    (tmp_path / "LINK").symlink_to(toy_root / "bottle")
    (tmp_path / "FILE").write_text("mine")
    (tmp_path / "FOLDER").mkdir()
    flags = [str(tmp_path / f) if f.startswith(("FOLDER", "FILE", "LINK")) else f for f in flags]
    before, dataset = snapshot(tmp_path), snapshot(toy_root / "bottle")
    out = ["--out_dir", str(tmp_path / "samples")] if "--out_dir" not in flags else []
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sample.main(checkpoint_once + out + flags)
    assert snapshot(tmp_path) == before and snapshot(toy_root / "bottle") == dataset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "FOLDER", "LINK"]


def test_the_manifest_is_written_whole_and_a_cut_one_is_named(checkpoint_once, tmp_path, monkeypatch):
    """A kill while the manifest is written leaves no half manifest (only a temporary file, which the next run
    clears), and a manifest cut by other means is refused in one line that names it."""
    out, write_text = tmp_path / "samples", Path.write_text

    def killed_halfway(path, text, *args, **kwargs):
        if path.name.startswith(sample.MANIFEST):
            write_text(path, text[:len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(path, text, *args, **kwargs)

    args = checkpoint_once + ["--out_dir", str(out), "--n", "1", "--defect", "contamination"]
    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        sample.main(args)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert not (out / sample.MANIFEST).exists() and len(list(out.glob(sample.MANIFEST + ".*.tmp"))) == 1
    sample.main(args)
    assert not list(out.glob("*.tmp")) and "test/contamination/000.png" in json.loads(
        (out / sample.MANIFEST).read_text())["written"]
    (out / sample.MANIFEST).write_text((out / sample.MANIFEST).read_text()[:60])
    before = snapshot(out)
    with pytest.raises(ValueError, match=f"{out / sample.MANIFEST}: not a manifest sample.py wrote"):
        sample.main(args)
    assert snapshot(out) == before


def test_a_second_run_into_the_same_folder_is_refused_and_the_lock_confuses_no_reader(sampled, checkpoint_once):
    """While a run holds the folder's lock, another one is refused in one line and writes nothing; the lock's
    file, inside the folder, is no file of the category for data.load_category or anomalib's reader."""
    before = snapshot(sampled)
    with files.run_lock(sampled, "sample.py run"):
        with pytest.raises(ValueError, match="another sample.py run .* is writing here"):
            sample.main(checkpoint_once + ["--out_dir", str(sampled), "--n", "2"])
        assert snapshot(sampled) == {**before, Path(files.LOCK): (sampled / files.LOCK).read_bytes()}
        assert len(data.load_category(sampled).anomalies) == 6
        read_as_anomalib_does(sampled)
    assert files.LOCK not in json.loads((sampled / sample.MANIFEST).read_text())["written"]


def test_the_preview_overwrites_no_file_sample_py_did_not_write(checkpoint_once, tmp_path, sampled):
    """The preview goes beside the folder, <out_dir>_preview.png: a file of that name that is not a preview
    sample.py wrote (marked in the PNG) is refused up front, before the folder is made."""
    (tmp_path / "samples_preview.png").write_bytes(b"mine")
    with pytest.raises(ValueError, match="samples_preview.png: exists and sample.py did not write it"):
        sample.main(checkpoint_once + ["--out_dir", str(tmp_path / "samples")])
    assert (tmp_path / "samples_preview.png").read_bytes() == b"mine" and not (tmp_path / "samples").exists()
    assert Image.open(sampled.parent / "bottle_preview.png").info["Software"] == sample.PREVIEW_MARK[1]


def test_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_run(trained, toy_root, tmp_path, monkeypatch, capsys):
    """A kill after the step-2 checkpoint loses nothing: re-running continues from step 2 and ends with the
    very weights and EMA of the run that was never stopped (model, optimiser, EMA and both RNGs are saved)."""
    args = ["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(tmp_path)] + TINY
    resumed = kill_after_two_steps_and_resume(args, tmp_path, monkeypatch, capsys)
    uninterrupted = torch.load(trained / "axf.pt", weights_only=True)
    assert resumed["step"] == 4
    for key in ("model", "ema"):
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)


def test_resume_refuses_another_architecture_but_allows_a_bigger_budget(trained, toy_root, tmp_path, capsys):
    """Re-running a run with --use_mif False would drop weights: refused in one line, at the stage whose network
    the switch shapes (stage 3; the VAE and mask encoder do not depend on it). More steps is fine."""
    for name in ("vae.pt", "mask_ae.pt", "axf.pt"):
        (tmp_path / name).write_bytes((trained / name).read_bytes())
    args = ["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(tmp_path)] + TINY
    with pytest.raises(ValueError, match=r"axf.pt was trained with another architecture \(use_mif True -> False\)"):
        train.main(args + ["--use_mif", "False"])
    capsys.readouterr()
    train.main(args + ["--steps", "5", "--preview_every", "100"])
    assert f"resuming from {tmp_path / 'axf.pt'} at step 4" in capsys.readouterr().out
    assert torch.load(tmp_path / "axf.pt", weights_only=True)["step"] == 5


def test_a_saved_config_without_a_newer_key_counts_as_what_that_run_had():
    """A checkpoint older than a fixed key was made with what runs had then: its default, or (config.OLDER_VALUES)
    the mask channel, before the paper's UNet became the default. Resuming it with that is no change, with another
    value it is; a stage checks only the keys its network depends on."""
    current = config.resolve("toy", {})
    saved = {k: v for k, v in current.items() if k not in ("unet_mask_input", "center_text")}
    assert config.architecture_changes(saved, dict(current, unet_mask_input=True)) == []
    assert config.architecture_changes(saved, current) == ["unet_mask_input True -> False"]
    assert config.architecture_changes(saved, current, ("image_size", "mask_")) == []


def test_the_random_clip_has_two_names_and_either_resumes_a_run_made_with_the_other():
    """--clip random and --clip "" are the same small random CLIP: resolve keeps one name, and a checkpoint that
    saved the other ("random", as a run made between the toy CLIP and that rule did) resumes without a change;
    the toy CLIP is a change."""
    current = config.resolve("toy", {"clip": "random"})
    assert current["clip"] == "" and config.resolve("toy", {"clip": ""})["clip"] == ""
    for saved_name in ("random", ""):
        assert config.architecture_changes(dict(current, clip=saved_name), current) == []
    assert config.architecture_changes(dict(current, clip="random"), config.resolve("toy", {})) == ["clip '' -> 'toy'"]


def test_a_checkpoint_from_before_the_mask_channel_key_samples_as_what_it_was(toy_root, tmp_path):
    """Before unet_mask_input existed every UNet read the mask: such a checkpoint (its config lacks the key) builds
    a UNet of 5 input channels under today's default, loads its weights and samples."""
    channel_run = tmp_path / "run"
    train.main(["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(channel_run),
                "--unet_mask_input", "True"] + TINY)
    old = torch.load(channel_run / "axf.pt", weights_only=True)
    del old["config"]["unet_mask_input"]
    torch.save(old, tmp_path / "old.pt")
    model, _ = checkpoints.load_checkpoint(tmp_path / "old.pt")
    assert model.unet.conv_in.in_channels == 5 and model.reads_mask
    out = tmp_path / "samples"
    sample.main(["--category", "bottle", "--ckpt", str(tmp_path / "old.pt"), "--n", "1", "--out_dir", str(out)])
    assert all((out / "test" / defect / "000.png").is_file() for defect in toy.TOY_DEFECTS["bottle"])


def test_a_run_with_attention_at_both_levels_samples_and_resumes_only_as_what_it_was(toy_root, tmp_path, capsys):
    """The toy UNet attended at levels 0 and 1 before level 1 alone became the default: such a checkpoint (its
    config names its levels) builds its transformers at level 0 under today's default and samples; resuming it
    without the flag is refused in one line naming the key."""
    run = tmp_path / "run"
    args = ["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(run)] + TINY
    train.main(args + ["--unet_attention_levels", "0,1"])
    model, _ = checkpoints.load_checkpoint(run / "axf.pt")
    level0 = model.unet.input_blocks[0]
    assert any(isinstance(layer, unet.SpatialTransformer) for layer in level0)
    assert config.resolve("toy", {})["unet_attention_levels"] == (1,)
    out = tmp_path / "samples"
    sample.main(["--category", "bottle", "--ckpt", str(run), "--n", "1", "--out_dir", str(out)])
    assert all((out / "test" / defect / "000.png").is_file() for defect in toy.TOY_DEFECTS["bottle"])
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"unet_attention_levels \(0, 1\) -> \(1,\)"):
        train.main(args + ["--steps", "5"])


def test_table6_rows_share_a_finished_vae_and_mask_encoder(trained, toy_root, tmp_path, capsys):
    """The ablation switches shape stage 3 only: a run with --use_ddf False and the UNet blind to the mask
    continues another run's finished vae.pt and mask_ae.pt (no retraining) and trains its own axf.pt; a
    stage-1 size change is still refused."""
    for name in ("vae.pt", "mask_ae.pt"):
        (tmp_path / name).write_bytes((trained / name).read_bytes())
    args = ["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(tmp_path)] + TINY
    train.main(args + ["--use_ddf", "False", "--unet_mask_input", "False", "--steps", "1"])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'vae.pt'}: complete" in out and f"{tmp_path / 'mask_ae.pt'}: complete" in out
    saved = torch.load(tmp_path / "axf.pt", weights_only=True)
    assert saved["config"]["use_ddf"] is False and saved["model"]["unet.conv_in.weight"].shape[1] == 4
    with pytest.raises(ValueError, match=r"vae.pt was trained with another architecture \(vae_channels 32 -> 64\)"):
        train.main(args + ["--use_ddf", "False", "--vae_channels", "64"])


@pytest.mark.filterwarnings("ignore:.*meta parameter")  # the weights themselves are not the point here
def test_resume_puts_optimiser_and_ema_state_on_the_training_device():
    """A checkpoint is read on the CPU; resuming on a GPU must move the EMA and optimiser state there, or the
    first EMA update mixes devices. The meta device stands in for the GPU: no GPU is needed to test it."""
    model = torch.nn.Linear(3, 2)
    optimizer, ema = torch.optim.AdamW(model.parameters()), training.EMA(model, 0.9)
    model(torch.rand(4, 3)).sum().backward()
    optimizer.step()
    ema.update(model, 0)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(), "step": 1,
             "rng": None, "torch_rng": checkpoints.rng_state()}
    on_device = torch.nn.Linear(3, 2, device="meta")
    optimizer_there, ema_there = torch.optim.AdamW(on_device.parameters()), training.EMA(on_device, 0.9)
    assert checkpoints.restore(state, 2, on_device, optimizer_there, ema_there, where="test") == 1
    assert all(v.device.type == "meta" for v in ema_there.shadow.values())
    assert all(v.device.type == "meta" for s in optimizer_there.state.values() for k, v in s.items() if k != "step")
    ema_there.update(on_device, 1)  # mixes no devices


def test_ema_warms_up_then_averages_and_checkpoints_load_the_averaged_weights(trained):
    """The EMA's decay is (1 + step) / (10 + step) until it reaches ema_decay; load_checkpoint samples from the EMA."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = training.EMA(model, decay=0.99)
    model.weight.data.fill_(1.0)
    ema.update(model, 0)  # decay 1/10: the average moves 90% of the way
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    ema.update(model, 10_000)  # decay capped at 0.99
    assert ema.shadow["weight"].item() == pytest.approx(0.9 + 0.1 * 0.01)
    checkpoint = torch.load(trained / "axf.pt", weights_only=True)
    averaged, _ = checkpoints.load_checkpoint(trained / "axf.pt")
    raw, _ = checkpoints.load_checkpoint(trained / "axf.pt", use_ema=False)
    name = "unet.conv_in.weight"
    assert not torch.equal(checkpoint["ema"][name], checkpoint["model"][name])
    assert torch.equal(averaged.state_dict()[name], checkpoint["ema"][name])
    assert torch.equal(raw.state_dict()[name], checkpoint["model"][name])


def test_warmup_steps_zero_trains_at_the_full_learning_rate(toy_root, tmp_path):
    """--warmup_steps 0 means no warm-up (it divided by zero)."""
    train.main(["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(tmp_path)] + TINY
               + ["--warmup_steps", "0", "--steps", "1"])
    state = torch.load(tmp_path / "axf.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == state["config"]["lr"]


def test_make_batch_rolls_each_latent_and_its_mask_together():
    """The shift augmentation moves an anomaly's latent and its mask by the same whole cells."""
    settings = config.resolve("toy", dict(image_size=16, vae_channel_mult=(1, 2), batch_size=4))
    masks = torch.zeros(3, 1, 16, 16)
    masks[:, :, 4:6, 6:8] = 1  # exactly latent cell (2, 3)
    latents = torch.zeros(3, 4, 8, 8)
    latents[:, :, 2, 3] = 1
    train_set = {"masks": masks, "captions": ["a", "b", "c"], "texture_ids": torch.tensor([1, 1, 2]),
                 "normals": torch.zeros(2, 3, 16, 16), "normal_texture_ids": torch.zeros(2, dtype=torch.long),
                 "num_normals": [2], "num_anomalies": [3]}
    generator, moved = torch.Generator().manual_seed(0), False
    for _ in range(5):
        batch = train.make_batch(train_set, {"anomalies": latents, "normals": torch.zeros(2, 4, 8, 8)}, settings,
                                 generator, torch.device("cpu"))
        z, m, captions, ids, is_anomaly = (batch[k] for k in ("latents", "masks", "captions", "texture_ids", "is_anomaly"))
        assert is_anomaly.tolist() == [True, True, True, False] and captions[3] == "" and ids[3] == 0
        for zi, mi in zip(z[:3], m[:3]):
            assert torch.equal(axf.latent_mask(mi[None], 2)[0, 0] > 0, zi[0] > 0)
            moved |= not zi[0, 2, 3]
    assert moved


def test_training_reads_only_the_few_shot_anomalies(toy_root, monkeypatch):
    """The held-out two thirds are the test set of evaluate.py: training never opens them."""
    category = data.load_category(toy_root / "bottle")
    few_shot, held_out = data.few_shot_split(category.anomalies)
    opened = []
    read_image, read_mask = data.read_image, data.read_mask
    monkeypatch.setattr(data, "read_image", lambda p, s: opened.append(Path(p)) or read_image(p, s))
    monkeypatch.setattr(data, "read_mask", lambda a, s: opened.append(a.image) or read_mask(a, s))
    train_set = train.load_training_set([toy_root / "bottle"], config.resolve("toy", dict(image_size=32)))
    assert len(train_set["captions"]) == len(few_shot)
    assert not {a.image for a in held_out} & set(opened)
    assert {a.image for a in few_shot} <= set(opened)


def test_colour_blobs_paint_one_colour_inside_their_mask_and_nothing_outside():
    """The VAE's colour augmentation: a blob of one colour per image, its mask returned, the rest untouched."""
    torch.manual_seed(0)
    images, masks = torch.rand(4, 3, 32, 32), torch.zeros(4, 1, 32, 32)
    original = images.clone()
    train.paint_colour_blobs(images, masks, probability=1.0)
    for image, before, mask in zip(images, original, masks):
        inside = mask[0] > 0
        assert inside.any() and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(image[:, ~inside], before[:, ~inside])
        colour = image[:, inside]
        assert torch.allclose(colour, colour[:, :1].expand_as(colour))
    untouched = torch.rand(4, 3, 32, 32)
    copy = untouched.clone()
    train.paint_colour_blobs(untouched, torch.zeros(4, 1, 32, 32), probability=0.0)
    assert torch.equal(untouched, copy)


def test_similar_normals_finds_the_normal_image_an_anomaly_was_drawn_on(toy_root, tmp_path):
    """An anomaly whose pixels outside its mask are one normal image's must be matched to that image first,
    however different it is inside the mask."""
    category = data.load_category(toy_root / "bottle")
    twin, mask_files = 7, category.anomalies[0].mask_files
    image, mask = data.read_image(category.train_good[twin], 32), data.read_mask(mask_files, 32)
    sample.save_png(torch.where(mask > 0, 1 - image, image), tmp_path / "anomaly.png")  # inside: the negative
    anomaly = data.Anomaly(image=tmp_path / "anomaly.png", mask_files=mask_files, caption="x", defect="d")
    nearest = data.similar_normals(category, [anomaly], k=3, size=32)[anomaly.image]
    assert nearest[0] == twin and len(nearest) == 3 == len(set(nearest))


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


BAD_INPUT = [
    (["train.py", "--category", "bottle", "--data_root", "/nonexistent"], "--toy"),
    (["train.py", "--category", "bottle", "--toy", "--steps", "many"], "invalid"),
    (["train.py", "--category", "bottle", "--toy", "--no_such_key", "1"], "unrecognized arguments"),
    (["train.py", "--category", "bottle", "--toy", "--clip", "/nonexistent/ViT-B-32.pt", "--out_dir", "/tmp/axf_never"],
     "ViT-B-32.pt"),
    (["sample.py", "--category", "bottle", "--ckpt", "/nonexistent/axf.pt"], "no such checkpoint"),
]

# Each command of BAD_INPUT run as `python <script> ...` runs it (its `if __name__ == "__main__"` block), in one
# interpreter for all of them (an interpreter starting torch takes seconds): the exit status and the last line of
# standard error that the interpreter would give, SystemExit's text included.
RUN_EACH = """
import contextlib, io, json, runpy, sys
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv, err, code = argv, io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
            if isinstance(stop.code, str):
                print(stop.code, file=err)
    results.append((code, err.getvalue()))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_input_results():
    result = run_script("-c", RUN_EACH, json.dumps([args for args, _ in BAD_INPUT]))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(BAD_INPUT)))
def test_bad_input_gets_one_clear_line_and_nonzero_exit(bad_input_results, case):
    """Bad flags, missing folders and missing weight files stop the script with a message a user can act on."""
    returncode, stderr = bad_input_results[case]
    assert returncode != 0
    last_line = stderr.strip().splitlines()[-1]
    assert BAD_INPUT[case][1] in last_line, stderr


def test_help_explains_config_keys_with_axf_help(capsys):
    """`train.py --help` shows each key's help text (config.KEYS) and its default in the preset that will run:
    toy with --toy, mvtec without, or the one --preset names."""
    with pytest.raises(SystemExit):
        train.main(["--help", "--toy"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--vae_defect_weight FLOAT extra L1 weight of few-shot defect pixels" in text
    assert "--ema_decay FLOAT decay of the weights' moving average that samples are drawn from (default: 0.999)" in text
    assert all(key.help for key in config.KEYS.values())  # every key says what it does
    for argv in (["--help"], ["--help", "--toy", "--preset", "mvtec"]):
        with pytest.raises(SystemExit):
            train.main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert "the mvtec preset's defaults" in text and "(default: 0.9999)" in text and "(default: 256)" in text


def test_prompt_and_reference_say_when_their_ablation_switch_is_off(trained, monkeypatch, capsys):
    """--prompt without semantic tokens steers nothing, and --reference without MIF has no texture tokens to set:
    sample.py says so instead of silently ignoring them."""
    load_checkpoint = checkpoints.load_checkpoint

    def ablated(*a, **k):
        model, checkpoint = load_checkpoint(*a, **k)
        model.config["use_text"] = model.config["use_mif"] = False
        return model, checkpoint

    monkeypatch.setattr(checkpoints, "load_checkpoint", ablated)
    args = ["--category", "bottle", "--ckpt", str(trained)]
    with pytest.raises(ValueError, match="--reference sets the texture tokens .* use_mif False"):
        sample.main(args + ["--reference", "a.png", "--reference_mask", "a_mask.png"])
    monkeypatch.setattr(sample, "plan", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # stop after the checks
    with pytest.raises(KeyboardInterrupt):
        sample.main(args + ["--prompt", "a red stain"])
    assert "--prompt is only written to prompt/, it steers nothing" in capsys.readouterr().out


def test_a_clip_file_sets_context_dim_before_the_config_is_printed(toy_root, tmp_path, monkeypatch, capsys):
    """The printed (and saved) config shows the CLIP file's embedding width, not the preset's."""
    torch.manual_seed(0)
    tiny = clip.CLIP(embed_dim=24, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    torch.save(tiny.state_dict(), tmp_path / "tiny_clip.pt")
    monkeypatch.setattr(train, "load_training_set", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train.main(["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(tmp_path)] + TINY
                   + ["--clip", str(tmp_path / "tiny_clip.pt")])
    out = capsys.readouterr().out
    assert "context_dim set to 24" in out and "'context_dim': 24" in out.split("config: ")[1]
