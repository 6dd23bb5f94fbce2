"""toy_vae.py, the VAE pretrained on the toy world, and train.py's --vae_weights: the shipped file reconstructs a
toy world it never saw, a run given pretrained weights skips stage 1 and keeps them exactly, and weights of other
sizes are refused in one line. (The pretraining itself is run by hand: docs/results.md.)"""
import pytest
import torch

import axf
import config
import files
import sd
import toy
import toy_vae
import train
from test_train_sample import TINY, toy_root  # noqa: F401 (a fixture)


def tiny_vae_file(tmp_path, kind):
    """A random VAE of TINY's sizes (32 px, channels 32, mult 1,2), written as toy_vae.py writes its file (fp16,
    gzip) or as a Stable Diffusion VAE file (vae-ft-mse-840000's layout: LDM's names, safetensors, fp32)."""
    settings = config.resolve("toy", {"image_size": 32, "vae_channel_mult": (1, 2)})
    torch.manual_seed(3)
    vae = axf.build_vae(settings)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initialisation stage 1 would start from
    if kind == "toy":
        return toy_vae.save_toy_vae(vae, tmp_path / "vae.pt.gz"), {k: v.half().float() for k, v in vae.state_dict().items()}
    files.write_safetensors(sd.vae_to_sd(vae.state_dict()), tmp_path / "vae.safetensors", metadata={"format": "pt"})
    return tmp_path / "vae.safetensors", vae.state_dict()


def test_pretrained_weights_skip_stage_1_and_are_kept(toy_root, tmp_path, capsys):  # noqa: F811
    """--vae_weights FILE (toy_vae.py's): train_vae takes no step; vae.pt, written complete, holds the file's weights
    exactly and a latent scale factor measured on this run's images."""
    path, source = tiny_vae_file(tmp_path, "toy")
    settings = config.resolve("toy", dict(image_size=32, vae_channel_mult=(1, 2), vae_steps=2, vae_weights=str(path)))
    training_set = train.load_training_set([toy_root / "bottle"], settings)
    train.train_vae(training_set, settings, tmp_path, torch.device("cpu"), train.read_vae_weights(settings))
    printed = capsys.readouterr()
    assert f"vae: pretrained, from {path}" in printed.out and "1/3 vae" not in printed.err
    saved = torch.load(tmp_path / "vae.pt", weights_only=True)
    assert saved["step"] == 2 and saved["config"]["vae_weights"] == str(path)  # --vae_steps 2: complete
    for name, value in source.items():
        if name != "scale_factor":
            assert torch.equal(saved["model"][name], value), name
    scale = saved["model"]["scale_factor"].item()
    assert scale != 1.0 and f"vae: latent scale factor {scale:.4f}" in printed.out


def test_a_stable_diffusion_vae_file_gives_its_weights_as_they_are(tmp_path):
    """--vae_weights vae-ft-mse-840000-ema-pruned.safetensors (here a tiny one in its layout): read through sd.py,
    every tensor as the file holds it, for the VAE of the config."""
    path, source = tiny_vae_file(tmp_path, "sd")
    settings = config.resolve("toy", {"image_size": 32, "vae_channel_mult": (1, 2), "vae_weights": str(path)})
    read_from, state = train.read_vae_weights(settings)
    assert read_from == path
    assert all(torch.equal(state[k], v) for k, v in source.items() if k != "scale_factor")


def test_pretrained_weights_of_other_sizes_are_refused_in_one_line(toy_root, tmp_path):  # noqa: F811
    """The shipped toy VAE is 64 px with three levels; TINY's is 32 px with two: one line naming the sizes and
    the flag that trains one instead."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"a VAE of other sizes than --image_size 32 .* pass --vae_weights train"):
        train.main(["--category", "bottle", "--data_root", str(toy_root), "--out_dir", str(out)] + TINY +
                   ["--vae_weights", "toy"])


def test_the_toy_preset_uses_the_shipped_vae_and_an_older_run_trained_its_own():
    """The toy preset's default is the shipped file; a checkpoint saved before the key existed trained its VAE."""
    assert config.resolve("toy")["vae_weights"] == "toy" and config.resolve("mvtec")["vae_weights"] == "train"
    current = config.resolve("toy")
    older = {k: v for k, v in current.items() if k != "vae_weights"}
    assert config.architecture_changes(older, current, ("image_size", "vae_")) == ["vae_weights 'train' -> 'toy'"]


def test_shipped_vae_reconstructs_a_toy_world_it_never_saw(tmp_path):
    """Small in the repository; the toy preset's VAE loads it strictly and gives back the defects of toy world 0
    (which toy_vae.py never trains on) within 0.08 mean L1 inside their masks; random weights are far off."""
    assert toy_vae.SHIPPED.stat().st_size < 4e6
    vae = axf.build_vae(config.resolve("toy"))
    folders = {"cable": toy.make_toy(tmp_path, "cable", size=64, seed=0)}
    random_inside, _ = toy_vae.measure(vae.eval(), folders)["cable"]
    vae.load_state_dict(toy.read_toy_vae(toy_vae.SHIPPED, tmp_path / "unpacked"))
    inside, outside = toy_vae.measure(vae.eval(), folders)["cable"]
    assert inside < 0.08 and outside < 0.05 and random_inside > 0.2
