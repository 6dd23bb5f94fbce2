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
