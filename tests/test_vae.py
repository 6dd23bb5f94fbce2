"""vae.VAE: the KL autoencoder that maps images to the latents the diffusion runs on (LDM's kl-f4 / kl-f8)."""
import math

import pytest
import torch

from vae import VAE, DiagonalGaussian, vae_loss

TINY = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4)


@pytest.mark.parametrize("channel_mult, f", [((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_latent_is_f_times_smaller_and_decodes_back_to_image_size(channel_mult, f):
    """f = 2 ** (levels - 1): 64 px -> 16x16 latents for the toy preset's f = 4, 256 px -> 32x32 for kl-f8."""
    vae = VAE(channels=32, channel_mult=channel_mult, num_res_blocks=1, latent_channels=4)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 16 // f, 24 // f)
    assert vae.decode(posterior.sample()).shape == x.shape
    with pytest.raises(ValueError, match="divisible by the downsampling factor"):
        vae.encode(torch.zeros(1, 3, 16 + f // 2, 16))


# (name, shape) pairs of Stable Diffusion 1.x's first_stage_model (LDM kl-f8) checkpoint
KL_F8_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.k.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.block_2.norm2.bias": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.attn_1.proj_out.bias": (512,),
    "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


def test_state_dict_uses_the_ldm_kl_f8_names_and_shapes():
    """Stable Diffusion's VAE must load by a rule (strip a prefix): same names, same shapes, nothing extra."""
    with torch.device("meta"):  # kl-f8 has 84M parameters: shapes only, no memory
        vae = VAE()
    sd = vae.state_dict()
    for name, shape in KL_F8_KEYS.items():
        assert name in sd and tuple(sd[name].shape) == shape, name
    assert "encoder.down.3.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert not any(".attn" in k for k in sd if ".mid." not in k)  # attention in the middle only
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # kl-f8's count
    assert len(sd) == 248 + 1  # the checkpoint's 248 tensors, plus our scale_factor buffer


def test_kl_is_nonnegative_and_matches_the_closed_form():
    """KL(N(m, e^l) || N(0, 1)) = ½(m² + e^l - 1 - l) per element: 0 only at m = 0, l = 0, positive elsewhere."""
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl(), torch.zeros(2))
    mean, logvar = torch.full((1, 4, 3, 3), 0.5), torch.full((1, 4, 3, 3), -1.0)
    expected = 0.5 * (0.25 + math.exp(-1.0) - 1 + 1.0) * 4 * 9
    torch.testing.assert_close(DiagonalGaussian(torch.cat([mean, logvar], 1)).kl(), torch.tensor([expected]))
    kl = VAE(**TINY).encode(torch.rand(3, 3, 8, 8) * 2 - 1).kl()
    assert kl.shape == (3,) and bool((kl >= 0).all())


def test_posterior_samples_have_its_mean_and_std_and_logvar_is_clamped():
    """sample() is mean + std·ε (reparameterised, seedable); logvar is clamped to [-30, 20] as in LDM."""
    params = torch.cat([torch.full((1, 4, 64, 64), 2.0), torch.full((1, 4, 64, 64), math.log(0.25))], 1)
    posterior = DiagonalGaussian(params)
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 2.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    assert torch.equal(z, posterior.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(posterior.mode(), posterior.mean)
    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 2), torch.tensor([[[[-100.0, 100.0]]]])], 1))
    assert extreme.logvar.flatten().tolist() == [-30.0, 20.0]


def test_scale_factor_gives_unit_std_latents_and_is_saved():
    """Diffusion assumes latents of unit std like ε: measure_scale_factor sets 1/std, and it travels with the weights."""
    torch.manual_seed(0)
    vae = VAE(**TINY)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        unscaled = vae.encode(x).mode()
        vae.measure_scale_factor(unscaled)
        z = vae.encode_latents(x, sample=False)
        assert abs(z.std().item() - 1.0) < 1e-5
        torch.testing.assert_close(vae.decode_latents(z), vae.decode(unscaled))
    copy = VAE(**TINY)
    copy.load_state_dict(vae.state_dict())
    assert copy.scale_factor.item() == pytest.approx(1.0 / unscaled.std().item())


def test_loss_weights_kl_per_element_like_ldm():
    """LDM sums the L1 and the KL over a sample's pixels; with a per-element L1 the KL is divided by C·H·W."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    loss, logs = vae_loss(VAE(**TINY), x, kl_weight=0.5)
    assert set(logs) == {"loss", "rec", "kl"}
    torch.testing.assert_close(loss.detach(), logs["rec"] + 0.5 * logs["kl"] / (3 * 8 * 8))


def test_pixel_weight_makes_the_l1_a_weighted_mean_over_pixels():
    """train.py weights defect pixels up: the reconstruction term is sum(w |x - x'|) / sum(w) over C, H, W."""
    vae, x = VAE(**TINY), torch.rand(2, 3, 8, 8) * 2 - 1
    weight = torch.ones(2, 1, 8, 8)
    weight[:, :, 2:5, 3:6] = 11.0
    torch.manual_seed(0)
    reconstruction, _ = vae(x)  # the same posterior noise as the loss calls below draw
    error = (x - reconstruction).abs().detach()
    torch.manual_seed(0)
    _, logs = vae_loss(vae, x, pixel_weight=weight)
    torch.testing.assert_close(logs["rec"], (error * weight).sum() / (weight.sum() * 3))
    torch.manual_seed(0)
    _, plain = vae_loss(vae, x, pixel_weight=torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(plain["rec"], error.mean())


def test_training_reduces_reconstruction_error():
    """A few dozen steps of vae_loss on a tiny image set must clearly lower the L1 error: encoder and decoder learn."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # smooth images (a few colours, blurred blocks): learnable in a few steps, unlike white noise
    x = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    vae = VAE(**TINY)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    recs = []
    for _ in range(40):
        loss, logs = vae_loss(vae, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recs.append(logs["rec"].item())
    assert recs[-1] < recs[0] / 2, (recs[0], recs[-1])  # a loose bound: the error falls much further
