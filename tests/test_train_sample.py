"""train.py and sample.py end to end on a tiny toy category: every stage, resuming, the output layout, errors."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import axf
import data
import sample
import train

REPO = Path(__file__).resolve().parent.parent

# every stage at the smallest size that still runs the real code paths
TINY = ["--preset", "toy", "--image_size", "32", "--vae_channels", "32", "--vae_channel_mult", "1,2",
        "--unet_channels", "32", "--unet_channel_mult", "1,2", "--unet_num_res_blocks", "1", "--context_dim", "32",
        "--unet_num_heads", "2", "--num_tokens", "2", "--mask_channels", "8", "--mask_feature_channels", "16",
        "--vae_steps", "2", "--mask_steps", "2", "--steps", "4", "--batch_size", "4", "--vae_batch_size", "4",
        "--checkpoint_every", "2", "--preview_every", "4", "--sample_steps", "2", "--num_diffusion_steps", "50"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    data.make_toy(root, "bottle", size=32, seed=0)
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
    checkpoint = torch.load(trained / "axf.pt", weights_only=False)
    assert checkpoint["step"] == 4 and checkpoint["config"]["image_size"] == 32
    assert not any(k.startswith("clip.") for k in checkpoint["model"])  # CLIP is saved apart


def test_checkpoint_loads_by_itself_with_its_config(trained):
    """sample.py needs no size flags: the checkpoint carries its config, defects and the random CLIP."""
    model, checkpoint = axf.load_checkpoint(trained / "axf.pt")
    assert model.config["unet_channels"] == 32 and model.defects[0] == "good"
    assert model.defects[1:] == data.load_category(Path(checkpoint["data_folder"])).defects


def test_sampling_writes_one_mvtec_category_folder(trained, toy_root, tmp_path):
    """sample.py's output is one MVTec AD category, read back by data.load_category, with the preview beside it."""
    out = tmp_path / "samples" / "bottle"
    sample.main(["--category", "bottle", "--ckpt", str(trained), "--n", "2", "--out_dir", str(out), "--batch_size", "3"])
    category, source = data.load_category(out), data.load_category(toy_root / "bottle")
    assert len(category.anomalies) == 2 * len(category.defects) and (tmp_path / "samples" / "bottle_preview.png").is_file()
    assert len(category.train_good) == len(source.train_good) and len(category.test_good) == len(source.test_good)
    for anomaly in category.anomalies:
        assert anomaly.caption and (out / "prompt" / anomaly.defect).is_dir()


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
    nearest = sample.similar_normals(category, [anomaly], k=3, size=32)[anomaly.image]
    assert nearest[0] == twin and len(nearest) == 3 == len(set(nearest))


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train.py", "--category", "bottle", "--data_root", "/nonexistent"], "--toy"),
    (["train.py", "--category", "bottle", "--toy", "--steps", "many"], "invalid"),
    (["train.py", "--category", "bottle", "--toy", "--no_such_key", "1"], "unrecognized arguments"),
    (["train.py", "--category", "bottle", "--toy", "--clip", "/nonexistent/ViT-B-32.pt", "--out_dir", "/tmp/axf_never"],
     "ViT-B-32.pt"),
    (["sample.py", "--category", "bottle", "--ckpt", "/nonexistent/axf.pt"], "no such checkpoint"),
])
def test_bad_input_gets_one_clear_line_and_nonzero_exit(args, message):
    """Bad flags, missing folders and missing weight files stop the script with a message a user can act on."""
    result = run_script(*args)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert message in last_line, result.stderr


def test_help_explains_config_keys_with_their_comments_in_axf_config(capsys):
    """`train.py --help` reads each key's comment from axf.CONFIG, so the two cannot drift apart."""
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--vae_defect_weight FLOAT extra L1 weight of few-shot defect pixels" in text
    assert "--ema_decay FLOAT (default: 0.999)" in text  # no comment: the default alone
