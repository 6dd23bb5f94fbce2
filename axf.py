"""AnomalyXFusion: the method of the paper (§4), on top of clip.py, vae.py, unet.py and mask_encoder.py.

What this file holds, in reading order:
  CONFIG, HELP     one flat dict of every setting, with a toy (CPU) and an MVTec (one GPU) preset
  (the DDPM schedule and samplers, Eq. 6-12 and 15, are in ddpm.py; the command line the scripts share in cli.py)
  MIF              semantic (Eq. 1), location (Eq. 2, with mask_encoder.py), textural (Eq. 3) tokens,
                   concatenated (Eq. 4) and refined by the Aggregator into the X-embedding (Eq. 5)
  DDF              e_t = f_phi(e_X, t), the UNet's cross-attention context (Eq. 13-15)
  AnomalyXFusion   the whole model: the loss (Eq. 17) and blended sampling (Eq. 16); on a Stable Diffusion
                   backbone (train.py --sd) e_t is spliced into SD's frozen text encoder (sd_context)
  builders         one per network from the config; CLIP; checkpoints that hold what trained and load by
                   themselves (an SD backbone's loading and adaptation are in sd.py)
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from ddpm import DDPM
# Stable Diffusion 1.x files and the backbone made of one (sd.py; DESIGN's axf.load_sd)
from sd import adapt_sd_unet, check_sd_file, load_backbone, load_sd, save_sd, sd_file  # noqa: F401
from mask_encoder import LocationTokens, MaskAutoencoder, MaskEncoder
from unet import UNet, timestep_embedding
from vae import VAE

# ----------------------------------------------------------------------------------------------
# CONFIG: one flat dict, so that every key can be overridden as `--key value` on the command line.
# A preset only changes sizes and budgets; a checkpoint stores the resolved dict. HELP says what a
# key means (it is the `--help` text of its flag).

CONFIG = dict(
    preset="toy", seed=0, device="auto", bf16=True, image_size=64,
    # KL autoencoder (vae.py): two downsamplings -> 64 px images become 16x16x4 latents
    vae_channels=32, vae_channel_mult=(1, 2, 2), vae_num_res_blocks=1, vae_latent_channels=4, vae_kl_weight=1e-6,
    # latent UNet (unet.py)
    unet_channels=64, unet_channel_mult=(1, 2, 2), unet_num_res_blocks=1, unet_attention_levels=(0, 1), unet_num_heads=4,
    # the X-embedding (paper §4.2): k tokens per modality, each of width d; the frozen CLIP
    num_tokens=4, context_dim=256, clip="",
    # the DDPM schedule: LDM's scaled-linear betas (Stable Diffusion's 0.00085 .. 0.012)
    num_diffusion_steps=1000, schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    # MIF (paper §4.2): the mask encoder and the aggregator
    mask_channels=32, mask_feature_channels=64, aggregator_heads=4,
    # the Table 6 ablations: semantic tokens, the whole MIF (location + texture + aggregator), DDF
    use_text=True, use_mif=True, use_ddf=True,
    # training, stage 1 (VAE) and 2 (mask autoencoder)
    vae_steps=1000, vae_batch_size=8, vae_lr=1e-3, vae_defect_weight=10.0, vae_colour_blobs=0.5,
    mask_steps=300, mask_lr=1e-3,
    # training, stage 3 (AnomalyXFusion)
    steps=900, batch_size=16, lr=5e-4, warmup_steps=100, grad_clip=1.0, ema_decay=0.999, anomaly_fraction=0.75,
    outside_loss_weight=0.1, center_text=True, cond_dropout=0.1, shift_cells=2, checkpoint_every=250, preview_every=450,
    # sampling (Eq. 16)
    sampler="ddim", sample_steps=50, guidance_scale=3.0, eta=0.0,
    # a pretrained Stable Diffusion 1.x backbone (train.py --sd FILE): its VAE, UNet and text encoder
    sd="", train_unet="none", lora_rank=32, unet_lr=5e-4, sd_context="append", sd_prompt="{caption} *",
    gradient_checkpointing=False,
)

HELP = dict(
    seed="seeds the weights' initialisation, the batches and the sampler's noise",
    device="auto picks cuda when present, else cpu",
    bf16="bf16 autocast on CUDA, and on a CPU with AMX (Intel Sapphire Rapids and newer); False: fp32 throughout",
    image_size="images are resized to this many px square",
    vae_kl_weight="LDM's kl-f8 weight: the latent stays close to a plain autoencoder",
    num_tokens="k, tokens per modality (Eq. 1-3)",
    context_dim="d, the token width = the CLIP embedding width (taken from the --clip file when given)",
    clip="a file of OpenAI CLIP weights, or empty for a small random CLIP (toy preset); with --sd it still "
         "gives Eq. (1)'s caption feature and Eq. (3)'s image feature",
    use_text="Table 6: the semantic tokens of the caption (Eq. 1)",
    use_mif="Table 6: the whole MIF: location and texture tokens and the aggregator (Eq. 2-5)",
    use_ddf="Table 6: DDF, the timestep-dependent context (Eq. 14)",
    vae_steps="fewer and the VAE decodes a cut wire back to a whole one",
    vae_defect_weight="extra L1 weight of few-shot defect pixels: the VAE must encode defects",
    vae_colour_blobs="share of the VAE's normal images given a blob of a random colour",
    anomaly_fraction="of each batch: the few-shot anomalies are what the model must learn",
    outside_loss_weight="Eq. (17) weight of an anomalous image's cells outside its mask",
    center_text="subtract the captions' mean CLIP feature before Eq. (1)'s norm",
    cond_dropout="condition dropped to the null one: classifier-free guidance",
    shift_cells="random roll of latent and mask, in latent cells",
    sampler="ddim or ddpm (every one of the num_diffusion_steps)",
    sample_steps="DDIM steps (the ddpm sampler takes every one)",
    guidance_scale="classifier-free guidance; 1 is the conditional model alone",
    eta="DDIM eta: 0 deterministic, 1 like DDPM",
    sd="a Stable Diffusion 1.x single file (.safetensors or .ckpt): its VAE (stage 1 is skipped), UNet and "
       "text encoder replace the project's own; empty: everything trained from scratch",
    train_unet="with --sd, what of the UNet trains: none (the authors' recipe: only the conditioning), lora "
               "(rank-r adapters on its attention, as DualAnoDiff) or full (every weight, as SeaS)",
    lora_rank="r of --train_unet lora",
    unet_lr="learning rate of the UNet weights that train (LoRA ~1e-4, full fine-tuning ~1e-5 on SD-1.5)",
    sd_context="with --sd, how e_t reaches the UNet: append (e_t's tokens after the prompt's 77 hidden states; "
               "won every toy comparison, see the README) or splice (the authors' textual inversion: e_t replaces the * "
               "of sd_prompt at the frozen text encoder's input)",
    sd_prompt="with --sd, the text encoder's prompt; {caption} is the caption, * the place of e_t's tokens "
              "(the authors': 'a photo of a *')",
    gradient_checkpointing="recompute the UNet's activations in the backward pass: less memory, ~30% more time",
)

# A resume must rebuild the very networks it saved: these keys may not change between runs of one
# --out_dir. The others (budgets such as more steps, learning rates, sampling) may.
ARCHITECTURE_KEYS = ("image_size", "vae_channels", "vae_channel_mult", "vae_num_res_blocks", "vae_latent_channels",
                     "unet_channels", "unet_channel_mult", "unet_num_res_blocks", "unet_attention_levels",
                     "unet_num_heads", "num_tokens", "context_dim", "clip", "num_diffusion_steps", "schedule",
                     "beta_start", "beta_end", "mask_channels", "mask_feature_channels", "aggregator_heads",
                     "use_text", "use_mif", "use_ddf", "train_unet", "lora_rank", "sd_context", "sd_prompt")
# ("sd" is not among them: a checkpoint names its SD file by size and hash, so the file may move; sd_file())

PRESETS = {
    "toy": dict(),
    "mvtec": dict(
        image_size=256,
        vae_channels=128, vae_channel_mult=(1, 2, 4, 4), vae_num_res_blocks=2,  # the kl-f8 layout of SD 1.x
        unet_channels=192, unet_channel_mult=(1, 2, 4), unet_num_res_blocks=2, unet_num_heads=8,
        unet_attention_levels=(1, 2),     # 16x16 and 8x8 of the 32x32 latent
        context_dim=768,                  # CLIP ViT-L/14's embedding width
        vae_steps=20000, vae_lr=1e-4, mask_steps=2000, steps=30000, batch_size=8, lr=1e-4, warmup_steps=1000,
        ema_decay=0.9999, shift_cells=4, checkpoint_every=1000, preview_every=5000,
    ),
    # on a Stable Diffusion 1.x file (--sd): its sizes come from the file, these are the rest
    "sd": dict(
        image_size=256,                   # the paper's and AnomalyDiffusion's size (SD's own is 512)
        context_dim=768,                  # CLIP ViT-L/14's embedding width
        mask_steps=2000, steps=5000, batch_size=8, lr=1e-4, unet_lr=1e-5, warmup_steps=500, ema_decay=0.9999,
        shift_cells=4, checkpoint_every=500, preview_every=1000,
        # off: at batch 8 and 256 px the weights (and their bf16 copies), not the activations, fill the memory.
        # Measured on SD-1.5 (bench.py --only sd_train, one H200): checkpointing saved 0.2-0.4 GB (none 8.4 -> 8.3,
        # full 22.2 -> 21.8) and doubled the step (none 98 -> 215 ms, full 183 -> 308 ms). On for 512 px or bigger batches
        gradient_checkpointing=False,
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
    if config["warmup_steps"] < 0:
        raise ValueError(f"warmup_steps must be 0 (none) or more, got {config['warmup_steps']}")
    for key, choices in (("train_unet", ("none", "lora", "full")), ("sd_context", ("splice", "append"))):
        if config[key] not in choices:
            raise ValueError(f"{key} must be one of {', '.join(choices)}, not {config[key]!r}")
    if config["sd_prompt"].count("*") != 1:
        raise ValueError(f"sd_prompt needs exactly one * (where e_t's tokens go), got {config['sd_prompt']!r}")
    return config


def architecture_changes(saved, current):
    """The ARCHITECTURE_KEYS whose values differ between two configs, as 'key saved -> current', and whether
    one was trained on a Stable Diffusion file (--sd) and the other not (which file is sd_file's to check)."""
    changes = [f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in ARCHITECTURE_KEYS if saved.get(k) != current[k]]
    if bool(saved.get("sd")) != bool(current["sd"]):
        changes.insert(0, f"--sd {saved.get('sd') or '(none)'} -> {current['sd'] or '(none)'}")
    return changes


def latent_factor(config):
    """How many pixels one latent cell spans: the VAE halves the image once per level but the last."""
    return 2 ** (len(config["vae_channel_mult"]) - 1)


def defect_ids(names, defects):
    """The one defect-id convention: 0 is "good" (normal images), defect type i of the category's sorted
    list (data.Category.defects) is i + 1. It indexes the texture-token rows of AnomalyXFusion."""
    rows = ["good"] + list(defects)
    return torch.tensor([rows.index(name) for name in names], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Multi-modal In-Fusion (MIF, paper §4.2): semantic, location and textural embeddings, each k
# tokens of width d, concatenated and refined by a self-attention aggregator into the X-embedding.


def unit_tokens(features, num_tokens):
    """L2-normalise CLIP features [B, d] and repeat them into k tokens [B, k, d] (Eq. 1, 3).

    Unit-norm vectors have entries of size ~1/sqrt(d); multiplying by sqrt(d) gives them unit
    scale per entry, like the location tokens they are concatenated with.
    """
    features = F.normalize(features.float(), dim=-1) * math.sqrt(features.shape[-1])
    return features[:, None, :].expand(-1, num_tokens, -1)


class Aggregator(nn.Module):
    """The multi-modal aggregator: e_X = e_X + MLP(ATT(e_X)) (Eq. 5).

    No positional embedding: every token is treated alike, so the aggregator is equivariant to
    any reordering of the tokens (a property the tests check).
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, e_x):
        # Eq. (5) has no norm; a pre-LayerNorm (as in GPT-2 and the UNet's transformer blocks) puts
        # tokens of three scales (unit CLIP directions times sqrt(d), learned location and texture
        # tokens) on one scale before attention compares them; the residual keeps e_X itself
        h = self.norm(e_x)
        attended, _ = self.attn(h, h, h, need_weights=False)
        return e_x + self.mlp(attended)  # Eq. (5)


class DynamicDifFusion(nn.Module):
    """DDF: e_t = f_phi(e_X, t), a conditioned MLP (Eq. 14).

    The timestep is aligned to the token width (e_tim), concatenated to every token and fed to
    an MLP; the residual keeps e_X reachable so the module can learn how much each step needs.
    """

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, e_x, t):
        e_tim = self.time_mlp(timestep_embedding(t, self.dim).to(e_x.dtype))  # [B, d]
        e_tim = e_tim[:, None, :].expand_as(e_x)  # [B, n, d]
        return e_x + self.mlp(torch.cat([e_x, e_tim], dim=-1))  # Eq. (14)


# ----------------------------------------------------------------------------------------------
# The model: frozen CLIP, the VAE, the UNet and the MIF + DDF conditioning, with the loss
# (Eq. 17) and blended sampling (Eq. 16).


def latent_mask(mask, factor):
    """Pixel mask [B, 1, S, S] -> latent mask [B, 1, S/f, S/f]: a latent cell is in if any pixel is."""
    return F.max_pool2d(mask, factor) if factor > 1 else mask


class AnomalyXFusion(nn.Module):
    """VAE + UNet + frozen CLIP + MIF + DDF (paper Fig. 1).

    `defects` names the texture-token rows: row 0 is "good" (normal training images), then one
    row per defect type of the category (the convention of defect_ids()).
    `backbone`: (vae, unet, text_encoder) of a Stable Diffusion 1.x file (load_sd), required when
    config["sd"] names one. Then the VAE and the text encoder stay frozen, the UNet is adapted
    (adapt_sd_unet) and e_t reaches it through the text encoder (sd_context).
    """

    def __init__(self, config, clip_model, defects, backbone=None):
        super().__init__()
        self.config = dict(config)
        self.defects = ["good"] + list(defects)
        d, k = config["context_dim"], config["num_tokens"]
        self.use_text, self.use_mif, self.use_ddf = config["use_text"], config["use_mif"], config["use_ddf"]
        self.text_encoder = None  # SD's frozen text encoder, when there is a backbone
        # what a checkpoint leaves out: frozen networks that are rebuilt from their own files
        self.frozen_prefixes = ("clip.",)
        if config["sd"]:
            if backbone is None:
                raise ValueError("config['sd'] names a Stable Diffusion file: pass backbone=load_sd(config['sd'])")
            self.vae, unet, self.text_encoder = backbone
            self.vae.requires_grad_(False)
            self.text_encoder.eval().requires_grad_(False)
            self.unet = adapt_sd_unet(unet, config["train_unet"], config["lora_rank"])
            self.frozen_prefixes = ("clip.", "vae.", "text_encoder.", "unet.")  # unet: only what trains is saved
        else:
            self.vae = build_vae(config)
            self.unet = build_unet(config)
        self.latent_factor = latent_factor(config)
        self.unet.gradient_checkpointing = config["gradient_checkpointing"]
        # SD-1.5-inpainting reads [x_t, mask, masked-image latent] (9 channels); every other UNet here [x_t, mask]
        self.masked_image_input = self.unet.conv_in.in_channels == 2 * config["vae_latent_channels"] + 1
        self.ddpm = DDPM(config["num_diffusion_steps"], config["schedule"], config["beta_start"], config["beta_end"])
        # CLIP is frozen (§4.2): no gradient ever reaches it, and it is left out of the optimiser
        self.clip = clip_model.eval().requires_grad_(False)
        if clip_model.text_projection.shape[1] != d:
            raise ValueError(f"CLIP embeds to {clip_model.text_projection.shape[1]} dims but context_dim is {d}")
        self._text_cache = {}
        # the mean CLIP feature of the category's captions, subtracted before Eq. (1)'s L2 norm
        # (center_captions); zero means Eq. (1) exactly
        self.register_buffer("text_mean", torch.zeros(d))
        if self.use_mif:
            self.mask_encoder = build_mask_encoder(config)
            self.location = LocationTokens(config["mask_feature_channels"], k, d)
            # learnable texture tokens, one set of k per (category, defect type); init_textures()
            # sets them from CLIP image features (Eq. 3)
            self.texture_tokens = nn.Parameter(torch.randn(len(self.defects), k, d))
            self.aggregator = Aggregator(d, config["aggregator_heads"])
        if self.use_ddf:
            self.ddf = DynamicDifFusion(d)
        self.num_context = k * (self.use_text + 2 * self.use_mif) or k
        # the empty condition: classifier-free guidance's unconditional branch, and the whole
        # context when every modality is switched off (Table 6, first row)
        self.null_context = nn.Parameter(torch.randn(1, self.num_context, d) * 0.02)
        if self.text_encoder is not None:
            width = self.text_encoder.token_embedding.weight.shape[1]
            # e_t's tokens [n, d] -> the text encoder's width (768 = d for SD-1.5 with CLIP ViT-L/14)
            self.to_text = nn.Linear(d, width) if width != d else nn.Identity()
            # spliced at the encoder's input, e_t's tokens take the size of its word embeddings (std ~0.015 in
            # SD-1.5); at e_t's own unit scale they would drown the prompt's words in the residual stream
            self.token_scale = self.text_encoder.token_embedding.weight.float().std().item()
            self._prompt_cache, self._hidden_cache = {}, {}

    # --- the three modalities and the context -------------------------------------------------

    @torch.no_grad()
    def encode_captions(self, captions):
        """Frozen CLIP text features [B, d] of the captions, cached: captions repeat every epoch."""
        missing = sorted({c for c in captions if c not in self._text_cache})
        if missing:
            # CLIP may sit on another device than the model (train.py keeps it on the CPU once it has given its features)
            tokens = clip.tokenize(missing, truncate=True).to(self.clip.token_embedding.weight.device)
            for caption, feature in zip(missing, self.clip.encode_text(tokens).float()):
                self._text_cache[caption] = feature.to(self.null_context.device)
        return torch.stack([self._text_cache[c] for c in captions]).to(self.null_context.device)

    @torch.no_grad()
    def center_captions(self, captions):
        """Set text_mean to the mean CLIP feature of the (distinct) training captions.

        Captions of one category share most of their CLIP feature: with the toy preset's random CLIP,
        "The green cable is replaced by a repeated gray cable" and "The gray cable is replaced by a
        repeated green cable" have cosine 0.975. Their difference from the category's mean is what
        tells them apart, and after centring it is what Eq. (1)'s unit-norm tokens carry.
        """
        self.text_mean.copy_(self.encode_captions(sorted(set(captions))).mean(0))

    @torch.no_grad()
    def encode_texture(self, images, masks):
        """Frozen CLIP image features [B, d] of image * mask (Eq. 3): the anomaly's own pixels."""
        pixels = clip.normalize_images(images * masks, self.clip.visual.input_resolution)
        pixels = pixels.to(self.clip.token_embedding.weight.device, self.null_context.dtype)
        return self.clip.encode_image(pixels).float().to(self.null_context.device)

    @torch.no_grad()
    def init_textures(self, defect_ids, images, masks):
        """Initialise each defect's texture tokens from the mean CLIP feature of its examples."""
        features = self.encode_texture(images, masks)
        for row in defect_ids.unique():
            mean = features[defect_ids == row].mean(0, keepdim=True)
            self.texture_tokens.data[row] = unit_tokens(mean, self.texture_tokens.shape[1])[0]

    def x_embedding(self, captions, masks, defect_ids, textures=None):
        """The X-embedding e_X [B, n, d] (Eq. 1-5); the null context when every modality is off.

        textures: optional [B, k, d] texture tokens (from a reference image) instead of the learned ones.
        """
        k, parts = self.config["num_tokens"], []
        if self.use_text:
            parts.append(unit_tokens(self.encode_captions(captions) - self.text_mean, k))  # Eq. (1): e_sem [B, k, d]
        if self.use_mif:
            parts.append(self.location(self.mask_encoder(masks)))  # Eq. (2): e_loc [B, k, d]
            parts.append(self.texture_tokens[defect_ids] if textures is None else textures)  # Eq. (3): e_tex
        if not parts:
            return self.null_context.expand(len(defect_ids), -1, -1)
        e_x = torch.cat(parts, dim=1)  # Eq. (4): e_mul [B, n, d]
        return self.aggregator(e_x) if self.use_mif else e_x  # Eq. (5): the X-embedding

    def context(self, e_x, t, drop=None, captions=None):
        """The cross-attention context of Eq. (13)-(15): e_t [B, n, d]; drop: optional bool [B],
        samples whose condition is replaced by the null one (classifier-free guidance).
        On an SD backbone, e_t then goes through sd_context with the captions (dropped ones: "")."""
        if drop is not None:
            e_x = torch.where(drop[:, None, None], self.null_context.expand_as(e_x), e_x)
        e_t = self.ddf(e_x, t) if self.use_ddf else e_x  # Eq. (14): e_t = f_phi(e_X, t)
        if self.text_encoder is None:
            return e_t
        captions = list(captions) if captions is not None and self.use_text else [""] * len(e_t)
        if drop is not None:
            captions = ["" if dropped else c for c, dropped in zip(captions, drop.tolist())]
        return self.sd_context(e_t, captions)

    def condition(self, captions, masks, defect_ids, t, textures=None, drop=None):
        """The UNet's context from the raw conditions: context(x_embedding(...), t, drop, captions)."""
        return self.context(self.x_embedding(captions, masks, defect_ids, textures), t, drop, captions)

    # --- how e_t reaches a pretrained SD UNet -------------------------------------------------

    def sd_context(self, e_t, captions):
        """e_t [B, n, d] -> the pretrained UNet's context [B, 77 (+ n), width] (Eq. 13's condition for SD's UNet).

        append (the default): the prompt's own 77 hidden states (computed once per caption), then e_t's n tokens.
        splice (the authors' textual inversion, as AnomalyDiffusion): the n * of the prompt are replaced by
        e_t's tokens at the frozen text encoder's input (clip.encode_text_tokens), and its 77 hidden states are
        the context. DDF makes e_t depend on t, so the encoder then runs at every step.
        On the toy backbone append drew the caption's colour and the defect type more often in every mode
        measured (README); splice stays for the authors' recipe, with a text encoder worth passing e_t through.
        """
        vectors = self.to_text(e_t)  # [B, n, width]
        if self.config["sd_context"] == "splice":
            tokens = self.prompt_tokens(captions, self.num_context).to(e_t.device)
            return self.text_encoder.encode_text_tokens(tokens, replace=(clip.PLACEHOLDER_ID, vectors * self.token_scale))
        hidden = self.prompt_hidden_states(captions)
        return torch.cat([hidden.to(vectors.dtype), vectors], dim=1)

    def prompt_tokens(self, captions, n):
        """sd_prompt with {caption} filled in and its * made n placeholders -> [B, 77] token ids (SD's end-token
        padding). A long caption is cut; the placeholders never are."""
        rows = []
        for caption in captions:
            if (caption, n) not in self._prompt_cache:
                before, after = self.config["sd_prompt"].replace("{caption}", caption.replace("*", " ")).split("*")
                tail = clip.bpe_tokens(after)[:75 - n]
                head = clip.bpe_tokens(before)[:75 - n - len(tail)]
                ids = [clip.START_ID] + head + [clip.PLACEHOLDER_ID] * n + tail + [clip.END_ID]
                self._prompt_cache[caption, n] = torch.tensor(ids + [clip.END_ID] * (77 - len(ids)))
            rows.append(self._prompt_cache[caption, n])
        return torch.stack(rows)

    @torch.no_grad()
    def prompt_hidden_states(self, captions):
        """The frozen text encoder's 77 hidden states of the prompt without its * (sd_context append), cached."""
        missing = sorted({c for c in captions if c not in self._hidden_cache})
        if missing:
            tokens = self.prompt_tokens(missing, 0).to(self.null_context.device)
            for caption, hidden in zip(missing, self.text_encoder.encode_text_tokens(tokens)):
                self._hidden_cache[caption] = hidden
        return torch.stack([self._hidden_cache[c] for c in captions])

    def unet_input(self, x_t, region, masked_latents=None):
        """What the UNet reads: [x_t, latent mask], and for SD-1.5-inpainting also the masked image's latent."""
        parts = [x_t, region.to(x_t.dtype)]
        if self.masked_image_input:
            if masked_latents is None:
                raise ValueError("this UNet (SD inpainting, 9 channels) also needs the masked image's latent")
            parts.append(masked_latents.to(x_t.dtype))
        return torch.cat(parts, dim=1)

    # --- training -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images):
        """Images [B, 3, S, S] in [0, 1] -> scaled latents [B, 4, S/f, S/f] (posterior mode)."""
        return self.vae.encode_latents(images * 2 - 1, sample=False)

    @torch.no_grad()
    def encode_masked_images(self, images, masks):
        """The inpainting UNet's third input: the latent of the image with its mask grey (0 in [-1, 1], as RunwayML's
        SD-1.5-inpainting was trained), or None for a UNet that does not read it."""
        return self.encode_images(images * (1 - masks) + 0.5 * masks) if self.masked_image_input else None

    def loss(self, latents, masks, captions, defect_ids, is_anomaly, generator=None, masked_latents=None):
        """The ε-prediction loss of Eq. (17), weighted to the anomaly region for anomalous images.

        Normal images (is_anomaly False) count every latent cell alike: they teach the object
        itself. Anomalous images count their mask fully and the rest by `outside_loss_weight`,
        so a handful of few-shot anomalies spend the gradient on the defect, not the background.
        """
        B = latents.shape[0]
        device = latents.device
        t = torch.randint(0, self.ddpm.num_steps, (B,), device=device, generator=generator)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        x_t = self.ddpm.q_sample(latents, t, noise)  # Eq. (10)
        drop = torch.rand(B, device=device, generator=generator) < self.config["cond_dropout"]
        context = self.condition(captions, masks, defect_ids, t, drop=drop)
        region = latent_mask(masks, self.latent_factor)
        eps = self.unet(self.unet_input(x_t, region, masked_latents), t, context)
        outside = self.config["outside_loss_weight"]
        weight = torch.where(is_anomaly[:, None, None, None], region + outside * (1 - region), torch.ones_like(region))
        # Eq. (17), squared as in DDPM, averaged over the weighted cells of each sample
        error = ((eps.float() - noise) ** 2 * weight).sum((1, 2, 3)) / (weight.sum((1, 2, 3)) * latents.shape[1])
        return error.mean()

    # --- blended sampling ---------------------------------------------------------------------

    def guided_eps(self, x_t, region, t, e_x, guidance_scale, captions=None, masked_latents=None):
        """Classifier-free guidance: eps_u + s (eps_c - eps_u); both branches in one DDF and one UNet call.
        (captions reach an SD backbone's prompt; the unconditional branch's prompt has none.)"""
        x_in = self.unet_input(x_t, region, masked_latents)
        if guidance_scale == 1:  # eps_u + 1 (eps_c - eps_u) = eps_c: the unconditional branch is not needed
            return self.unet(x_in, t, self.context(e_x, t, captions=captions))
        null = self.null_context.expand_as(e_x)
        both = list(captions) + [""] * len(e_x) if captions is not None else None
        contexts = self.context(torch.cat([e_x, null]), torch.cat([t, t]), captions=both)  # Eq. (14) for both branches
        eps_cond, eps_uncond = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]), contexts).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def sample(self, normal_images, masks, captions, defect_ids, textures=None, sampler="ddim", steps=50,
               guidance_scale=3.0, eta=0.0, generator=None, callback=None):
        """Draw anomalies into normal images [B, 3, S, S] inside masks [B, 1, S, S] (Eq. 16).

        Every step, inside the (latent) mask the latent takes the model's reverse step, outside it
        takes the normal image's latent noised to the same step. The decoded image is then pasted
        into the normal image through the mask itself: every pixel that differs from the normal
        image lies inside the mask, so the mask saved with a sample is its exact ground truth.
        callback(t, x_t) sees the blended latent after each step (t = -1 for the last).
        """
        device, B = normal_images.device, len(normal_images)
        z0 = self.encode_images(normal_images)
        masked_latents = self.encode_masked_images(normal_images, masks)
        region = latent_mask(masks, self.latent_factor)
        e_x = self.x_embedding(captions, masks, defect_ids, textures)  # Eq. (1)-(5): once per batch
        # one fixed noise for the background: its latent at step t is q_sample(z0, t, known_noise), a point
        # of one forward trajectory (Eq. 10), so the background moves smoothly from noise to z0; fresh noise
        # every step would be as valid per step, but would make the background flicker between steps
        known_noise = torch.randn(z0.shape, device=device, generator=generator)
        if sampler == "ddim":
            timesteps = [int(s) for s in self.ddpm.ddim_timesteps(steps)]
        elif sampler == "ddpm":
            timesteps = list(range(self.ddpm.num_steps - 1, -1, -1))
        else:
            raise ValueError(f"unknown sampler {sampler!r}; use 'ddim' or 'ddpm'")
        at = lambda step: torch.full((B,), step, device=device, dtype=torch.long)
        # Eq. (11), (13): the reverse chain starts from Gaussian noise x_T and takes one step per
        # timestep, each conditioned on e_t
        x = torch.randn(z0.shape, device=device, generator=generator)
        x = region * x + (1 - region) * self.ddpm.q_sample(z0, at(timesteps[0]), known_noise)
        for i, step in enumerate(timesteps):
            t, t_prev = at(step), at(timesteps[i + 1] if i + 1 < len(timesteps) else -1)
            eps = self.guided_eps(x, region, t, e_x, guidance_scale, captions, masked_latents).float()  # Eq. (14) with t, then guidance
            if sampler == "ddim":
                noise = torch.randn(z0.shape, device=device, generator=generator) if eta > 0 else None
                x_model = self.ddpm.ddim_step(eps, t, t_prev, x, eta=eta, noise=noise)
            else:  # Eq. (12), (15): the ancestral step
                x_model = self.ddpm.step(eps, t, x, noise=torch.randn(z0.shape, device=device, generator=generator))
            # The paper prints Eq. (16) with ᾱ_t, but the step it blends with has already moved to
            # t_prev: both halves of x'_{t-1} must be at the same noise level, or the border between
            # them is a seam of mismatched noise that the next step reads. So the background uses ᾱ_{t_prev}
            x_known = self.ddpm.q_sample(z0, t_prev, known_noise) if t_prev[0] >= 0 else z0
            x = region * x_model + (1 - region) * x_known  # Eq. (16): blended step
            if callback is not None:
                callback(int(t_prev[0]), x)
        decoded = ((self.vae.decode_latents(x).float() + 1) / 2).clamp(0, 1)
        # the latent region is whole cells (max-pooled) and the decoder spreads them further: the pixel
        # mask itself decides which pixels change
        return normal_images * (1 - masks) + decoded * masks


# ----------------------------------------------------------------------------------------------
# Builders: one per network, from the config; CLIP; checkpoints that load by themselves


def build_vae(config):
    return VAE(3, config["vae_channels"], config["vae_channel_mult"], config["vae_num_res_blocks"],
               config["vae_latent_channels"])


def build_unet(config):
    # the UNet also sees the latent mask as a fifth input channel (as Stable Diffusion's inpainting
    # model does): Eq. (16) brings the mask into training; this way "where" is given, and the
    # cross-attention context is left to say "what"
    return UNet(config["vae_latent_channels"] + 1, config["vae_latent_channels"], config["unet_channels"],
                config["unet_channel_mult"], config["unet_num_res_blocks"], config["unet_attention_levels"],
                config["unet_num_heads"], context_dim=config["context_dim"])


def build_mask_encoder(config):
    return MaskEncoder(config["image_size"], config["mask_channels"], config["mask_feature_channels"])


def build_mask_autoencoder(config):  # stage 2 pre-trains the encoder with a decoder (mask_encoder.py)
    return MaskAutoencoder(config["image_size"], config["mask_channels"], config["mask_feature_channels"])


def build_clip(config, device="cpu"):
    """OpenAI CLIP weights from config["clip"], or a small random CLIP for the toy preset.

    A random text tower still maps different captions to different features, which is all the
    toy world needs: the conditioning layers learn what the features mean. With a CLIP file,
    config["context_dim"] becomes its embedding width (so build CLIP before printing the config).
    """
    if config["clip"]:
        model, _ = clip.load(config["clip"], device=device)
        width = model.text_projection.shape[1]
        if width != config["context_dim"]:
            print(f"context_dim set to {width}, the embedding width of {config['clip']}")
            config["context_dim"] = width
        return model
    print("no --clip file given: using a small random CLIP (fine for the toy world; pass OpenAI weights for MVTec)")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config["seed"])
    model = clip.CLIP(embed_dim=config["context_dim"], image_resolution=32, vision_layers=2, vision_width=64,
                      vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
                      transformer_heads=1, transformer_layers=2)
    torch.random.set_rng_state(generator_state)
    return model.to(device).eval()


def trained_keys(model):
    """The state-dict keys a checkpoint holds: all, but a frozen part (frozen_prefixes) only where it trains."""
    frozen = getattr(model, "frozen_prefixes", ())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in model.state_dict() if not k.startswith(frozen) or k in trainable]


def model_state_dict(model):
    """The weights to save: everything but the frozen networks that come from their own files (CLIP, and an SD
    backbone's VAE, text encoder and frozen UNet weights): a checkpoint on SD-1.5 weighs megabytes."""
    state = model.state_dict()
    return {k: state[k] for k in trained_keys(model)}


def load_weights(model, state, where):
    """Load saved weights strictly, frozen networks aside (they are not in them); a mismatch raises one clear line."""
    expected = set(trained_keys(model))
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the model its config describes "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False)


def load_checkpoint(path, device="cpu", use_ema=True, sd=None):
    """An AnomalyXFusion checkpoint written by train.py -> (model in eval mode, checkpoint dict).
    A checkpoint trained on a Stable Diffusion file reads that file again (or `sd`, where it has moved to),
    and refuses any other."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; train one with train.py first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        config, defects = {**CONFIG, **checkpoint["config"]}, checkpoint["defects"]  # keys added since: defaults
    except Exception as error:
        raise ValueError(f"{path}: not an AnomalyXFusion checkpoint ({type(error).__name__}: {error})") from None
    if checkpoint["clip"] is not None:
        clip_model = clip.build_model(checkpoint["clip"])
    else:
        clip_model = build_clip(config, device)
    backbone = None
    if sd and not config.get("sd"):
        raise ValueError(f"{path} was trained without a Stable Diffusion file: --sd {sd} has nothing to do")
    if config["sd"]:
        saved = checkpoint["sd_file"]  # the path as given at training, else as resolved then
        config["sd"] = str(sd or (config["sd"] if Path(config["sd"]).is_file() else saved["path"]))
        check_sd_file(config["sd"], saved)
        backbone = load_backbone(config)
    model = AnomalyXFusion(config, clip_model, defects, backbone)
    load_weights(model, checkpoint["model"], path)
    if use_ema and checkpoint.get("ema"):
        params = dict(model.named_parameters())
        for name, value in checkpoint["ema"].items():
            params[name].data.copy_(value)
    return model.to(device).eval(), checkpoint
