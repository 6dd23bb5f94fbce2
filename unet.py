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
pixels, cross-attention to the context and a GEGLU feed-forward. The `gradient_checkpointing` switch trades
compute for activation memory. Being LDM's layout, Stable Diffusion 1.x's UNet loads into it by a rename rule;
that rule lives with the SD code (sd.py), as do LoRA and the mask input channel (sd_backbone.py): this file holds
its own layout only. Depends on torch only.
"""
import math

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


# On a CPU in bf16, attention of at most this many (query, key) pairs per head runs as plain matmuls
CPU_PLAIN_ATTENTION_MAX = 256 * 256


def attention(q, k, v, num_heads):
    """Multi-head scaled dot-product attention: [B, N, C] queries over [B, M, C] keys/values -> [B, N, C].

    The one attention function of the UNet: self-attention passes k, v from the pixels, cross-attention
    from the context. F.scaled_dot_product_attention picks a fused (flash / memory-efficient) kernel.
    """
    B, N, C = q.shape
    # heads split the channels; transpose is a view, SDPA takes strided inputs without a copy
    q, k, v = (x.view(B, -1, num_heads, C // num_heads).transpose(1, 2) for x in (q, k, v))  # [B, h, N, C/h]
    if q.is_cpu and q.dtype == torch.bfloat16 and N * k.shape[-2] <= CPU_PLAIN_ATTENTION_MAX:
        # on a CPU under bf16 autocast, small attention runs faster as two plain matmuls (bf16) and a softmax
        # (fp32) than in the fused kernel, whose bf16 backward is slow; the fused kernel wins in fp32, and from
        # 32x32 latents on in bf16 (measured per shape: docs/speed.md)
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

    def forward(self, x, context=None):
        context = x if context is None else context  # the only difference between self- and cross-attention
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.num_heads))


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

