"""toy_sd.py, the miniature SD: what it writes must be an SD-1.x file that load_sd reads back as the same model,
with SD's latent scale. (The pretraining itself is run by hand: README, 'Pretrained Stable Diffusion'.)"""
import argparse

import pytest
import torch

import checkpoints
import sd
import toy_sd


def test_rescaled_vae_has_sd_latent_scale_and_decodes_the_same():
    """match_sd_scale moves the latent std to 1 / 0.18215 (what load_sd assumes of every SD file) without
    changing the autoencoder: decode(encode(x)) is the same before and after."""
    torch.manual_seed(0)
    vae = toy_sd.VAE(**toy_sd.VAE_SIZES).eval()
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(images).mode())
        s = toy_sd.match_sd_scale(vae, images)
        after = vae.decode(vae.encode(images).mode())
        generator = torch.Generator().manual_seed(1)
        z = torch.cat([vae.encode(x).sample(generator) for x in images.split(8)])
    assert s > 0 and vae.scale_factor.item() == pytest.approx(sd.SD_SCALE_FACTOR)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert abs(z.std().item() * sd.SD_SCALE_FACTOR - 1) < 0.1


def test_toy_models_round_trip_through_an_sd_file(tmp_path):
    """The miniature's sizes are SD-1.x's structure at toy widths: save_sd -> load_sd rebuilds them exactly."""
    args = argparse.Namespace(text_width=64, text_layers=1, unet_channels=32)
    vae, unet, text = toy_sd.build_networks(args)
    path = sd.save_sd(tmp_path / "toy.safetensors", vae, unet, text)
    vae2, unet2, text2 = sd.load_sd(path)
    for a, b in ((vae, vae2), (unet, unet2), (text, text2)):
        sa, sb = a.state_dict(), b.state_dict()
        sa.pop("scale_factor", None), sb.pop("scale_factor", None)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert unet2.sd_sizes["channel_mult"] == (1, 2, 2) and unet2.sd_sizes["context_dim"] == 64


TINY_FLAGS = ["--seeds", "1", "--size", "16", "--vae_steps", "4", "--steps", "4", "--checkpoint_every", "2",
              "--unet_channels", "32", "--text_width", "64", "--text_layers", "1", "--batch_size", "4",
              "--vae_batch_size", "2", "--vae_categories", "bottle"]


def tiny_world(category, seeds, size):
    """A stand-in for load_world: 8 random images at `size` px, half anomalous, with toy captions."""
    g = torch.Generator().manual_seed(0)
    captions = [toy_sd.normal_caption(category)] * 4 + [f"A large {c} contamination lies inside the bottle"
                                                        for c in ("red", "blue", "green", "yellow")]
    return dict(images=torch.randint(0, 256, (8, 3, size, size), generator=g, dtype=torch.uint8), captions=captions,
                anomalous=torch.arange(8) >= 4)


class Killed(Exception):
    """A kill between two checkpoints."""


def dying(function, n):
    """`function`, raising Killed at its n-th call."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Killed
        return function(*args, **kwargs)
    return wrapped


def test_a_run_killed_in_either_stage_resumes_to_the_same_file(tmp_path, monkeypatch, capsys):
    """Killed after the VAE's step-2 checkpoint, then before the UNet + text tower's first step, then after its step-2
    checkpoint: each re-run resumes where the last checkpoint left it (weights, optimiser, EMA, every RNG, the
    batches' generator handed from one stage to the next) and writes the very bytes of an uninterrupted run."""
    monkeypatch.setattr(toy_sd, "load_world", tiny_world)
    toy_sd.main(["--out", str(tmp_path / "whole" / "sd.safetensors")] + TINY_FLAGS)
    out = tmp_path / "killed" / "sd.safetensors"
    for step_function, call, stage, step in (("generic_images", 3, "vae", 2), ("pick", 1, "vae", 4), ("pick", 3, "ldm", 2)):
        with monkeypatch.context() as patch:
            patch.setattr(toy_sd, step_function, dying(getattr(toy_sd, step_function), call))
            with pytest.raises(Killed):
                toy_sd.main(["--out", str(out)] + TINY_FLAGS)
        assert checkpoints.read_checkpoint(f"{out}.{stage}.pt")["step"] == step
        capsys.readouterr()
    toy_sd.main(["--out", str(out)] + TINY_FLAGS)
    printed = capsys.readouterr().out
    assert f"{out}.vae.pt: complete at step 4" in printed and f"resuming from {out}.ldm.pt at step 2" in printed
    for name in ("sd.safetensors", "sd.png"):
        assert (out.parent / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_flags_come_from_the_table_and_are_checked(capsys):
    """Every TOY_SD_KEYS row is a flag with its help and default; a value its row does not allow is refused in one
    line naming the flag, and a changed fixed key is what a resume refuses."""
    with pytest.raises(SystemExit):
        toy_sd.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(f"--{name}" in shown and f"(default: {key.default})" in shown for name, key in toy_sd.TOY_SD_KEYS.items())
    for flags, message in ((["--unet_channels", "48"], "--unet_channels must be >= 32, a multiple of 32, not 48"),
                           (["--vae_categories", "bottle,glass"], "'glass' is no toy category")):
        with pytest.raises(SystemExit):
            toy_sd.parse_args(flags)
        assert message in capsys.readouterr().err
    recipe = toy_sd.recipe(toy_sd.parse_args(["--steps", "5", "--threads", "1"]))
    assert "steps" not in recipe and "threads" not in recipe and recipe["lr"] == toy_sd.TOY_SD_KEYS["lr"].default
