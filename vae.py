"""The KL autoencoder of latent diffusion: images <-> latents (the "latent" of the paper's latent diffusion, §4).

The diffusion process of §4.3 (Eq. (6)-(17)) runs on the latents z = E(x), not on pixels: an image of
H x W x 3 becomes a latent of H/f x W/f x 4 with f = 2 ** (len(channel_mult) - 1) (f = 8 for Stable
Diffusion's kl-f8, f = 4 for the toy preset). The encoder outputs a diagonal Gaussian posterior q(z|x);
a tiny KL term to N(0, I) keeps the latent space smooth without forcing it to be Gaussian.

Modules are named exactly like the LDM checkpoint keys (CompVis/latent-diffusion
`ldm/modules/diffusionmodules/model.py`: `encoder.down.0.block.0.norm1`, `encoder.mid.attn_1.q`,
`quant_conv`, `decoder.up.3.upsample.conv`, ...), so Stable Diffusion 1.x's VAE loads by the rule
"strip the `first_stage_model.` prefix" (sd.py's, with diffusers' layout: this file holds its own layout only).
Depends on torch only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)  # LDM's choice: 32 groups, eps 1e-6


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers with a residual; a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv q, k, v (LDM keys); used in the middle only."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # one head of width C: [B, 1, HW, C], 4-D so that SDPA may pick a fused CUDA kernel
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # [B, HW, C]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halve H and W: a strided 3x3 conv with LDM's asymmetric padding (right and bottom only)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: a list of ResnetBlocks (`block.{j}`), then an optional `downsample`/`upsample`."""

    def __init__(self, blocks, resample_name=None, resample=None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)  # named like the checkpoint: downsample or upsample

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


class Mid(nn.Module):
    """The bottleneck: ResnetBlock, self-attention, ResnetBlock (`block_1`, `attn_1`, `block_2`)."""

    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """x [B, 3, H, W] -> Gaussian parameters [B, 2 * latent, H / f, W / f] (mean and log-variance)."""

    def __init__(self, in_channels, channels, channel_mult, num_res_blocks, latent_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = channels
        for i, mult in enumerate(channel_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(ch, channels * mult))
                ch = channels * mult
            last = i == len(channel_mult) - 1
            self.down.append(Level(blocks, "downsample", None if last else Downsample(ch)))
        self.mid = Mid(ch)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)  # mean and logvar ("double_z")

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z [B, latent, h, w] -> image [B, 3, h * f, w * f]. `up.{i}` is level i, run from the deepest up."""

    def __init__(self, out_channels, channels, channel_mult, num_res_blocks, latent_channels):
        super().__init__()
        ch = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = Mid(ch)
        levels = []
        for i, mult in reversed(list(enumerate(channel_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):  # one more block than the encoder, as in LDM
                blocks.append(ResnetBlock(ch, channels * mult))
                ch = channels * mult
            levels.insert(0, Level(blocks, "upsample", None if i == 0 else Upsample(ch)))
        self.up = nn.ModuleList(levels)  # indexed by level, so the keys match the checkpoint's
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))), from the encoder's [B, 2C, h, w] output."""

    def __init__(self, parameters):
        self.mean, logvar = parameters.chunk(2, dim=1)  # [B, C, h, w] each
        self.logvar = logvar.clamp(-30.0, 20.0)  # LDM's clamp: exp() stays finite in float32
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None, noise=None):
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise  # the reparameterisation trick: gradients reach mean and std

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) per sample [B], summed over C, h, w; ≥ 0 and 0 only for mean 0, logvar 0."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class VAE(nn.Module):
    """LDM's KL autoencoder (AutoencoderKL). Images in [-1, 1]; latents at 1/f the size, f = 2 ** (levels - 1)."""

    def __init__(self, in_channels=3, channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4):
        super().__init__()
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.encoder = Encoder(in_channels, channels, channel_mult, num_res_blocks, latent_channels)
        self.decoder = Decoder(in_channels, channels, channel_mult, num_res_blocks, latent_channels)
        # 1x1 convs between the autoencoder and the latent (LDM's embed_dim == z_channels here)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        # latents are multiplied by this before diffusion, so that they have unit std like the noise ε.
        # LDM measured 1 / std of kl-f8's latents on a batch of images: 0.18215, Stable Diffusion's constant.
        # A buffer, so it travels in the state dict with the weights it was measured for.
        self.register_buffer("scale_factor", torch.tensor(1.0))

    def encode(self, x):
        """x [B, 3, H, W] in [-1, 1] -> the posterior q(z | x), a DiagonalGaussian over [B, C, H / f, W / f]."""
        H, W = x.shape[-2:]
        if H % self.downsample_factor or W % self.downsample_factor:
            raise ValueError(f"VAE input {H}x{W} must be divisible by the downsampling factor {self.downsample_factor}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z [B, C, h, w] (unscaled latents) -> images [B, 3, h * f, w * f], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, noise=None):
        posterior = self.encode(x)
        return self.decode(posterior.sample(noise=noise)), posterior

    @torch.no_grad()
    def measure_scale_factor(self, latents):
        """Set scale_factor = 1 / std of unscaled latents (e.g. posterior samples of a batch of training images),
        the way LDM found 0.18215; returns the value."""
        self.scale_factor.fill_(1.0 / latents.float().std().item())
        return self.scale_factor.item()

    def encode_latents(self, x, sample=True, generator=None):
        """Images -> the scaled latents the diffusion model works on (a posterior sample, or its mean)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor.to(z.dtype)

    def decode_latents(self, z):
        """Scaled latents (what the sampler produces) -> images."""
        return self.decode(z / self.scale_factor.to(z.dtype))


def vae_loss(vae, x, kl_weight=1e-6, pixel_weight=None, noise=None, weight_sum=None):
    """L1 reconstruction + kl_weight * KL, as LDM trains kl-f8 (without its LPIPS and GAN terms).

    LDM sums both terms over the pixels of a sample (then averages over the batch). We report the
    reconstruction as a per-element mean, so the KL is divided by the same element count C * H * W:
    the loss is LDM's divided by a constant, and LDM's kl_weight = 1e-6 keeps its meaning.
    pixel_weight [B, 1, H, W] (optional) makes it a weighted mean: train.py weights defect pixels up.
    noise: the posterior sample's ε (default: drawn here). weight_sum: what the weighted sum is divided
    by (default: the weights' own sum; a share of a batch on one of N processes: the whole batch's / N).
    """
    reconstruction, posterior = vae(x, noise)
    error = (x - reconstruction).abs()
    if pixel_weight is None:
        rec = error.mean()
    else:
        weight = pixel_weight.expand_as(error)
        rec = (error * weight).sum() / (weight.sum() if weight_sum is None else weight_sum)
    kl = posterior.kl().mean()  # nats per sample
    loss = rec + kl_weight * kl / x[0].numel()
    logs = {"loss": loss.detach(), "rec": rec.detach(), "kl": kl.detach()}
    return loss, logs

