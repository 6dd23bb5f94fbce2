"""A Stable Diffusion 1.x backbone for AnomalyXFusion (train.py --sd): the networks it takes from an SD file, how they
are adapted to it, and how e_t reaches the pretrained UNet.

sd.py turns the file into the project's networks; here they become AnomalyXFusion's, in reading order:
  LoRA, LoRALinear, add_lora, lora_state_dict, merge_lora
                             rank-r adapters beside the attention projections (--train_unet lora)
  WidenedConv, expand_input_channels
                             conv_in made to read the mask too: its new weights apart, zero at first
  adapt_sd_unet              the mask channel and what of the UNet trains (--unet_mask_input, --train_unet)
  TextEncoderContext         e_t into the frozen text encoder's context: the one hook axf.AnomalyXFusion calls
                             (its `sd_adapter`)
  load_backbone, file_sizes  the networks of config["sd"], and the config keys the file decides
  sd_file, check_sd_file     the file's identity in a checkpoint
  upgrade_checkpoint         a checkpoint saved in an older layout, made loadable
Every adaptation leaves the pretrained model's output exactly as it was until it trains. The UNet itself knows
nothing of them: LoRA replaces its attention projections from outside. Depends on torch, clip.py, files.py, sd.py
and unet.py.
"""
import hashlib
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from files import refuse_special_file
from sd import SD_PREFIXES, diffusers_files, load_sd
from unet import Attention, zero_init

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")  # an attention layer's linear layers, each of which gets an adapter


# ----------------------------------------------------------------------------------------------
# LoRA: rank-r adapters beside a frozen UNet's attention projections (train_unet lora)

class LoRA(nn.Module):
    """A rank-r update W + up @ down of a frozen linear layer (Hu et al. 2021, "LoRA"), computed beside it:
    x -> up(down(x)). `up` starts at zero, so a fresh adapter changes nothing: step 0 is the pretrained model."""

    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)  # nn.Linear's default (Kaiming-uniform) init, as peft
        self.up = zero_init(nn.Linear(rank, out_features, bias=False))

    def forward(self, x):
        return self.up(self.down(x))


class LoRALinear(nn.Module):
    """A pretrained linear layer with its adapter: base(x) + up(down(x)). The layer's own weight and bias keep their
    names (`to_q.weight`: a plain UNet's keys), the adapter's hold `.lora.` (`to_q.lora.down.weight`)."""

    def __init__(self, linear, rank):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the very tensors, not copies
        self.lora = LoRA(linear.in_features, linear.out_features, rank).to(linear.weight.device, linear.weight.dtype)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora(x)

    def merged(self):
        """The plain layer again, its weight W + up @ down: the same map, without the adapter."""
        with torch.no_grad():
            self.weight += self.lora.up.weight @ self.lora.down.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def add_lora(unet, rank=4):
    """Give every attention layer (self- and cross-, in every transformer) rank-r adapters on to_q, to_k, to_v
    and to_out, as DualAnoDiff fine-tunes SD: each becomes a LoRALinear. Returns the new parameters (the only ones
    that should train: freeze the rest with unet.requires_grad_(False) before). Their keys hold `.lora.`."""
    params = []
    for attention in [m for m in unet.modules() if isinstance(m, Attention)]:
        for name in PROJECTIONS:
            layer = getattr(attention, name)
            if isinstance(layer, LoRALinear):
                raise ValueError("add_lora: this UNet already has LoRA adapters")
            setattr(attention, name, LoRALinear(layer, rank))
            params += list(getattr(attention, name).lora.parameters())
    return params


def lora_state_dict(unet):
    """Only the adapters' tensors (keys `...attn1.to_q.lora.down.weight`): what a LoRA checkpoint stores."""
    return {k: v for k, v in unet.state_dict().items() if ".lora." in k}


def merge_lora(unet):
    """Fold every adapter into its layer (W <- W + up @ down) and remove it: a plain UNet again, same outputs."""
    for attention in [m for m in unet.modules() if isinstance(m, Attention)]:
        for name in PROJECTIONS:
            if isinstance(getattr(attention, name), LoRALinear):
                setattr(attention, name, getattr(attention, name).merged())
    return unet


# ----------------------------------------------------------------------------------------------
# The mask as an extra input channel, and what of the UNet trains

class WidenedConv(nn.Module):
    """conv_in reading more input channels than it was pretrained on ([x_t, mask]): a plain conv of the pretrained
    weight and the new channels' weights side by side. The pretrained weight and bias keep their names and may stay
    frozen; the new channels' weights are a parameter of their own (`conv_in.extra_weight`), so that they alone can
    train. They start at zero: until they train, the output is the pretrained model's."""

    def __init__(self, conv, in_channels):
        super().__init__()
        self.in_channels, self.out_channels, self.padding = in_channels, conv.out_channels, conv.padding
        self.weight, self.bias = conv.weight, conv.bias  # the very tensors, not copies
        extra = in_channels - conv.in_channels
        self.extra_weight = nn.Parameter(conv.weight.new_zeros(conv.out_channels, extra, *conv.kernel_size))

    def forward(self, x):
        return F.conv2d(x, torch.cat([self.weight, self.extra_weight], dim=1), self.bias, padding=self.padding)

    def as_conv2d(self):
        """One trainable nn.Conv2d holding both weights: conv_in as older checkpoints trained it (whole)."""
        size = self.weight.shape[2:]
        conv = nn.Conv2d(self.in_channels, self.out_channels, size, padding=self.padding, device="meta")
        conv.weight = nn.Parameter(torch.cat([self.weight, self.extra_weight], dim=1).detach())
        conv.bias = nn.Parameter(self.bias.detach().clone())
        return conv


def expand_input_channels(unet, in_channels=5):
    """A pretrained 4-channel UNet -> one that also reads extra input channels (e.g. the mask: [x_t, mask]), by a
    WidenedConv: the new channels' weights are zero, so until they train the output is the pretrained model's
    (RunwayML's recipe for SD-1.5-inpainting's 5 extra channels). They train; the pretrained weights are as they
    were (frozen or not)."""
    old = unet.conv_in
    if in_channels < old.in_channels:
        raise ValueError(f"expand_input_channels: the UNet already reads {old.in_channels} channels, not fewer")
    unet.conv_in = WidenedConv(old, in_channels)
    if hasattr(unet, "sd_sizes"):
        unet.sd_sizes = dict(unet.sd_sizes, in_channels=in_channels)
    return unet


def adapt_sd_unet(unet, train_unet, lora_rank, unet_mask_input=True):
    """A pretrained SD UNet made ready for AnomalyXFusion (paper §4 conditions a frozen LDM):
    - with unet_mask_input, a 4-channel UNet gets the mask as a fifth input channel, zero-initialised: at step
      0 it is the pretrained model; SD-1.5-inpainting keeps its 9 channels (x_t, mask, masked-image latent);
    - train_unet: none freezes every pretrained weight (only the mask channel's conv_in weights train), lora adds
      rank-r adapters (add_lora) and trains them too, full trains every weight."""
    channels = unet.conv_in.in_channels
    latent = unet.conv_out.out_channels
    if channels not in (latent, 2 * latent + 1):
        raise ValueError(f"a UNet with {channels} input channels is neither text-to-image ({latent}) nor inpainting "
                         f"({2 * latent + 1})")
    unet.requires_grad_(train_unet == "full")
    unet.train()  # load_sd returns eval mode; UNet's gradient checkpointing acts in training mode only
    if channels == latent and unet_mask_input:
        expand_input_channels(unet, latent + 1)  # its new weights train whatever else is frozen: the mask must be read
    if train_unet == "lora":
        add_lora(unet, lora_rank)
    return unet


# ----------------------------------------------------------------------------------------------
# How e_t reaches the pretrained UNet

class TextEncoderContext(nn.Module):
    """e_t [B, n, d] -> the pretrained UNet's context [B, 77 (+ n), width]: Eq. (13)'s condition for SD's UNet.

    append (the default): the frozen text encoder's 77 hidden states of the caption's prompt (computed once
    per caption), then e_t's n tokens. splice (the authors' textual inversion, as AnomalyDiffusion): the n
    placeholders * of the prompt are replaced by e_t's tokens at the encoder's input, and its 77 hidden
    states are the context; DDF makes e_t depend on t, so the encoder then runs at every step. Which one
    drew the caption's colour and defect type more often: docs/stable-diffusion.md.
    """

    def __init__(self, text_encoder, config):
        super().__init__()
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.mode, self.prompt, self.use_text = config["sd_context"], config["sd_prompt"], config["use_text"]
        width = text_encoder.token_embedding.weight.shape[1]
        # e_t's tokens -> the text encoder's width (768 = d for SD-1.5 with CLIP ViT-L/14: no layer then)
        self.to_text = nn.Linear(config["context_dim"], width) if width != config["context_dim"] else nn.Identity()
        # spliced at the encoder's input, e_t's tokens take the size of its word embeddings; at e_t's own
        # unit scale they would drown the prompt's words in the residual stream
        self.token_scale = text_encoder.token_embedding.weight.float().std().item()
        self._prompt_cache, self._hidden_cache = {}, {}

    def forward(self, e_t, captions=None, drop=None):
        """captions: the conditions' captions (none: ""); a dropped condition (drop, bool [B]) has ""."""
        captions = list(captions) if captions is not None and self.use_text else [""] * len(e_t)
        if drop is not None:
            captions = ["" if dropped else c for c, dropped in zip(captions, drop.tolist())]
        vectors = self.to_text(e_t)  # [B, n, width]
        if self.mode == "splice":
            tokens = self.prompt_tokens(captions, e_t.shape[1]).to(e_t.device)
            return self.text_encoder.encode_text_tokens(tokens, replace=(clip.PLACEHOLDER_ID, vectors * self.token_scale))
        hidden = self.prompt_hidden_states(captions)
        return torch.cat([hidden.to(vectors.dtype), vectors], dim=1)

    def prompt_tokens(self, captions, n):
        """sd_prompt with {caption} filled in and its * made n placeholders -> [B, 77] token ids (SD's end-token
        padding). A long caption is cut; the placeholders never are."""
        rows = []
        for caption in captions:
            if (caption, n) not in self._prompt_cache:
                before, after = self.prompt.replace("{caption}", caption.replace("*", " ")).split("*")
                tail = clip.bpe_tokens(after)[:75 - n]
                head = clip.bpe_tokens(before)[:75 - n - len(tail)]
                ids = [clip.START_ID] + head + [clip.PLACEHOLDER_ID] * n + tail + [clip.END_ID]
                self._prompt_cache[caption, n] = torch.tensor(ids + [clip.END_ID] * (77 - len(ids)))
            rows.append(self._prompt_cache[caption, n])
        return torch.stack(rows)

    @torch.no_grad()
    def prompt_hidden_states(self, captions):
        """The frozen encoder's 77 hidden states of the prompt without its * (append), cached per caption."""
        missing = sorted({c for c in captions if c not in self._hidden_cache})
        if missing:
            tokens = self.prompt_tokens(missing, 0).to(self.text_encoder.token_embedding.weight.device)
            for caption, hidden in zip(missing, self.text_encoder.encode_text_tokens(tokens)):
                self._hidden_cache[caption] = hidden
        return torch.stack([self._hidden_cache[c] for c in captions])


# ----------------------------------------------------------------------------------------------
# The backbone of train.py --sd, and the file's identity in a checkpoint

def load_backbone(config, device="cpu"):
    """The networks AnomalyXFusion takes from config["sd"] (and config["sd_vae"]): {vae, unet (adapted),
    sd_adapter}, the keyword arguments of axf.AnomalyXFusion. The file's own sizes are file_sizes(); the config
    is not changed here."""
    vae, unet, text = load_sd(config["sd"], device, config["sd_weights"], config["sd_vae"] or None)
    f = vae.downsample_factor * 2 ** (len(unet.sd_sizes["channel_mult"]) - 1)  # the VAE's, then the UNet's halvings
    if config["image_size"] % f:
        raise ValueError(f"image_size {config['image_size']} must be a multiple of {f} for {config['sd']}")
    unet = adapt_sd_unet(unet, config["train_unet"], config["lora_rank"], config["unet_mask_input"])
    return dict(vae=vae, unet=unet, sd_adapter=TextEncoderContext(text, config).to(device))


def file_sizes(backbone):
    """The config keys an SD file decides, whatever the preset says: its VAE's and UNet's sizes."""
    sizes = {}
    for prefix, model in (("vae_", backbone["vae"]), ("unet_", backbone["unet"])):
        for key in ("channels", "channel_mult", "num_res_blocks", "attention_levels", "num_heads"):
            if key in model.sd_sizes:
                value = model.sd_sizes[key]
                sizes[prefix + key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return sizes


def sd_file(path, parts=tuple(SD_PREFIXES), chunk=1 << 24):
    """What names an SD file (or folder: the part files it reads) in a checkpoint: its path, size in bytes and
    sha256 (hashing SD-1.5's 4 GB takes seconds). parts=("VAE",) for a separate VAE."""
    path = Path(path)
    refuse_special_file(path, "a Stable Diffusion file or folder")
    files = list(diffusers_files(path, parts).values()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return {"path": str(path.resolve()), "size": sum(f.stat().st_size for f in files), "sha256": digest.hexdigest()}


def check_sd_file(path, saved, parts=tuple(SD_PREFIXES)):
    """Raise one clear line unless `path` is the very file a checkpoint was trained on (same size and hash)."""
    wanted = f"{saved['path']} ({saved['size']:,} bytes, sha256 {saved['sha256'][:16]}...)"
    what, flag = ("VAE file", "--sd_vae") if parts == ("VAE",) else ("Stable Diffusion file", "--sd")
    refuse_special_file(path, f"the {what}")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: missing; this checkpoint was trained on the {what} {wanted}: "
                                f"pass {flag} with where that file is now")
    if sd_file(path, parts)["sha256"] != saved["sha256"]:
        raise ValueError(f"{path} is not the {what} this checkpoint was trained on ({wanted}); "
                         f"its trained weights belong to that file")


# ----------------------------------------------------------------------------------------------
# Checkpoints saved in older layouts: LoRA's adapters beside their layers, conv_in trained whole

OLD_LORA_KEY = re.compile(r"\.lora\.(to_q|to_k|to_v|to_out)\.")  # `attn1.lora.to_q.down.weight`, beside the layer


def upgrade_checkpoint(checkpoint, unet):
    """A train.py checkpoint of an older layout made loadable into the model built on `unet` (its SD UNet, adapted),
    in place; returns the checkpoint.
    - LoRA adapters were saved as `...attn1.lora.to_q.down.weight`, now `...attn1.to_q.lora.down.weight`;
    - a widened conv_in once trained whole, the pretrained channels and bias too, and was saved as one 5-channel
      `unet.conv_in.weight`: `unet` gets that plain, trainable conv back, so that the checkpoint loads as the very
      model it was."""
    for part in ("model", "ema"):
        if checkpoint.get(part):
            checkpoint[part] = {OLD_LORA_KEY.sub(r".\1.lora.", k): v for k, v in checkpoint[part].items()}
    saved = checkpoint["model"].keys()
    trained_whole = "unet.conv_in.weight" in saved and "unet.conv_in.extra_weight" not in saved
    if isinstance(unet.conv_in, WidenedConv) and trained_whole:
        unet.conv_in = unet.conv_in.as_conv2d()
    return checkpoint
