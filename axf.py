"""AnomalyXFusion: the method of the paper (§4), on top of clip.py, vae.py, unet.py and mask_encoder.py.

What this file holds, in reading order:
  CONFIG           one flat dict of every setting, with a toy (CPU) and an MVTec (one GPU) preset
  DDPM             the noise schedule and the samplers (Eq. 6-12, 15): q_sample, ancestral step, DDIM step
"""
import math

import torch

# ----------------------------------------------------------------------------------------------
# CONFIG: one flat dict, so that every key can be overridden as `--key value` on the command line.
# A preset only changes sizes and budgets; a checkpoint stores the resolved dict.

CONFIG = dict(
    preset="toy",
    seed=0,
    device="auto",            # "auto" picks cuda when present (bf16 autocast), else cpu
    image_size=64,
    # KL autoencoder (vae.py): two downsamplings -> 64 px images become 16x16x4 latents
    vae_channels=32,
    vae_channel_mult=(1, 2, 4),
    vae_latent_channels=4,
    vae_kl_weight=1e-6,       # LDM's kl-f8 weight: the latent stays close to a plain autoencoder
    # latent UNet (unet.py)
    unet_channels=64,
    unet_channel_mult=(1, 2, 2),
    unet_num_res_blocks=2,
    unet_attention_levels=(0, 1),
    unet_num_heads=4,
    # the X-embedding (paper §4.2): k tokens per modality, each of width d = the CLIP embedding
    # width (taken from the checkpoint when --clip is given; the toy preset's random CLIP uses this)
    num_tokens=4,
    context_dim=256,
    # frozen CLIP (clip.py): a file of OpenAI weights, or "" for a small random CLIP (toy preset)
    clip="",
    # the DDPM schedule: LDM's scaled-linear betas (Stable Diffusion's 0.00085 .. 0.012)
    num_diffusion_steps=1000,
    schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    # training
    batch_size=16,
)

PRESETS = {
    "toy": dict(),
    "mvtec": dict(
        image_size=256,
        vae_channels=128,                 # the kl-f8 layout of Stable Diffusion 1.x
        vae_channel_mult=(1, 2, 4, 4),
        unet_channels=192,
        unet_channel_mult=(1, 2, 4),
        unet_num_res_blocks=2,
        unet_attention_levels=(1, 2),     # 16x16 and 8x8 of the 32x32 latent
        unet_num_heads=8,
        context_dim=768,                  # CLIP ViT-L/14's embedding width
        batch_size=8,
    ),
}


def resolve_config(preset, overrides=None):
    """CONFIG with a preset's values, then the user's overrides, applied on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = dict(CONFIG, **PRESETS[preset], preset=preset)
    for key, value in (overrides or {}).items():
        if key not in config:
            raise ValueError(f"unknown config key {key!r}; see --help for the list")
        config[key] = value
    return config


# ----------------------------------------------------------------------------------------------
# DDPM (to be written here by the diffusion-core engineer)
# The forward process (Eq. 6-10) is fixed by a schedule of betas; the reverse process (Eq. 11, 12,
# 15) is the network's ε turned into a step from x_t to x_{t-1}. The schedule is buffers of one
# nn.Module so it follows the model to the GPU; every method takes one timestep per sample.


def make_betas(schedule, num_steps, beta_start, beta_end):
    """β_1..β_T as float64, the way the reference schedulers (DDPM, LDM, improved DDPM) define them."""
    if schedule == "linear":  # DDPM (Ho et al. 2020): β from 1e-4 to 0.02 in a straight line
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if schedule == "scaled_linear":  # LDM / Stable Diffusion: straight line in sqrt(β), then squared
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    if schedule == "cosine":  # improved DDPM (Nichol & Dhariwal 2021): ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2)
        s = 0.008
        alpha_bar = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = [1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps) for i in range(num_steps)]
        # clipped at 0.999 so the last steps do not divide by ~0 (diffusers' "squaredcos_cap_v2")
        return torch.tensor(betas, dtype=torch.float64).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}; choose 'linear', 'scaled_linear' or 'cosine'")


class DDPM(torch.nn.Module):
    """The noise schedule with q_sample (Eq. 10), the ancestral DDPM step (Eq. 12, 15) and the DDIM step.

    Timesteps are 0-based: t = 0 is the first noising step, t = num_steps - 1 the last. All the math
    is done in float32 whatever the dtype of the inputs, and the result is cast back to x_t's dtype.
    """

    def __init__(self, num_steps=1000, schedule="linear", beta_start=0.0001, beta_end=0.02):
        super().__init__()
        self.num_steps = num_steps
        self.schedule = schedule
        betas = make_betas(schedule, num_steps, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # Eq. (9): ᾱ_t = Π_{s≤t} (1 - β_s)
        # float64 for the products, float32 to store; not persistent: the config rebuilds them
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def _at(self, values, t, x):
        """values[t] per sample, shaped [B, 1, 1, ...] to broadcast over x; ᾱ = 1 where t < 0."""
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be a LongTensor of shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")
        t = t.to(values.device)
        out = torch.where(t >= 0, values[t.clamp(min=0)], torch.ones_like(values[0]))
        return out.float().view(-1, *([1] * (x.dim() - 1))).to(x.device)

    def q_sample(self, x0, t, noise):
        """Noise clean x0 to step t in one jump, with the noise given so the training target exists."""
        a = self._at(self.alphas_cumprod, t, x0)
        # Eq. (10): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (Eq. 8 as a reparameterised sample)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def step(self, eps, t, x_t, noise=None):
        """One ancestral DDPM step x_t -> x_{t-1} from the predicted ε, with the posterior variance."""
        beta_t = self._at(self.betas, t, x_t)
        a_t = self._at(self.alphas_cumprod, t, x_t)
        a_prev = self._at(self.alphas_cumprod, t - 1, x_t)  # ᾱ_{-1} = 1: the step into x_0
        # Eq. (12): μ(x_t) = (x_t - β_t / sqrt(1 - ᾱ_t) ε) / sqrt(α_t). This is the mean of the posterior
        # q(x_{t-1} | x_t, x̂_0) with x̂_0 from Eq. (10) unclipped, but written without x̂_0: dividing by
        # sqrt(ᾱ_t) ~ 0 at large t would amplify float32 rounding (DDPM, Ho et al. 2020, Eq. 11 there)
        mean = (x_t.float() - beta_t / (1 - a_t).sqrt() * eps.float()) / (1 - beta_t).sqrt()
        # Σ = β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t, DDPM's "fixed_small" variance
        variance = (1 - a_prev) / (1 - a_t) * beta_t
        if noise is None:
            noise = torch.randn_like(mean)
        nonzero = (t > 0).float().view_as(a_t).to(x_t.device)  # no noise on the last step, t = 0
        # Eq. (15): x_{t-1} = μ + sqrt(Σ) ε
        return (mean + nonzero * variance.sqrt() * noise.float()).to(x_t.dtype)

    def ddim_step(self, eps, t, t_prev, x_t, eta=0.0, noise=None):
        """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12 there); eta = 1 is ancestral-like."""
        a_t = self._at(self.alphas_cumprod, t, x_t)
        a_prev = self._at(self.alphas_cumprod, t_prev, x_t)  # t_prev = -1: ᾱ = 1, the clean image
        x_t32, eps = x_t.float(), eps.float()
        x0 = (x_t32 - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        # x_{t_prev} = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ²) ε + σ z: the same marginals as Eq. (8)
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn_like(x_t32)
            x_prev = x_prev + sigma * noise.float()
        return x_prev.to(x_t.dtype)

    def ddim_timesteps(self, num_sample_steps):
        """The descending timesteps DDIM visits: every (T // n)-th, from 0 ("leading" spacing)."""
        if not 0 < num_sample_steps <= self.num_steps:
            raise ValueError(f"num_sample_steps must be in 1..{self.num_steps}, got {num_sample_steps}")
        ratio = self.num_steps // num_sample_steps
        return (torch.arange(num_sample_steps) * ratio).flip(0)  # e.g. [980, 960, ..., 20, 0]
