"""Speed and memory figures for the toy and MVTec presets and SD-1.5's UNet, printed as one markdown table.

    python bench.py [--device cpu|cuda] [--preset toy|mvtec|all] [--quick]

Each `bench_<thing>(cfg, device, quick)` function returns rows (dicts with the columns below); add a
new figure by writing such a function and listing it in BENCHES. Times are the median of a few runs
after one warm-up run (one run for the MVTec preset on CPU). FLOPs are counted by torch.utils.flop_counter (matmuls, convolutions and
attention; elementwise ops are free), and compared with this machine's matmul peak, measured in the
same run on a large square matmul, so "% of peak" says how well the model uses the hardware.
The models run as train.py runs them (cli.autocast): under bf16 autocast on CUDA and on CPUs with AMX, and
then the peak is bf16's; elsewhere all is fp32.
Depends on axf.py (the presets and the whole model), unet.py, vae.py, clip.py and evaluate.py.
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import axf
import cli
import metrics
from unet import UNet
from vae import VAE

COLUMNS = ["preset", "benchmark", "batch", "ms", "GFLOP", "GFLOP/s", "% of peak", "peak memory (MB)"]


# ----------------------------------------------------------------------------------------------
# measuring helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, repeats):
    """(median seconds over `repeats` runs, FLOPs of one run). The first run warms up (allocations, kernel
    choice) and is the one whose FLOPs torch.utils.flop_counter counts (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], counter.get_total_flops()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    """CUDA: the most memory tensors held since the last reset. CPU: the process's max RSS so far (Linux: KB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource  # Unix only
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10


def autocast(device):
    """The training setting (cli.autocast): bf16 on CUDA and on CPUs with AMX, else fp32."""
    return cli.autocast(device)


def matmul_peak_gflops(device, quick):
    """This machine's dense matmul throughput: the yardstick for the "% of peak" column."""
    n = (1024 if quick else 2048) if device.type == "cpu" else 8192
    dtype = torch.bfloat16 if cli.uses_bf16(device) else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds, flops = measure(lambda: a @ b, device, 5)
    return flops / seconds / 1e9


def row(cfg, name, batch, seconds_and_flops, device, note=""):
    seconds, flops = seconds_and_flops
    return {"preset": cfg["preset"] + note, "benchmark": name, "batch": batch, "ms": seconds * 1e3,
            "GFLOP": flops / 1e9, "GFLOP/s": flops / seconds / 1e9, "peak memory (MB)": peak_memory_mb(device)}


def batch_and_repeats(cfg, device, quick):
    """The preset's batch and 3 timed runs; on CPU the MVTec preset runs one sample once, so that the whole
    bench takes about 2 minutes on a 2-core machine."""
    if device.type == "cpu" and cfg["preset"] == "mvtec":
        return 1, 1, " (CPU: batch 1)"
    return cfg["batch_size"], 1 if quick else 3, ""


# ----------------------------------------------------------------------------------------------
# the benchmarks: each returns a list of rows

def bench_unet(cfg, device, quick):
    """The latent UNet: one training step (forward, backward, AdamW) and one inference forward."""
    B, repeats, note = batch_and_repeats(cfg, device, quick)
    f = 2 ** (len(cfg["vae_channel_mult"]) - 1)
    size, C = cfg["image_size"] // f, cfg["vae_latent_channels"]
    model = UNet(C + 1, C, cfg["unet_channels"], cfg["unet_channel_mult"], cfg["unet_num_res_blocks"],
                 cfg["unet_attention_levels"], cfg["unet_num_heads"], cfg["context_dim"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(B, C + 1, size, size, device=device)  # the latent and its mask, as axf.py feeds it
    t = torch.randint(0, 1000, (B,), device=device)
    context = torch.randn(B, 3 * cfg["num_tokens"], cfg["context_dim"], device=device)  # [B, 3k, d]: the X-embedding
    noise = torch.randn(B, C, size, size, device=device)

    def train_step():
        with autocast(device):
            loss = (model(x, t, context).float() - noise).square().mean()  # Eq. (17)'s ε-loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward():
        with autocast(device):
            model(x, t, context)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = f"UNet {params:.1f}M params, {size}x{size}x{C} latent"
    rows = []
    reset_peak_memory(device)
    rows.append(row(cfg, f"{name}: training step", B, measure(train_step, device, repeats), device, note))
    model.zero_grad(set_to_none=True)
    model.eval()
    reset_peak_memory(device)
    rows.append(row(cfg, f"{name}: forward (sampling step)", B, measure(forward, device, repeats), device, note))
    return rows


def bench_vae(cfg, device, quick):
    """The KL autoencoder: encoding a batch of images to latents, decoding latents to images."""
    B, repeats, note = batch_and_repeats(cfg, device, quick)
    vae = VAE(3, cfg["vae_channels"], cfg["vae_channel_mult"], cfg["vae_num_res_blocks"], cfg["vae_latent_channels"]).to(device).eval()
    x = torch.rand(B, 3, cfg["image_size"], cfg["image_size"], device=device) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mode()

    @torch.no_grad()
    def encode():
        with autocast(device):
            vae.encode_latents(x)

    @torch.no_grad()
    def decode():
        with autocast(device):
            vae.decode_latents(z)

    params = sum(p.numel() for p in vae.parameters()) / 1e6
    name = f"VAE {params:.1f}M params, {cfg['image_size']} px"
    rows = []
    for what, fn in (("encode", encode), ("decode", decode)):
        reset_peak_memory(device)
        rows.append(row(cfg, f"{name}: {what}", B, measure(fn, device, repeats), device, note))
    return rows


def bench_axf(cfg, device, quick):
    """The whole method: one AnomalyXFusion training step (MIF, DDF, UNet, Eq. 17) and sampling per image
    (DDIM, classifier-free guidance, blended as Eq. 16, then decoded). On CPU the MVTec preset times
    2 of its sampler steps and scales them to the full count (said in the row)."""
    B, repeats, note = batch_and_repeats(cfg, device, quick)
    model = axf.AnomalyXFusion(cfg, axf.build_clip(cfg, device), ["crack", "hole"]).to(device)
    model.vae.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    S = cfg["image_size"]
    images = torch.rand(B, 3, S, S, device=device)
    masks = torch.zeros(B, 1, S, S, device=device)
    masks[..., S // 4: S // 2, S // 4: S // 2] = 1
    captions = [f"a small crack number {i}" for i in range(B)]
    ids = torch.ones(B, dtype=torch.long, device=device)
    latents = model.encode_images(images)

    def train_step():
        with autocast(device):
            loss = model.loss(latents, masks, captions, ids, torch.ones(B, dtype=torch.bool, device=device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps = 2 if note else cfg["sample_steps"]

    def sample():
        with torch.inference_mode(), autocast(device):  # inference mode: FlopCounterMode trips on no_grad views
            model.sample(images, masks, captions, ids, steps=steps, guidance_scale=cfg["guidance_scale"])

    rows = [row(cfg, "AnomalyXFusion training step", B, measure(train_step, device, repeats), device, note)]
    seconds, flops = measure(sample, device, 1)
    scale = cfg["sample_steps"] / steps
    rows.append(row(cfg, f"sampling, {cfg['sample_steps']} DDIM steps + guidance, per image"
                    + (f" ({steps} steps timed, x{scale:g}: an upper bound, VAE included)" if scale != 1 else ""), 1,
                    (seconds * scale / B, flops * scale / B), device, note))
    return rows


def bench_clip(device, quick):
    """CLIP ViT-B/32 size (random weights): encode_image on 32 images of 224 px, encode_text on 32 captions."""
    import clip
    model = clip.CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                      context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                      transformer_layers=12).to(device).eval()
    images = torch.randn(32, 3, 224, 224, device=device)
    tokens = clip.tokenize([f"a photo of a bottle with defect number {i}" for i in range(32)]).to(device)
    rows = []
    for name, fn in (("encode_image", lambda: model.encode_image(images)), ("encode_text", lambda: model.encode_text(tokens))):
        with torch.inference_mode():
            rows.append(row({"preset": "any"}, f"CLIP ViT-B/32: {name}", 32, measure(fn, device, 1 if quick else 3), device))
    return rows


def bench_metrics(device, quick, n=5_000_000):
    """evaluate.auroc / average_precision / f1_max on 5M pixel scores (a category's pooled test pixels)."""
    import numpy as np

    import evaluate
    rng = np.random.default_rng(0)
    labels = rng.random(n) < 0.05
    scores = np.round(rng.random(n) * 0.7 + 0.3 * labels, 3).astype(np.float32)  # 3 decimals: many ties
    rows = []
    for name in ("auroc", "average_precision", "f1_max"):
        fn = getattr(evaluate, name)
        t0 = time.perf_counter()
        fn(scores, labels)
        rows.append({"preset": "any", "benchmark": f"evaluate.{name}, 5M pixels", "batch": n,
                     "ms": (time.perf_counter() - t0) * 1e3, "peak memory (MB)": peak_memory_mb(device)})
    return rows


def bench_sd(device, quick):
    """Stable Diffusion 1.5's UNet as sd.load_sd builds it from v1-5-pruned-emaonly (tests/test_sd.py checks
    that layout), per image at 256 and 512 px: a training step (forward, backward) and a sampling step (one
    forward; classifier-free guidance doubles it). FLOPs are counted on the meta device (no memory, no
    weights); times and peak memory are measured on CUDA only (a full training step, AdamW included)."""
    timed = device.type == "cuda"
    with torch.device(device if timed else "meta"):
        model = UNet(4, 4, channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                     num_heads=8, context_dim=768)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if timed else None
    params = sum(p.numel() for p in model.parameters())
    rows = [{"preset": "sd-1.5", "benchmark": f"UNet {params:,} params (load_sd of v1-5-pruned-emaonly)"}]
    for px in (256, 512):
        x = torch.randn(1, 4, px // 8, px // 8, device=model.conv_in.weight.device)
        t, context = torch.full((1,), 500, device=x.device), torch.randn(1, 77, 768, device=x.device)

        def train_step():
            with autocast(device):
                loss = model(x, t, context).float().square().mean()
            loss.backward()
            if timed:
                opt.step()
            model.zero_grad(set_to_none=True)

        def forward():
            with torch.inference_mode(), autocast(device):
                model(x, t, context)

        for what, fn in (("training step", train_step), ("sampling step", forward)):
            name = f"UNet, {px} px ({px // 8}x{px // 8}x4 latent): {what}"
            if timed:
                reset_peak_memory(device)
                rows.append(row({"preset": "sd-1.5"}, name, 1, measure(fn, device, 1 if quick else 3), device))
            else:
                with FlopCounterMode(display=False) as counter:
                    fn()
                rows.append({"preset": "sd-1.5 (meta: FLOPs only)", "benchmark": name, "batch": 1,
                             "GFLOP": counter.get_total_flops() / 1e9})
    return rows


def saved_activation_bytes(fn, params):
    """Bytes of the tensors autograd saves for backward while fn() runs, each storage counted once and the
    parameters' own storages left out (they are weights, not activations). Run on the meta device."""
    weights = {p.untyped_storage()._cdata for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            seen[storage._cdata] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bench_sd_memory(device, quick, batch=8, px=256, lora_rank=4):
    """Issue #13's memory targets for AnomalyXFusion on SD-1.5 (train.py --sd --train_unet none|lora|full), batch 8
    at 256 px, estimated on the meta device (no GPU, no weights): fp32 weights of the UNet and the text encoder
    (the VAE stays off the GPU: latents are cached), fp32 gradients and AdamW's two fp32 moments of what trains
    (none: the X-embedding only, which is small and left out; lora: rank-4 adapters; full: the UNet), and the
    activations autograd saves in one step: the UNet, plus the frozen text encoder through which the spliced
    e_t gets its gradient. Activations are counted in fp32 on the meta device, then halved for bf16 autocast;
    the meta device takes the math attention path, so attention maps that fused SDPA kernels do not keep are
    included: an upper bound. With gradient checkpointing each UNet block keeps only its input, and backward
    recomputes one block at a time: block inputs + the largest block's activations + what lies outside blocks."""
    import clip
    from unet import add_lora
    rows = []
    for mode in ("none", "lora", "full"):
        with torch.device("meta"):
            unet = UNet(4, 4, channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                        num_heads=8, context_dim=768).requires_grad_(mode == "full").train()
            text = clip.CLIP(None, None, 0, None, None, 77, 49408, 768, 12, 12).requires_grad_(False)
            trainable = add_lora(unet, lora_rank) if mode == "lora" else [p for p in unet.parameters() if p.requires_grad]
            x, t = torch.randn(batch, 4, px // 8, px // 8), torch.full((batch,), 500)
            tokens = torch.full((batch, 77), 49407)
            tokens[:, :8] = torch.tensor([49406, 320, 1125, 539, 320, 265, 265, 265])  # "a photo of a * * *"
            e_t = torch.randn(batch, 3, 768, requires_grad=True)  # the X-embedding after DDF, spliced at the *s
        params = list(unet.parameters()) + list(text.parameters())
        total = saved_activation_bytes(lambda: unet(x, t, text.encode_text_tokens(tokens, replace=(265, e_t))), params)
        # block by block, as checkpointing runs them: what each block saves, and the input it would keep instead
        per_block, inputs = [], []
        with torch.device("meta"):
            context = text.encode_text_tokens(tokens, replace=(265, e_t))
            temb = unet.time_embed(torch.randn(batch, 320))
            h = unet.conv_in(x)
            skips = [h]
            for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
                hin = h if block in (*unet.input_blocks, unet.middle_block) else torch.cat([h, skips.pop()], dim=1)
                per_block.append(saved_activation_bytes(lambda: block(hin, temb, context), params))
                inputs.append(hin.numel() * 4)
                h = block(hin, temb, context)
                if block in unet.input_blocks:
                    skips.append(h)
        outside = total - sum(per_block)
        checkpointed = sum(inputs) + max(per_block) + outside
        weights = sum(p.numel() for p in params) * 4
        n_train = sum(p.numel() for p in trainable)
        for switch, activations in (("off", total), ("on", checkpointed)):
            act = activations / 2  # bf16
            gib = [weights / 2 ** 30, 4 * n_train / 2 ** 30, 8 * n_train / 2 ** 30, act / 2 ** 30]
            name = (f"AXF on SD-1.5, --train_unet {mode}{f' (rank {lora_rank})' if mode == 'lora' else ''}, "
                    f"{px} px, gradient checkpointing {switch}: weights {gib[0]:.2f} + grads {gib[1]:.2f} + AdamW "
                    f"{gib[2]:.2f} + activations {gib[3]:.2f} GiB (estimate)")
            rows.append({"preset": "sd-1.5 (meta: memory estimate)", "benchmark": name, "batch": batch,
                         "peak memory (MB)": sum(gib) * 1024})
    return rows


BENCHES = [bench_unet, bench_vae, bench_axf]
SHARED_BENCHES = [bench_clip, bench_metrics, bench_sd, bench_sd_memory]  # preset-independent: run once


# ----------------------------------------------------------------------------------------------

def markdown_table(rows):
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
        return str(value)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="all", choices=["all", *axf.PRESETS])
    parser.add_argument("--quick", action="store_true", help="one timed run each and a smaller peak matmul")
    parser.add_argument("--generation_metrics", type=int, default=0, metavar="N",
                        help="also time IS, KID, FID and IC-LPIPS on N generated 256 px images of one defect type "
                             "(metrics.bench_rows; random Inception and VGG weights): 100 take about 14 min on this "
                             "2-core CPU, so 0 (the default) skips them")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    presets = list(axf.PRESETS) if args.preset == "all" else [args.preset]
    peak = matmul_peak_gflops(device, args.quick)
    rows = []
    for preset in presets:
        cfg = axf.resolve_config(preset)
        for bench in BENCHES:
            rows += bench(cfg, device, args.quick)
    for bench in SHARED_BENCHES:
        rows += bench(device, args.quick)
    if args.generation_metrics:
        rows += metrics.bench_rows(device, n=args.generation_metrics)
    for r in rows:
        if "GFLOP/s" in r:
            r["% of peak"] = 100 * r["GFLOP/s"] / peak
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    dtype = "bf16 autocast" if cli.uses_bf16(device) else "fp32"
    print(f"{name}, torch {torch.__version__}, {dtype}; matmul peak {peak:.0f} GFLOP/s "
          f"({'CUDA max allocated' if device.type == 'cuda' else 'process max RSS so far'} as peak memory)\n")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
