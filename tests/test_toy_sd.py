"""toy_sd.py, the miniature SD: what it writes must be an SD-1.x file that load_sd reads back as the same model,
with SD's latent scale. (The pretraining itself is run by hand: README, 'Pretrained Stable Diffusion'.)"""
import argparse

import pytest
import torch

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
