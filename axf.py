"""AnomalyXFusion: the method of the paper (§4), on top of clip.py, vae.py, unet.py, mask_encoder.py and ddpm.py.

What this file holds, in reading order:
  MIF              semantic (Eq. (1)), location (Eq. (2), with mask_encoder.py) and textural (Eq. (3)) tokens,
                   concatenated (Eq. (4)) and refined by the Aggregator into the X-embedding e_X (Eq. (5))
  DDF              e_t = f_phi(e_X, t), the UNet's cross-attention context (Eq. (13)-(15))
  AnomalyXFusion   the whole model: the loss (Eq. (17)) and blended sampling (Eq. (16))
  builders         one per network from the config; CLIP
On a pretrained Stable Diffusion file (train.py --sd) the VAE and UNet come from the file, and e_t reaches
its UNet through its frozen text encoder: that adapter is sd_backbone.py's, called through one hook (`sd_adapter`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
import toy
from ddpm import DDPM, guided_eps, randn
from mask_encoder import LocationTokens, MaskAutoencoder, MaskEncoder
from unet import UNet, timestep_embedding
from vae import VAE

LATENT_CHANNELS = 4  # kl-f8's (Stable Diffusion's) latent channels


# ----------------------------------------------------------------------------------------------
# Multi-modal In-Fusion (MIF, paper §4.2): semantic, location and textural embeddings, each k
# tokens of width d, concatenated and refined by a self-attention aggregator into the X-embedding.


def unit_tokens(features, num_tokens):
    """L2-normalise CLIP features [B, d] and repeat them into k tokens [B, k, d] (Eq. (1), (3)).

    Deviation: the paper's unit vectors have entries of size ~1/sqrt(d); multiplied by sqrt(d) they
    have unit scale per entry, like the location tokens they are concatenated with.
    """
    features = F.normalize(features.float(), dim=-1) * math.sqrt(features.shape[-1])
    return features[:, None, :].expand(-1, num_tokens, -1)


class Aggregator(nn.Module):
    """The multi-modal aggregator: e_X = e_X + MLP(ATT(e_X)) (Eq. (5)).

    No positional embedding: every token is treated alike, so the aggregator is equivariant to
    any reordering of the tokens (a property the tests check).
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, e_x):
        # Deviation: Eq. (5) has no norm. A pre-LayerNorm (as in GPT-2 and the UNet's transformer blocks)
        # puts tokens of three scales on one scale before attention compares them
        h = self.norm(e_x)
        attended, _ = self.attn(h, h, h, need_weights=False)
        return e_x + self.mlp(attended)  # Eq. (5)


class MultiModalInFusion(nn.Module):
    """MIF: a caption, a mask and a defect type -> the X-embedding e_X [B, n, d] (Eq. (1)-(5)).

    CLIP is frozen (§4.2): no gradient ever reaches it. One texture-token row per (category, defect type),
    "good" included (texture_rows); `row_categories` gives each row's category index, so that a row also
    says whose caption mean to subtract. The Table 6 switches leave out the semantic tokens (use_text) or
    the location and texture tokens with the aggregator (use_mif); with both off there is no e_X (forward
    returns None) and the model's null context stands in.
    """

    def __init__(self, config, clip_model, row_categories, mask_encoder=None):
        super().__init__()
        d, k = config["context_dim"], config["num_tokens"]
        self.use_text, self.use_mif, self.num_tokens = config["use_text"], config["use_mif"], k
        self.clip = clip_model.eval().requires_grad_(False)
        if clip_model.text_projection.shape[1] != d:
            raise ValueError(f"CLIP embeds to {clip_model.text_projection.shape[1]} dims but context_dim is {d}")
        self._text_cache = {}
        # per category, the mean CLIP feature of its captions, subtracted before Eq. (1)'s L2 norm
        # (center_captions); zero means Eq. (1) exactly. Not persistent: the row layout comes from the categories
        self.register_buffer("row_category", torch.tensor(row_categories, dtype=torch.long), persistent=False)
        self.register_buffer("text_mean", torch.zeros(max(row_categories) + 1, d))  # [C, d]
        if self.use_mif:
            self.mask_encoder = build_mask_encoder(config) if mask_encoder is None else mask_encoder  # E_ISTR of Eq. (2), fine-tuned here
            self.location = LocationTokens(config["mask_feature_channels"], k, d)  # E_CNN of Eq. (2)
            # Deviation: the paper initialises "the textual embedding" from Eq. (3)'s CLIP feature; here that
            # is k learnable tokens per defect type, set from the mean feature of its examples (init_textures)
            self.texture_tokens = nn.Parameter(torch.randn(len(row_categories), k, d))
            self.aggregator = Aggregator(d, max(1, d // 64))  # CLIP's 64-wide heads
        self.num_context = k * (self.use_text + 2 * self.use_mif)  # n; 0 when every modality is off

    @torch.no_grad()
    def encode_captions(self, captions):
        """Frozen CLIP text features [B, d] of the captions (Eq. (1)), cached: captions repeat every epoch."""
        device = self.text_mean.device
        missing = sorted({c for c in captions if c not in self._text_cache})
        if missing:
            # CLIP may sit on another device (train.py moves it to the CPU once it has given its features)
            tokens = clip.tokenize(missing, truncate=True).to(self.clip.token_embedding.weight.device)
            for caption, feature in zip(missing, self.clip.encode_text(tokens).float()):
                self._text_cache[caption] = feature.to(device)
        return torch.stack([self._text_cache[c] for c in captions]).to(device)

    @torch.no_grad()
    def center_captions(self, captions, category=0):
        """Deviation: set the category's text_mean to the mean CLIP feature of its (distinct) training captions.

        Captions of one category share most of their CLIP feature ("The green cable is replaced by a
        repeated gray cable" and "The gray cable is replaced by a repeated green cable" are nearly one
        direction). Their difference from the category's mean is what tells them apart, and after
        centring it is what Eq. (1)'s unit-norm tokens carry. Each category has its own mean: a cable
        caption minus the bottles' mean would still be mostly "cable".
        """
        self.text_mean[category] = self.encode_captions(sorted(set(captions))).mean(0)

    @torch.no_grad()
    def encode_texture(self, images, masks):
        """Frozen CLIP image features [B, d] of image * mask (Eq. (3)): the anomaly's own pixels."""
        pixels = clip.normalize_images(images * masks, self.clip.visual.input_resolution)
        pixels = pixels.to(self.clip.token_embedding.weight.device, self.text_mean.dtype)
        return self.clip.encode_image(pixels).float().to(self.text_mean.device)

    @torch.no_grad()
    def init_textures(self, texture_ids, images, masks):
        """Eq. (3): each defect's texture tokens start from the mean CLIP feature of its examples."""
        features = self.encode_texture(images, masks)
        for row in texture_ids.unique():
            mean = features[texture_ids == row].mean(0, keepdim=True)
            self.texture_tokens.data[row] = unit_tokens(mean, self.num_tokens)[0]

    def forward(self, captions, masks, texture_ids, textures=None):
        """e_X [B, n, d], or None when every modality is off. texture_ids: each sample's row of the texture tokens
        [B] (texture_ids()). textures: optional [B, k, d] texture tokens (from a reference image, Eq. (3)) instead
        of the learned ones."""
        parts = []
        if self.use_text:  # Eq. (1): e_sem [B, k, d]
            mean = self.text_mean[self.row_category[texture_ids]]  # [B, d]: each sample's category's mean
            parts.append(unit_tokens(self.encode_captions(captions) - mean, self.num_tokens))
        if self.use_mif:
            parts.append(self.location(self.mask_encoder(masks)))  # Eq. (2): e_loc [B, k, d]
            parts.append(self.texture_tokens[texture_ids] if textures is None else textures)  # Eq. (3): e_tex
        if not parts:
            return None
        e_mul = torch.cat(parts, dim=1)  # Eq. (4): e_mul [B, n, d]
        return self.aggregator(e_mul) if self.use_mif else e_mul  # Eq. (5): the X-embedding


class DynamicDifFusion(nn.Module):
    """DDF: e_t = f_phi(e_X, t), a conditioned MLP (Eq. (14)).

    The timestep is aligned to the token width (e_tim), concatenated to every token and fed to an MLP.
    Deviation: a residual keeps e_X reachable, so the module learns how much each step changes it.
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
# The model: the VAE, the UNet, MIF and DDF, with the loss (Eq. (17)) and blended sampling (Eq. (16)).


def latent_factor(config):
    """How many pixels one latent cell spans: the VAE halves the image once per level but the last."""
    return 2 ** (len(config["vae_channel_mult"]) - 1)


def latent_mask(mask, factor):
    """Pixel mask [B, 1, S, S] -> latent mask [B, 1, S/f, S/f]: a latent cell is in if any pixel is."""
    return F.max_pool2d(mask, factor) if factor > 1 else mask


def texture_rows(categories):
    """The rows of the texture tokens of a model of `categories` {name: sorted defect types}, one per (category,
    defect type): per category, in order, "good" (its normal images) then its defect types."""
    return [(name, defect) for name, defects in categories.items() for defect in ["good", *defects]]


def texture_ids(rows, category, names):
    """The texture ids [B] of one category's defect types (names; "good" for a normal image): their rows. One
    category: "good" is 0 and defect type i of its sorted list (data.Category.defects) is i + 1."""
    return torch.tensor([rows.index((category, name)) for name in names], dtype=torch.long)


class AnomalyXFusion(nn.Module):
    """VAE + UNet + MIF + DDF (paper Fig. 1) of categories {name: sorted defect types}; vae, unet, mask_encoder: trained
    or pretrained (default: fresh; the VAE frozen); sd_adapter: e_t -> an SD UNet's context (sd_backbone.py)."""

    def __init__(self, config, clip_model, categories, vae=None, unet=None, mask_encoder=None, sd_adapter=None):
        super().__init__()
        self.config, self.categories = dict(config), {name: list(d) for name, d in categories.items()}
        self.texture_rows = texture_rows(self.categories)  # [(category, defect)]: what each texture id is
        self.vae = (build_vae(config) if vae is None else vae).requires_grad_(False)
        self.unet = build_unet(config) if unet is None else unet
        self.unet.gradient_checkpointing = config["gradient_checkpointing"]
        self.mif = MultiModalInFusion(config, clip_model, [list(self.categories).index(c) for c, _ in self.texture_rows],
                                      mask_encoder)  # each texture row's category index
        self.ddf = DynamicDifFusion(config["context_dim"]) if config["use_ddf"] else None
        self.sd_adapter, self.ddpm, self.latent_factor = sd_adapter, build_ddpm(config), self.vae.downsample_factor
        # the empty condition: guidance's unconditional branch, and the context of Table 6's first row
        self.null_context = nn.Parameter(torch.randn(1, self.mif.num_context or config["num_tokens"],
                                                     config["context_dim"]) * 0.02)
        channels, latent = self.unet.conv_in.in_channels, self.unet.conv_out.out_channels
        self.reads_mask, self.reads_masked_image = channels > latent, channels == 2 * latent + 1

    def x_embedding(self, captions, masks, texture_ids, textures=None):
        e_x = self.mif(captions, masks, texture_ids, textures)  # e_X [B, n, d] (Eq. (1)-(5)); None: every modality off
        return self.null_context.expand(len(texture_ids), -1, -1) if e_x is None else e_x

    def context(self, e_x, t, drop=None, captions=None):
        """The cross-attention context e_t [B, n, d] (Eq. (13)-(15)); drop: bool [B], conditions made the null one
        (classifier-free guidance). On an SD UNet, sd_adapter puts e_t beside the caption's prompt."""
        if drop is not None:
            e_x = torch.where(drop[:, None, None], self.null_context.expand_as(e_x), e_x)
        e_t = self.ddf(e_x, t) if self.ddf is not None else e_x  # Eq. (14): e_t = f_phi(e_X, t)
        return e_t if self.sd_adapter is None else self.sd_adapter(e_t, captions, drop)

    def condition(self, captions, masks, texture_ids, t, textures=None, drop=None):
        """context(x_embedding(...)): the UNet's context from the raw conditions."""
        return self.context(self.x_embedding(captions, masks, texture_ids, textures), t, drop, captions)

    def unet_input(self, x_t, region, masked_latents=None):
        """What the UNet reads: x_t (Eq. (15)). Deviation, opt-in (--unet_mask_input True): the latent mask too, as
        SD's inpainting model reads it; SD-1.5-inpainting also the masked image's latent."""
        if self.reads_masked_image and masked_latents is None:
            raise ValueError("this UNet (SD inpainting, 9 channels) also needs the masked image's latent")
        parts = [x_t] + [region] * self.reads_mask + [masked_latents] * self.reads_masked_image
        return torch.cat([part.to(x_t.dtype) for part in parts], dim=1)

    @torch.no_grad()
    def encode_images(self, images, grey_masks=None):
        """Images [B, 3, S, S] in [0, 1] -> scaled latents [B, 4, S/f, S/f]; with grey_masks, SD inpainting's input."""
        if grey_masks is not None:
            images = images * (1 - grey_masks) + 0.5 * grey_masks
        return self.vae.encode_latents(images * 2 - 1, sample=False)

    def draw_noise(self, latents, generator=None):
        """Eq. (17)'s draws for latents [B, C, h, w] (DDPM's Algorithm 1): t ~ U{0..T-1}, ε ~ N(0, I), and whether
        each condition is dropped to the null one (classifier-free guidance)."""
        B, device = len(latents), latents.device
        t = torch.randint(0, self.ddpm.num_steps, (B,), device=device, generator=generator)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        drop = torch.rand(B, device=device, generator=generator) < self.config["cond_dropout"]
        return dict(t=t, noise=noise, drop=drop)

    def loss(self, latents, masks, captions, texture_ids, is_anomaly, t=None, noise=None, drop=None,
             masked_latents=None, generator=None):
        """The ε-prediction loss of Eq. (17); t, noise, drop: draw_noise's (train.py draws them for the whole batch).
        Normal images count every latent cell alike: they teach the object itself. Deviation: anomalous images
        count their mask fully and the rest by `outside_loss_weight`, spending the gradient on the defect."""
        if t is None:
            t, noise, drop = self.draw_noise(latents, generator).values()
        x_t = self.ddpm.q_sample(latents, t, noise)  # Eq. (10)
        context = self.condition(captions, masks, texture_ids, t, drop=drop)
        region = latent_mask(masks, self.latent_factor)
        eps = self.unet(self.unet_input(x_t, region, masked_latents), t, context)
        outside = self.config["outside_loss_weight"]
        weight = torch.where(is_anomaly[:, None, None, None], region + outside * (1 - region), torch.ones_like(region))
        # Eq. (17), squared as in DDPM (deviation: the paper prints a plain norm), averaged over the weighted cells
        error = ((eps.float() - noise) ** 2 * weight).sum((1, 2, 3)) / (weight.sum((1, 2, 3)) * latents.shape[1])
        return error.mean()

    def forward(self, *args, **kwargs):  # the loss: DDP (train.py, torchrun) averages the gradients of forward()
        return self.loss(*args, **kwargs)

    def predict_noise(self, x_t, region, t, e_x, guidance_scale, captions=None, masked_latents=None):
        """ε with classifier-free guidance (ddpm.guided_eps); the unconditional branch is the dropped condition."""
        drop = torch.arange(2 * len(e_x), device=e_x.device) >= len(e_x)
        both = self.context(torch.cat([e_x, e_x]), torch.cat([t, t]), drop, None if captions is None else list(captions) * 2)
        return guided_eps(self.unet, self.unet_input(x_t, region, masked_latents), t, *both.chunk(2), guidance_scale)

    @torch.no_grad()
    def sample(self, normal_images, masks, captions, texture_ids, textures=None, sampler="ddim", steps=50,
               guidance_scale=3.0, eta=0.0, generator=None, callback=None):
        """Draw anomalies into normal images [B, 3, S, S] inside masks [B, 1, S, S] (Eq. (16)): each step, inside the
        latent mask the model's reverse step, outside the normal image's latent noised to the same step; the decoded
        image is pasted through the pixel mask itself. callback(t, x_t) sees each blended latent (t = -1: the last);
        generator: one, or one per sample (ddpm.randn), so that a sample's noise is its own."""
        device, B = normal_images.device, len(normal_images)
        z0 = self.encode_images(normal_images)
        masked_latents = self.encode_images(normal_images, masks) if self.reads_masked_image else None
        region = latent_mask(masks, self.latent_factor)
        e_x = self.x_embedding(captions, masks, texture_ids, textures)  # Eq. (1)-(5): once per batch
        # one fixed noise for the background: its latent at step t is q_sample(z0, t, known_noise), one forward
        # trajectory (Eq. (10)), so the background moves smoothly from noise to z0 instead of flickering
        known_noise = randn(z0.shape, generator, device)
        timesteps = self.ddpm.sampling_timesteps(sampler, steps)
        at = lambda step: torch.full((B,), step, device=device, dtype=torch.long)
        # Eq. (11), (13): the reverse chain starts from Gaussian noise x_T, each step conditioned on e_t
        x = region * randn(z0.shape, generator, device) + (1 - region) * self.ddpm.q_sample(z0, at(timesteps[0][0]), known_noise)
        for step, step_prev in timesteps:
            t, t_prev = at(step), at(step_prev)
            eps = self.predict_noise(x, region, t, e_x, guidance_scale, captions, masked_latents).float()
            # Eq. (15) with sampler="ddpm"; deviation: by default DDIM's step (Song et al. 2021), 50 steps, not 1000
            x_model = self.ddpm.reverse_step(eps, t, t_prev, x, sampler, eta, generator)
            # Deviation: Eq. (16) prints the background at ᾱ_t, but the step has moved to t_prev: both halves must
            # be at one noise level, or their border is a seam the next step reads
            x_known = self.ddpm.q_sample(z0, t_prev, known_noise) if step_prev >= 0 else z0
            x = region * x_model + (1 - region) * x_known  # Eq. (16): blended step
            if callback is not None:
                callback(step_prev, x)
        decoded = ((self.vae.decode_latents(x).float() + 1) / 2).clamp(0, 1)
        # the latent region is whole cells and the decoder spreads them further: the pixel mask decides
        return normal_images * (1 - masks) + decoded * masks


def parameter_groups(model):
    """The optimiser's groups: the UNet's trained weights (LoRA, full fine-tuning, the mask channel's) at unet_lr;
    the conditioning (MIF, DDF, mask encoder, texture and null tokens) at lr. On a from-scratch UNet both are lr."""
    lr, unet_lr = model.config["lr"], model.config["unet_lr"] if model.config["sd"] else model.config["lr"]
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    unet = [p for name, p in trained if name.startswith("unet.")]
    conditioning = [p for name, p in trained if not name.startswith("unet.")]
    return [{"params": unet, "lr": unet_lr, "base_lr": unet_lr}, {"params": conditioning, "lr": lr, "base_lr": lr}]


# ----------------------------------------------------------------------------------------------
# Builders: one per network, from the config; CLIP; checkpoints that load by themselves


def build_vae(config):
    return VAE(3, config["vae_channels"], config["vae_channel_mult"], config["vae_num_res_blocks"], LATENT_CHANNELS)


def build_unet(config):
    # with unet_mask_input, one input channel more than the latent: the latent mask (AnomalyXFusion.unet_input)
    return UNet(LATENT_CHANNELS + config["unet_mask_input"], LATENT_CHANNELS, config["unet_channels"],
                config["unet_channel_mult"], config["unet_num_res_blocks"], config["unet_attention_levels"],
                config["unet_num_heads"], context_dim=config["context_dim"])


def build_mask_encoder(config):
    return MaskEncoder(config["image_size"], config["mask_channels"], config["mask_feature_channels"])


def build_mask_autoencoder(config):  # stage 2 pre-trains the encoder with a decoder (mask_encoder.py)
    return MaskAutoencoder(config["image_size"], config["mask_channels"], config["mask_feature_channels"])


def build_ddpm(config):
    return DDPM(config["num_diffusion_steps"], config["schedule"])  # the schedule's own beta range (ddpm.py)


# the CLIPs that are no file of the user's: a checkpoint holds their weights (the toy CLIP's too, so that a new
# version of its file never changes what an older checkpoint samples)
CLIPS_SAVED_IN_CHECKPOINTS = ("", "random", "toy")


def build_clip(config, device="cpu"):
    """The frozen CLIP config["clip"] names, with one line saying which: "toy", the one pretrained on the toy world
    (toy_clip.py); a file of OpenAI weights; or "random" (or ""), a small random CLIP of width context_dim, whose
    text tower maps different captions to different features and knows nothing else. A CLIP file's width may
    differ from context_dim: train.py sets context_dim to it (clip_width) before building anything else."""
    if config["clip"] == "toy":
        print(f"CLIP: the toy world's, pretrained by toy_clip.py ({toy.TOY_CLIP.name}; --clip random for a random one)")
        return clip.load(toy.ensure_toy_clip(), device=device)[0]
    if config["clip"] not in ("", "random"):
        return clip.load(config["clip"], device=device)[0]
    print("CLIP: a small random one (--clip random, or no --clip outside the toy preset; pass OpenAI weights for MVTec)")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config["seed"])
    model = clip.CLIP(embed_dim=config["context_dim"], image_resolution=32, vision_layers=2, vision_width=64,
                      vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
                      transformer_heads=1, transformer_layers=2)
    torch.random.set_rng_state(generator_state)
    return model.to(device).eval()


def clip_width(clip_model):
    """The width of CLIP's embeddings: d of Eq. (1) and (3)."""
    return clip_model.text_projection.shape[1]


