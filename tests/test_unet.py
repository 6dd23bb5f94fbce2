"""unet.UNet: the ε-network of §4.3. Shapes, wiring of t and context, training, checkpointing, autocast."""
import pytest
import torch

import unet
from unet import UNet, timestep_embedding

TINY = dict(in_channels=4, out_channels=4, channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_levels=(1,), num_heads=2, context_dim=16)


def randomise(model, seed=0):
    """Perturb every parameter (the zero-initialised output layers included) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 / p[0].numel() ** 0.5 if p.dim() > 1 else 0.1  # weights by fan-in; biases, norms small
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(B, C=4, H=8, W=8, tokens=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randn(B, tokens, dim, generator=g))


@pytest.mark.parametrize("config, B, H, W", [
    (dict(channel_mult=(1, 2), attention_levels=(0,)), 1, 8, 8),
    (dict(channel_mult=(1, 2, 2), attention_levels=(1, 2), num_res_blocks=2), 3, 8, 16),  # 3 levels, non-square
    (dict(channel_mult=(1, 1, 2), attention_levels=(), out_channels=8), 2, 16, 8),  # attention in the middle only
])
def test_output_has_the_input_shape(config, B, H, W):
    """ε has the shape of x_t (out_channels wide) for any level count, attention placement and batch size."""
    model = UNet(**dict(TINY, **config))
    x, t, ctx = inputs(B, H=H, W=W)
    assert model(x, t, ctx).shape == (B, config.get("out_channels", 4), H, W)


def test_fresh_unet_predicts_zero():
    """The zero-initialised output layers make a fresh UNet (and every fresh residual block) a no-op."""
    x, t, ctx = inputs(2)
    assert torch.equal(UNet(**TINY)(x, t, ctx), torch.zeros(2, 4, 8, 8))


def test_output_depends_on_context_and_timestep():
    """Cross-attention must read the context and ResBlocks the timestep, or the condition e_t is ignored."""
    model = randomise(UNet(**TINY))
    x, t, ctx = inputs(2)
    out = model(x, t, ctx)
    assert not torch.allclose(out, model(x, t, ctx + torch.randn_like(ctx)), atol=1e-4)
    assert not torch.allclose(out, model(x, (t + 100) % 1000, ctx), atol=1e-4)


def test_each_sample_uses_its_own_timestep_and_context():
    """A batch is a set of independent samples: row i of the output only depends on x_i, t_i, context_i."""
    model = randomise(UNet(**TINY))
    x, t, ctx = inputs(3)
    out = model(x, t, ctx)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]), rtol=1e-4, atol=1e-5)


def test_timestep_embedding_is_the_ldm_sinusoid():
    """cos then sin of t / 10000^(i / half): the layout LDM checkpoints (and the DDF module) expect."""
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_bad_inputs_are_clear_errors():
    """A shared scalar timestep or a latent the UNet cannot halve must fail with a message, not a shape error deep inside."""
    model = UNet(**TINY)
    x, t, ctx = inputs(2)
    with pytest.raises(ValueError, match="one timestep per sample"):
        model(x, torch.tensor(5), ctx)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 4, 7, 8), t, ctx)
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(**dict(TINY, attention_levels=(2,)))


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointing only recomputes activations in backward: loss and gradients must be unchanged."""
    model = randomise(UNet(**TINY))
    x, t, ctx = inputs(2)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(x, t, ctx).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_runs_under_bf16_autocast():
    """Training on a GPU uses bf16 autocast; the same code must run under it (checked here on CPU) and agree."""
    model = randomise(UNet(**TINY))
    x, t, ctx = inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, ctx)
    assert out.dtype == torch.bfloat16
    ref = model(x, t, ctx)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_overfits_one_batch():
    """The ε-loss (Eq. (17)) on one fixed batch, t and noise must fall 10x in 40 steps (a loose bound)."""
    torch.manual_seed(0)
    model = UNet(**TINY)
    x, t, ctx = inputs(4)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = (model(x, t, ctx) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


@pytest.mark.parametrize("dtype, N, fused", [(torch.float32, 64, True), (torch.bfloat16, 64, False),
                                             (torch.bfloat16, 512, True)])
def test_attention_is_softmax_of_scaled_products_on_either_cpu_path(monkeypatch, dtype, N, fused):
    """unet.attention against the formula written per head, in fp64: on a CPU in bf16, up to
    CPU_PLAIN_ATTENTION_MAX (query, key) pairs per head run as plain matmuls, more in the fused kernel; fp32 always
    in the fused kernel. Both paths give softmax(q k^T / sqrt(d)) v."""
    calls = []
    fused_kernel = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", lambda *a: calls.append(1) or fused_kernel(*a))
    monkeypatch.setattr(unet, "CPU_PLAIN_ATTENTION_MAX", 256 * 256)
    torch.manual_seed(0)
    B, heads, d = 2, 2, 8
    q, k, v = (torch.randn(B, N, heads * d) for _ in range(3))
    out = unet.attention(*(x.to(dtype) for x in (q, k, v)), heads)
    split = lambda x: x.double().view(B, -1, heads, d).transpose(1, 2)  # [B, h, N, d]
    expected = ((split(q) @ split(k).transpose(-2, -1)) / d ** 0.5).softmax(-1) @ split(v)
    expected = expected.transpose(1, 2).reshape(B, N, heads * d)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    assert bool(calls) == fused
