"""The latent UNet ε_θ(x_t, t, e_t) of latent diffusion: the network of the paper's reverse process (§4.3).

It predicts the noise ε in a noisy latent x_t (the target of the loss, Eq. (17)), given the timestep t and
a context of tokens that it reads through cross-attention; in AnomalyXFusion that context is the DDF
embedding e_t (Eq. (14), (15)). The layout is LDM's (Rombach et al. 2022, CompVis/latent-diffusion
`openaimodel.py`), cut down to the options this project uses:

    x [B, C, H, W] -> conv_in -> input blocks  (ResBlock [+ SpatialTransformer]) x n, Downsample, ...
                               -> middle block (ResBlock, SpatialTransformer, ResBlock)
                               -> output blocks (concat skip, ResBlock [+ SpatialTransformer]) x (n+1), Upsample
                   -> GroupNorm, SiLU, conv_out -> ε [B, C, H, W]

Every ResBlock adds the timestep embedding; every SpatialTransformer does self-attention over the
pixels, cross-attention to the context and a GEGLU feed-forward. Stable Diffusion 1.x's UNet
(`model.diffusion_model.*` in its single file) loads into this one by the rename rule `from_sd` at the end
(`to_sd` is its inverse; `from_diffusers` maps a diffusers folder's UNet onto the single file's names); `add_lora`, `expand_input_channels` and the `gradient_checkpointing` switch adapt
a pretrained UNet to AnomalyXFusion without changing its output before training. Depends on torch only.
"""
import math
import functools
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps, [B] -> [B, dim] (Transformer / DDPM positional code).

    Frequencies fall geometrically from 1 to 1/max_period; cosines first, then sines, as in LDM.
    Shared with the DDF module (axf.py), which embeds t the same way for Eq. (14).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd widths get one zero column
        emb = F.pad(emb, (0, 1))
    return emb  # [B, dim]


def zero_init(module):
    """Zero a layer's weights and bias. Used on every block's last layer: a residual block whose output
    projection is zero is the identity at initialisation, so a fresh deep UNet starts as a stack of
    identities and trains stably (LDM's `zero_module`). Consequence: a fresh UNet outputs exactly 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def attention(q, k, v, num_heads):
    """Multi-head scaled dot-product attention: [B, N, C] queries over [B, M, C] keys/values -> [B, N, C].

    The one attention function of the UNet: self-attention passes k, v from the pixels, cross-attention
    from the context. On a GPU F.scaled_dot_product_attention picks a fused (flash / memory-efficient) kernel.
    """
    B, N, C = q.shape
    # heads split the channels; transpose is a view, SDPA takes strided inputs without a copy
    q, k, v = (x.view(B, -1, num_heads, C // num_heads).transpose(1, 2) for x in (q, k, v))  # [B, h, N, C/h]
    if q.is_cpu:
        # on a CPU, plain matmuls: the fused kernel's backward is slow at these head widths, the more so in bf16
        # (measured: docs/speed.md); under autocast the two products run in bf16 and the softmax in fp32
        weights = (q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5  # [B, h, N, M]
        out = weights.softmax(-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, C)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between; 1x1 skip when C changes."""

    def __init__(self, in_channels, out_channels, time_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)  # the time injection: a per-channel shift
        self.norm2 = nn.GroupNorm(32, out_channels)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))  # block starts as identity
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        # how much noise there is decides what to do with the features: t shifts every channel
        h = h + self.time_proj(temb)[:, :, None, None]  # temb is already SiLU'd by the UNet
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention layer; cross-attention when context_dim is given (k, v from the context)."""

    def __init__(self, dim, num_heads, context_dim=None):
        super().__init__()
        self.num_heads = num_heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.lora = None  # rank-r adapters of the four projections, set by add_lora (fine-tuning a pretrained UNet)

    def forward(self, x, context=None):
        context = x if context is None else context  # the only difference between self- and cross-attention
        if self.lora is None:  # the plain layer: no extra work unless adapters were added
            return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.num_heads))
        lora = self.lora
        q, k, v = (self.to_q(x) + lora["to_q"](x), self.to_k(context) + lora["to_k"](context),
                   self.to_v(context) + lora["to_v"](context))
        h = attention(q, k, v, self.num_heads)
        return self.to_out(h) + lora["to_out"](h)


class LoRA(nn.Module):
    """A rank-r update W + up @ down of a frozen linear layer (Hu et al. 2021, "LoRA"), computed beside it:
    x -> up(down(x)). `up` starts at zero, so a fresh adapter changes nothing: step 0 is the pretrained model."""

    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)  # nn.Linear's default (Kaiming-uniform) init, as peft
        self.up = zero_init(nn.Linear(rank, out_features, bias=False))

    def forward(self, x):
        return self.up(self.down(x))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020), 4x wide, as in LDM's transformer."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.proj = nn.Linear(dim, dim * mult * 2)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the context, feed-forward."""

    def __init__(self, dim, num_heads, context_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, num_heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)  # where the condition e_t enters the image (Eq. (15))
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs a transformer block over the pixels of a feature map: [B, C, H, W] -> tokens [B, HW, C] -> back.

    proj_in/proj_out are linear layers on the tokens (SD 2's choice; a 1x1 conv is the same map).
    """

    def __init__(self, channels, num_heads, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.block = BasicTransformerBlock(channels, num_heads, context_dim)
        self.proj_out = zero_init(nn.Linear(channels, channels))  # the whole transformer starts as identity

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        h = self.proj_out(self.block(self.proj_in(h), context))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.ModuleList):
    """A sequence of layers; each gets what it needs: ResBlocks the time embedding, transformers the context
    (LDM's TimestepEmbedSequential)."""

    def forward(self, x, temb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, temb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """ε_θ(x_t, t, context): the LDM UNet. channel_mult gives the width of each resolution level
    (level i works at 1/2**i of the input size); attention_levels lists the levels that get a transformer."""

    def __init__(self, in_channels=4, out_channels=4, channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
                 attention_levels=(0, 1), num_heads=8, context_dim=512, gradient_checkpointing=False):
        super().__init__()
        if any(not 0 <= i < len(channel_mult) for i in attention_levels):
            raise ValueError(f"attention_levels {attention_levels} must index channel_mult {channel_mult}")
        self.channels = channels
        self.num_levels = len(channel_mult)
        self.gradient_checkpointing = gradient_checkpointing  # trade compute for activation memory
        time_dim = 4 * channels
        # timestep: sinusoid -> MLP; one SiLU here serves every ResBlock's time projection
        self.time_embed = nn.Sequential(nn.Linear(channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim), nn.SiLU())
        attn = lambda ch: SpatialTransformer(ch, num_heads, context_dim)

        # encoder half: at each level num_res_blocks ResBlocks (+ attention), then a Downsample
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.input_blocks = nn.ModuleList()
        skip_channels = [channels]  # the width of every tensor the output blocks will concatenate
        ch = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, channels * mult, time_dim)]
                ch = channels * mult
                if level in attention_levels:
                    layers.append(attn(ch))
                self.input_blocks.append(Block(layers))
                skip_channels.append(ch)
            if level != self.num_levels - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_channels.append(ch)

        # bottom: attention at the coarsest level always, it is the cheapest place for global context
        self.middle_block = Block([ResBlock(ch, ch, time_dim), attn(ch), ResBlock(ch, ch, time_dim)])

        # decoder half, mirrored: num_res_blocks + 1 ResBlocks per level, each eating one skip connection
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), channels * mult, time_dim)]
                ch = channels * mult
                if level in attention_levels:
                    layers.append(attn(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))

        self.norm_out = nn.GroupNorm(32, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))  # predicts ε = 0 at the start

    def _run(self, block, h, temb, context):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, temb, context, use_reentrant=False)  # recompute in backward
        return block(h, temb, context)

    def forward(self, x, t, context):
        """x [B, C, H, W] noisy latents, t [B] timesteps (one per sample), context [B, tokens, context_dim]."""
        B, C, H, W = x.shape
        f = 2 ** (self.num_levels - 1)
        if H % f or W % f:
            raise ValueError(f"UNet input {H}x{W} must be divisible by {f} (2 ** (len(channel_mult) - 1))")
        if t.shape != (B,):
            raise ValueError(f"t must have shape [B] = [{B}] (one timestep per sample), got {tuple(t.shape)}")
        temb = self.time_embed(timestep_embedding(t, self.channels).to(x.dtype))  # [B, 4 * channels]
        h = self.conv_in(x)  # [B, channels, H, W]
        # every encoder output is kept and handed, last first, to the mirrored decoder block (the U's rungs)
        skips = [h]
        for block in self.input_blocks:
            h = self._run(block, h, temb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, temb, context)  # [B, channels * mult[-1], H / f, W / f]
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), temb, context)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, out_channels, H, W]


# ----------------------------------------------------------------------------------------------
# Stable Diffusion 1.x weights: CompVis `openaimodel.py` names -> this file's (used by sd.load_sd)

SD_RENAMES = [  # (regex on the SD key, our name), applied in order
    (r"^input_blocks\.0\.0\.", "conv_in."),
    (r"^input_blocks\.(\d+)\.", lambda m: f"input_blocks.{int(m[1]) - 1}."),  # conv_in is block 0 in SD
    (r"^out\.0\.", "norm_out."), (r"^out\.2\.", "conv_out."),
    (r"\.in_layers\.0\.", ".norm1."), (r"\.in_layers\.2\.", ".conv1."), (r"\.emb_layers\.1\.", ".time_proj."),
    (r"\.out_layers\.0\.", ".norm2."), (r"\.out_layers\.3\.", ".conv2."), (r"\.skip_connection\.", ".skip."),
    (r"\.op\.", ".conv."),  # Downsample
    (r"\.transformer_blocks\.0\.", ".block."), (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj."), (r"\.ff\.net\.2\.", ".ff.out."),
]


def from_sd(state_dict):
    """SD-1.x UNet tensors (keys without `model.diffusion_model.`) -> a state dict in this file's names.
    One reshape: SD-1.x's proj_in / proj_out are 1x1 convs [C, C, 1, 1], ours Linear [C, C] (the same map)."""
    sd = {}
    for key, value in state_dict.items():
        for pattern, name in SD_RENAMES:
            key = re.sub(pattern, name, key)
        if re.search(r"\.proj_(in|out)\.weight$", key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        sd[key] = value
    return sd


def to_sd(state_dict):
    """The inverse of from_sd: this file's names -> SD-1.x's (keys without `model.diffusion_model.`), proj_in /
    proj_out back to 1x1 convs. LoRA adapters have no place in an SD file: merge_lora or drop them first."""
    if any(".lora." in k for k in state_dict):
        raise ValueError("to_sd: the UNet holds LoRA adapters; merge_lora(unet) first (or save lora_state_dict alone)")
    sd = {}
    for key, value in state_dict.items():
        if re.search(r"\.proj_(in|out)\.weight$", key):
            value = value[:, :, None, None]
        key = re.sub(r"^conv_in\.", "input_blocks.-1.0.", key)
        key = re.sub(r"^input_blocks\.(-?\d+)\.", lambda m: f"input_blocks.{int(m[1]) + 1}.", key)
        key = re.sub(r"^norm_out\.", "out.0.", re.sub(r"^conv_out\.", "out.2.", key))
        key = re.sub(r"^(input_blocks\.\d+\.0)\.conv\.", r"\1.op.", key)  # Downsample (Upsample keeps conv)
        if ".block." in key:  # transformer block: its norm1..3 keep their names
            key = key.replace(".block.", ".transformer_blocks.0.").replace(".to_out.", ".to_out.0.")
            key = key.replace(".ff.proj.", ".ff.net.0.proj.").replace(".ff.out.", ".ff.net.2.")
        else:  # ResBlock
            for ours, theirs in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_proj", "emb_layers.1"),
                                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("skip", "skip_connection")):
                key = key.replace(f".{ours}.", f".{theirs}.")
        sd[key] = value
    return sd


DIFFUSERS_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                    "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def from_diffusers(state_dict):
    """diffusers UNet2DConditionModel tensors (a diffusers folder's unet/) -> SD-1.x's original names, which
    from_sd then reads. diffusers counts blocks per level (down_blocks.i.resnets.j, .attentions.j,
    .downsamplers.0); the original counts them across levels with conv_in as input block 0, n ResBlocks a level:
    level i's j-th ResBlock is input_blocks.{i(n+1) + j + 1}.0, its transformer .1, its downsampler
    input_blocks.{(i+1)(n+1)}.0.op. On the way up a level has n + 1 blocks, and its upsampler follows the last
    one, after its transformer if the level has one. Transformer blocks keep their names."""
    n = sum(1 for k in state_dict if re.fullmatch(r"down_blocks\.0\.resnets\.\d+\.conv1\.weight", k))
    attends = {m[1] for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    renames = [
        (r"\.resnets\.(\d+)\.(\w+)\.", lambda m: f".resnets.{m[1]}.{DIFFUSERS_RESNET.get(m[2], m[2])}."),
        (r"^time_embedding\.linear_([12])\.", lambda m: f"time_embed.{2 * int(m[1]) - 2}."),
        (r"^conv_in\.", "input_blocks.0.0."), (r"^conv_norm_out\.", "out.0."), (r"^conv_out\.", "out.2."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op."),
        (r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
         lambda m: f"input_blocks.{int(m[1]) * (n + 1) + int(m[3]) + 1}.{int(m[2] == 'attentions')}."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"output_blocks.{int(m[1]) * (n + 1) + n}.{2 if m[1] in attends else 1}."),
        (r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
         lambda m: f"output_blocks.{int(m[1]) * (n + 1) + int(m[3])}.{int(m[2] == 'attentions')}."),
        (r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
        (r"^mid_block\.attentions\.0\.", "middle_block.1."),
    ]
    rename = lambda key: functools.reduce(lambda k, rule: re.sub(*rule, k), renames, key)  # every rule in turn
    return {rename(key): value for key, value in state_dict.items()}


# ----------------------------------------------------------------------------------------------
# Adapting a pretrained UNet to AnomalyXFusion (train.py --sd): LoRA, a mask input channel, gradient checkpointing.

def add_lora(unet, rank=4):
    """Give every attention layer (self- and cross-, in every transformer) rank-r adapters on to_q, to_k, to_v
    and to_out, as DualAnoDiff fine-tunes SD. Returns the new parameters (the only ones that should train:
    freeze the rest with unet.requires_grad_(False) before). Their keys hold `.lora.` (lora_state_dict)."""
    params = []
    for module in unet.modules():
        if isinstance(module, Attention):
            if module.lora is not None:
                raise ValueError("add_lora: this UNet already has LoRA adapters")
            layers = {name: getattr(module, name) for name in ("to_q", "to_k", "to_v", "to_out")}
            w = module.to_q.weight
            module.lora = nn.ModuleDict({name: LoRA(layer.in_features, layer.out_features, rank)
                                         for name, layer in layers.items()}).to(device=w.device, dtype=w.dtype)
            params += list(module.lora.parameters())
    return params


def lora_state_dict(unet):
    """Only the adapters' tensors (keys `...attn1.lora.to_q.down.weight`): what a LoRA checkpoint stores."""
    return {k: v for k, v in unet.state_dict().items() if ".lora." in k}


def merge_lora(unet):
    """Fold every adapter into its layer (W <- W + up @ down) and remove it: a plain UNet again, same outputs."""
    for module in unet.modules():
        if isinstance(module, Attention) and module.lora is not None:
            with torch.no_grad():
                for name, adapter in module.lora.items():
                    getattr(module, name).weight += adapter.up.weight @ adapter.down.weight
            module.lora = None
    return unet


def expand_input_channels(unet, in_channels=5):
    """A pretrained 4-channel UNet -> one that also reads extra input channels (e.g. the mask: [x_t, mask]).
    The new channels' conv_in weights are zero, so until they train the output is the pretrained model's
    (RunwayML's recipe for SD-1.5-inpainting's 5 extra channels)."""
    old = unet.conv_in
    if in_channels < old.in_channels:
        raise ValueError(f"expand_input_channels: the UNet already reads {old.in_channels} channels, not fewer")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, padding=old.padding).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    new.bias.requires_grad_(old.bias.requires_grad)
    unet.conv_in = new
    if hasattr(unet, "sd_sizes"):
        unet.sd_sizes = dict(unet.sd_sizes, in_channels=in_channels)
    return unet
