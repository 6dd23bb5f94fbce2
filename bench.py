"""Speed and memory figures for the toy and MVTec presets and SD-1.5's UNet, printed as one markdown table.

    python bench.py [--device cpu|cuda] [--preset toy|mvtec|all] [--quick] [--only NAMES]
    python bench.py --device cuda --only sd_train     # AnomalyXFusion's training step on SD-1.5, per --train_unet

Each `bench_<thing>(config, device, quick)` function returns rows (dicts with the columns below); add a new figure
by writing such a function and listing it in BENCHES. Times are the median of a few runs after one warm-up run (one
run for the MVTec preset on CPU). FLOPs are counted by torch.utils.flop_counter (matmuls, convolutions and
attention; elementwise ops are free), and compared with this machine's dense matmul peaks in bf16 and fp32,
measured in the same run on a large square matmul, so "% of bf16 peak" and "% of fp32 peak" say how well the
model uses the hardware (a GPU's yardstick is bf16's). "images/s" counts the images a timed run handled.
The models run as train.py runs them: built by axf.py's builders, under cli.autocast (bf16 on CUDA and on CPUs
that multiply bf16 natively, elsewhere fp32), trained by training.py's fused AdamW; the AnomalyXFusion step is
train.py's stage-3 step (axf_training_step), written here again because a script is never imported.
Depends on config.py (the presets), axf.py (the whole model), training.py (AdamW, warm-up, EMA), cli.py, unet.py,
vae.py, clip.py, sd.py and metrics.py. Measured figures, with their commands: docs/speed.md.
"""
import argparse
import gc
import itertools
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import axf
import cli
import clip
from config import resolve
import metrics
import sd_backbone
import training
from sd import SD_SCALE_FACTOR
from unet import UNet
from vae import VAE, vae_loss

GRAD_CLIP = 1.0  # train.py's
ANOMALY_FRACTION = 0.75  # of a stage-3 batch, as train.py draws it
COLUMNS = ["preset", "benchmark", "batch", "ms", "images/s", "GFLOP", "TFLOP/s", "% of bf16 peak", "% of fp32 peak",
           "peak memory (MB)"]


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


def matmul_peaks(device, quick):
    """This machine's dense matmul throughput in TFLOP/s, {"bf16": ..., "fp32": ...}: the yardsticks of the
    "% of peak" columns, measured on a large square matmul (fp32 on CUDA may use TF32 if torch allows it)."""
    n = (1024 if quick else 2048) if device.type == "cpu" else 8192
    peaks = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        seconds, flops = measure(lambda: a @ b, device, 5)
        peaks[name] = flops / seconds / 1e12
    return peaks


def row(config, name, batch, seconds_and_flops, device, note="", images=None):
    """One table row; `images`: how many images the timed run handled (default: the batch)."""
    seconds, flops = seconds_and_flops
    return {"preset": config["preset"] + note, "benchmark": name, "batch": batch, "ms": seconds * 1e3,
            "images/s": (batch if images is None else images) / seconds, "GFLOP": flops / 1e9,
            "TFLOP/s": flops / seconds / 1e12, "peak memory (MB)": peak_memory_mb(device)}


def batch_and_repeats(config, device, quick):
    """The preset's batch and 3 timed runs; on CPU the MVTec preset runs one sample once, so that the whole
    bench stays a matter of minutes."""
    if device.type == "cpu" and config["preset"] == "mvtec":
        return 1, 1, " (CPU: batch 1)"
    return config["batch_size"], 1 if quick else 3, ""


# ----------------------------------------------------------------------------------------------
# AnomalyXFusion's training step, as train.py's stage-3 loop takes it


def fake_batch(config, device, num_anomalies=None):
    """A stage-3 batch as train.py draws it from cached latents: latents [B, 4, s, s] (random), masks [B, 1, S, S]
    (boxes of 1/8 to 1/4 of the side, empty for the normal images), captions ("" for the normal images), texture
    rows and is_anomaly; ANOMALY_FRACTION anomalies of defect types 1 and 2, unless num_anomalies."""
    B, S, f, C = config["batch_size"], config["image_size"], axf.latent_factor(config), axf.LATENT_CHANNELS
    num_anomalies = round(B * ANOMALY_FRACTION) if num_anomalies is None else num_anomalies
    masks = torch.zeros(B, 1, S, S)
    for i in range(num_anomalies):  # in different places
        a, b = (i * S) // (2 * num_anomalies) + S // 8, S // 8 + (i % 3) * S // 16
        masks[i, :, a:a + b, a:a + b] = 1
    colours = ["red", "green", "blue", "white", "black", "yellow"]
    captions = [f"The {colours[i % 6]} cable has a crack across its insulation near the centre"
                for i in range(num_anomalies)] + [""] * (B - num_anomalies)
    defect_ids = torch.cat([torch.arange(num_anomalies) % 2 + 1, torch.zeros(B - num_anomalies, dtype=torch.long)])
    is_anomaly = torch.arange(B) < num_anomalies
    latents = torch.randn(B, C, S // f, S // f)
    return tuple(x.to(device) if torch.is_tensor(x) else x for x in (latents, masks, captions, defect_ids, is_anomaly))


def axf_training_step(model, optimizer, ema, batch, config, step, device):
    """One training step of stage 3 on one process, as train.py's loop takes it (a copy: scripts are not imported):
    warm-up, the loss of Eq. (17) under autocast, AdamW on the clipped gradients, the EMA."""
    training.warm_up(optimizer, step, config["warmup_steps"])
    with cli.autocast(device, config["bf16"]):
        loss = model.loss(*batch)  # latents, masks, captions, texture rows, is_anomaly: Eq. (17)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], GRAD_CLIP)
    optimizer.step()
    ema.update(model, step)
    return loss


def training_step_of(model, config, device):
    """A function that takes the next training step of `model`: train.py's optimiser (training.adamw over
    model.parameter_groups) and EMA, on one fake_batch whose captions' CLIP features are cached, as train.py
    caches them before its loop."""
    optimizer = training.adamw(axf.parameter_groups(model), lr=config["lr"], weight_decay=0.0)
    ema, batch, steps = training.EMA(model, config["ema_decay"]), fake_batch(config, device), itertools.count()
    if model.mif.use_text:
        model.mif.encode_captions(batch[2])
    return lambda: axf_training_step(model, optimizer, ema, batch, config, next(steps), device)


# ----------------------------------------------------------------------------------------------
# the benchmarks: each returns a list of rows

def bench_unet(config, device, quick):
    """The latent UNet: one training step (forward, backward, AdamW) and one inference forward."""
    B, repeats, note = batch_and_repeats(config, device, quick)
    size, C = config["image_size"] // axf.latent_factor(config), axf.LATENT_CHANNELS
    model = axf.build_unet(config).to(device)
    optimizer = training.adamw(model.parameters(), lr=config["lr"], weight_decay=0.0)
    # the latent (and with unet_mask_input its mask), as AnomalyXFusion.unet_input feeds it
    x = torch.randn(B, model.conv_in.in_channels, size, size, device=device)
    t = torch.randint(0, 1000, (B,), device=device)
    context = torch.randn(B, 3 * config["num_tokens"], config["context_dim"], device=device)  # [B, 3k, d]: e_X
    noise = torch.randn(B, C, size, size, device=device)

    def train_step():
        with cli.autocast(device, config["bf16"]):
            loss = (model(x, t, context).float() - noise).square().mean()  # Eq. (17)'s ε-loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward():
        with cli.autocast(device, config["bf16"]):
            model(x, t, context)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = f"UNet {params:.1f}M params, {size}x{size}x{C} latent"
    rows = []
    reset_peak_memory(device)
    rows.append(row(config, f"{name}: training step", B, measure(train_step, device, repeats), device, note))
    model.zero_grad(set_to_none=True)
    model.eval()
    reset_peak_memory(device)
    rows.append(row(config, f"{name}: forward (sampling step)", B, measure(forward, device, repeats), device, note))
    return rows


def stage_steps(config, device, repeats, note):
    """Stages 1 and 2's steps as train.py takes them (copied): the VAE's weighted L1 + KL, the mask AE's BCE."""
    B, S, s = config["vae_batch_size"], config["image_size"], config["image_size"] // axf.latent_factor(config)
    vae, autoencoder = axf.build_vae(config).to(device), axf.build_mask_autoencoder(config).to(device)
    images, masks = torch.rand(B, 3, S, S, device=device) * 2 - 1, (torch.rand(B, 1, S, S, device=device) < .1).float()
    weights = 1 + config["vae_defect_weight"] * masks  # defect pixels weighted up
    dtype = torch.bfloat16 if cli.uses_bf16(device, config["bf16"]) else torch.float32  # the posterior's ε
    noise = torch.randn(B, axf.LATENT_CHANNELS, s, s, device=device, dtype=dtype)
    losses = {"stage 1: VAE training step": (vae, config["vae_lr"], lambda: vae_loss(
                  vae, images, 1e-6, weights, noise, weights.expand_as(images).sum())[0]),
              "stage 2: mask autoencoder training step": (autoencoder, 1e-3, lambda: autoencoder(masks)[0])}
    rows = []
    for name, (network, lr, loss_fn) in losses.items():
        optimizer = training.adamw(network.parameters(), lr=lr)
        def step():
            with cli.autocast(device, config["bf16"] and network is vae):  # train.py runs stage 2 in fp32
                loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        reset_peak_memory(device)
        rows.append(row(config, name, B, measure(step, device, repeats), device, note))
    return rows


def bench_vae(config, device, quick):
    """The KL autoencoder: encoding images to latents, decoding latents; stages 1 and 2's steps (stage_steps)."""
    B, repeats, note = batch_and_repeats(config, device, quick)
    vae = axf.build_vae(config).to(device).eval()
    x = torch.rand(B, 3, config["image_size"], config["image_size"], device=device) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mode()

    @torch.no_grad()
    def encode():
        with cli.autocast(device, config["bf16"]):
            vae.encode_latents(x)

    @torch.no_grad()
    def decode():
        with cli.autocast(device, config["bf16"]):
            vae.decode_latents(z)

    params = sum(p.numel() for p in vae.parameters()) / 1e6
    name = f"VAE {params:.1f}M params, {config['image_size']} px"
    rows = []
    for what, fn in (("encode", encode), ("decode", decode)):
        reset_peak_memory(device)
        rows.append(row(config, f"{name}: {what}", B, measure(fn, device, repeats), device, note))
    return rows + stage_steps(config, device, repeats, note)


def bench_axf(config, device, quick):
    """The whole method: one AnomalyXFusion training step as train.py takes it (MIF, DDF, UNet, Eq. (17), clipping,
    AdamW, EMA: axf_training_step) and sampling per image (DDIM, classifier-free guidance, blended as Eq. (16), then
    decoded). On CPU the MVTec preset times 2 of its sampler steps and scales them to the full count (said in the
    row)."""
    B, repeats, note = batch_and_repeats(config, device, quick)
    config = dict(config, batch_size=B)
    model = axf.AnomalyXFusion(config, axf.build_clip(config, device), {"bench": ["crack", "hole"]}).to(device)
    train_step = training_step_of(model, config, device)
    _, masks, captions, ids, _ = fake_batch(config, device, num_anomalies=B)
    images = torch.rand(B, 3, config["image_size"], config["image_size"], device=device)
    steps = 2 if note else config["sample_steps"]

    def sample():
        # inference mode: FlopCounterMode trips on no_grad views
        with torch.inference_mode(), cli.autocast(device, config["bf16"]):
            model.sample(images, masks, captions, ids, steps=steps, guidance_scale=config["guidance_scale"])

    rows = [row(config, "AnomalyXFusion training step", B, measure(train_step, device, repeats), device, note)]
    seconds, flops = measure(sample, device, 1)
    scale = config["sample_steps"] / steps
    rows.append(row(config, f"sampling, {config['sample_steps']} DDIM steps + guidance, per image"
                    + (f" ({steps} steps timed, x{scale:g}: an upper bound, VAE included)" if scale != 1 else ""), 1,
                    (seconds * scale / B, flops * scale / B), device, note))
    return rows


def bench_clip(device, quick):
    """CLIP ViT-B/32 size (random weights): encode_image on 32 images of 224 px, encode_text on 32 captions."""
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
    """metrics.auroc / average_precision / f1_max on 5M pixel scores (a category's pooled test pixels)."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.random(n) < 0.05
    scores = np.round(rng.random(n) * 0.7 + 0.3 * labels, 3).astype(np.float32)  # 3 decimals: many ties
    rows = []
    for name in ("auroc", "average_precision", "f1_max"):
        fn = getattr(metrics, name)
        t0 = time.perf_counter()
        fn(scores, labels)
        rows.append({"preset": "any", "benchmark": f"metrics.{name}, 5M pixels", "batch": n,
                     "ms": (time.perf_counter() - t0) * 1e3, "peak memory (MB)": peak_memory_mb(device)})
    return rows


# SD-1.5's sizes, as load_sd reads them off v1-5-pruned-emaonly (README, "At full size"), with the CLIP that
# --clip ViT-L-14.pt loads for Eq. (1) and (3); and a tiny stand-in of the same layout, for a CPU
SD15_SIZES = dict(
    label="sd-1.5 (random weights)", image_size=256, batch=8,
    unet=dict(in_channels=4, out_channels=4, channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
              attention_levels=(0, 1, 2), num_heads=8, context_dim=768),
    vae=dict(in_channels=3, channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4),
    text=dict(embed_dim=None, image_resolution=None, vision_layers=0, vision_width=None, vision_patch_size=None,
              context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12, transformer_layers=12),
    clip=dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
              context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12, transformer_layers=12),
)
TINY_SIZES = dict(
    label="tiny stand-in (CPU check, not a figure)", image_size=64, batch=2,
    unet=dict(in_channels=4, out_channels=4, channels=32, channel_mult=(1, 2), num_res_blocks=1,
              attention_levels=(0, 1), num_heads=4, context_dim=64),
    vae=dict(in_channels=3, channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, latent_channels=4),
    text=dict(SD15_SIZES["text"], transformer_width=64, transformer_heads=2, transformer_layers=2),
    clip=dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
              context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=2, transformer_layers=2),
)


def bench_sd(device, quick):
    """Stable Diffusion 1.5's UNet as sd.load_sd builds it from v1-5-pruned-emaonly (tests/test_sd.py checks
    that layout), per image at 256 and 512 px: a training step (forward, backward) and a sampling step (one
    forward; classifier-free guidance doubles it). FLOPs are counted on the meta device (no memory, no
    weights); times and peak memory are measured on CUDA only (a full training step, AdamW included)."""
    timed = device.type == "cuda"
    with torch.device(device if timed else "meta"):
        model = UNet(**SD15_SIZES["unet"])
    optimizer = training.adamw(model.parameters(), lr=1e-5) if timed else None
    params = sum(p.numel() for p in model.parameters())
    rows = [{"preset": "sd-1.5", "benchmark": f"UNet {params:,} params (load_sd of v1-5-pruned-emaonly)"}]
    for px in (256, 512):
        x = torch.randn(1, 4, px // 8, px // 8, device=model.conv_in.weight.device)
        t, context = torch.full((1,), 500, device=x.device), torch.randn(1, 77, 768, device=x.device)

        def train_step():
            with cli.autocast(device):
                loss = model(x, t, context).float().square().mean()
            loss.backward()
            if timed:
                optimizer.step()
            model.zero_grad(set_to_none=True)

        def forward():
            with torch.inference_mode(), cli.autocast(device):
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


def random_weights(module, device):
    """A module built on the meta device, allocated on `device` with cheap random weights: matrices N(0, 0.02), norm
    scales 1, biases 0. Default init of SD-1.5's 1.5B parameters takes minutes; a timing needs no particular values."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
            elif name.endswith("weight"):
                p.fill_(1)
            else:
                p.zero_()
    return module


def sd_train_model(sizes, clip_model, mode, context, checkpointing, device):
    """(config, model) as train.py --sd builds them (load_backbone's sizes in the config, the sd preset), with
    random SD-1.x networks in place of a file: its frozen VAE and text encoder, its UNet adapted per --train_unet."""
    config = resolve("sd", {"sd": "(random SD-1.5 weights)", "train_unet": mode, "sd_context": context,
                                     "gradient_checkpointing": checkpointing, "image_size": sizes["image_size"],
                                     "batch_size": sizes["batch"], "context_dim": sizes["clip"]["embed_dim"]})
    with torch.device("meta"):
        vae, unet, text = VAE(**sizes["vae"]), UNet(**sizes["unet"]), clip.CLIP(**sizes["text"])
    vae, unet, text = (random_weights(m, device).eval() for m in (vae, unet, text))  # eval: as load_sd returns them
    vae.scale_factor.fill_(SD_SCALE_FACTOR)
    vae.sd_sizes, unet.sd_sizes = sizes["vae"], sizes["unet"]
    backbone = dict(vae=vae, unet=sd_backbone.adapt_sd_unet(unet, mode, config["lora_rank"]),
                    sd_adapter=sd_backbone.TextEncoderContext(text, config).to(device))
    config.update(sd_backbone.file_sizes(backbone))  # as train.py sets them from the file
    model = axf.AnomalyXFusion(config, clip_model, {"bench": ["crack", "hole"]}, **backbone).to(device)
    model.mif.clip.cpu()  # as train.py leaves it once its features are cached
    return config, model


def time_training_step(model, config, label, device, repeats, say):
    """One row: axf_training_step (train.py's step, optimiser and EMA), 2 warm-up steps, `repeats` timed; the peak
    memory counts from before the first step (AdamW allocates its moments there)."""
    groups = axf.parameter_groups(model)
    step = training_step_of(model, config, device)
    n_unet, n_cond = (sum(p.numel() for p in g["params"]) for g in groups)
    mode = config["train_unet"] + (f" (rank {config['lora_rank']})" if config["train_unet"] == "lora" else "")
    name = (f"AXF training step (as train.py's), --train_unet {mode}, sd_context {config['sd_context']}, gradient "
            f"checkpointing {'on' if config['gradient_checkpointing'] else 'off'}: {n_unet:,} UNet + {n_cond:,} "
            f"conditioning params train")
    say(f"{name}: 2 warm-up + {repeats} timed steps")
    reset_peak_memory(device)
    step()  # warm-up 1 (allocations, AdamW's state); measure's FLOP-counted run is warm-up 2
    return row({"preset": label}, name, config["batch_size"], measure(step, device, repeats), device)


def sd_train_rows(rows, sizes, clip_model, mode, context, checkpointing, device, repeats, say, extras):
    """Append to `rows` (as each is measured: an out-of-memory keeps those before it) the rows of one --train_unet
    mode: its training step; with extras (mode none), then the text encoder's and the UNet's forward + backward
    alone, and sampling, with the model alone (the optimiser and EMA freed, as sample.py holds it)."""
    torch.manual_seed(0)
    config, model = sd_train_model(sizes, clip_model, mode, context, checkpointing, device)
    B, S, label = config["batch_size"], config["image_size"], sizes["label"]
    rows.append(time_training_step(model, config, label, device, repeats, say))
    say(markdown_row(rows[-1]))
    if not extras:
        return
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # what the splice adds to every step: the frozen text encoder's forward + backward to e_t, next to the UNet's
    _, masks, captions, ids, _ = fake_batch(config, device, num_anomalies=B)
    adapter = model.sd_adapter
    tokens = adapter.prompt_tokens(captions, model.mif.num_context).to(device)  # [B, 77]
    width = adapter.text_encoder.token_embedding.weight.shape[1]
    e_t = torch.randn(B, model.mif.num_context, width, device=device, requires_grad=True)
    f, C = axf.latent_factor(config), axf.LATENT_CHANNELS
    x = torch.randn(B, model.unet.conv_in.in_channels, S // f, S // f, device=device)  # [x_t, mask]
    t = torch.randint(0, 1000, (B,), device=device)
    hidden = torch.randn(B, 77, width, device=device, requires_grad=True)  # the context, as the splice makes it

    def text_step():
        with cli.autocast(device, config["bf16"]):
            out = adapter.text_encoder.encode_text_tokens(tokens, replace=(clip.PLACEHOLDER_ID, e_t * adapter.token_scale))
        out.float().square().mean().backward()
        e_t.grad = None

    def unet_step():
        with cli.autocast(device, config["bf16"]):
            out = model.unet(x, t, hidden)
        out.float().square().mean().backward()
        hidden.grad = None
        model.unet.zero_grad(set_to_none=True)

    results = {}
    for what, fn in (("UNet", unet_step), ("text encoder", text_step)):
        say(f"{what} forward + backward alone")
        fn()
        reset_peak_memory(device)
        results[what] = measure(fn, device, repeats)
    share = 100 * results["text encoder"][0] / results["UNet"][0]
    switch = "on" if checkpointing else "off"
    for what, detail in (("UNet", f"(frozen but conv_in, which reads the mask; checkpointing {switch}), "
                                  f"{S // f}x{S // f}x{C} latent"),
                         ("text encoder", f"(frozen), e_t spliced, 77 tokens: {share:.1f}% of the UNet's")):
        rows.append(row({"preset": label}, f"{what} forward + backward alone {detail}", B, results[what], device))
        say(markdown_row(rows[-1]))

    # sampling, as sample.py runs it: model.sample under bf16 autocast, VAE encode and decode included
    images = torch.rand(B, 3, S, S, device=device)
    model.eval()

    def sample():
        # inference mode: FlopCounterMode trips on no_grad views
        with torch.inference_mode(), cli.autocast(device, config["bf16"]):
            model.sample(images, masks, captions, ids, steps=config["sample_steps"],
                         guidance_scale=config["guidance_scale"])

    say(f"sampling, {config['sample_steps']} DDIM steps, batch {B}: one FLOP-counted run (the warm-up), one timed")
    reset_peak_memory(device)
    seconds, flops = measure(sample, device, 1)
    rows.append(row({"preset": label}, f"sampling (model.sample), {config['sample_steps']} DDIM steps + guidance "
                    f"{config['guidance_scale']:g}, sd_context {context}, VAE included: per image", B,
                    (seconds / B, flops / B), device, images=1))
    say(markdown_row(rows[-1]))


def bench_sd_train(device, quick, sizes=None):
    """AnomalyXFusion's real training step on an SD-1.5-sized backbone (random weights, no file), per --train_unet mode
    (none; lora at CONFIG's rank 32; full; and full without checkpointing, for comparison) with the sd preset's
    settings: batch 8 at 256 px (32x32x4 latents), bf16 autocast, gradient checkpointing, e_t spliced into the text
    encoder (and appended, mode none). Each step is train.py's (axf_training_step): a batch of cached latents, the loss
    (CLIP features cached, MIF, DDF, text encoder, UNet, Eq. (17)), clipping, AdamW (model.parameter_groups,
    training.adamw) and the EMA. Peak memory is CUDA's max allocated since the mode's model was built: every weight (UNet, VAE, text encoder,
    and the ViT-L/14 CLIP of Eq. (1) and (3), as --clip ViT-L-14.pt holds it), AdamW's moments, the EMA, activations. Then,
    on mode none's model: the spliced text encoder's forward + backward to e_t next to the UNet's (what the splice
    adds to every step), and sampling per image (model.sample, 50 DDIM steps with guidance, VAE decode included).
    Each mode's model is freed before the next is built. On a CPU the same code runs at TINY_SIZES: a check that it
    runs, not a figure (SD-1.5 sizes need CUDA). Progress and each row go to stderr as they come.
    Run alone: python bench.py --device cuda --only sd_train (its time: docs/speed.md)."""
    sizes = sizes or (SD15_SIZES if device.type == "cuda" else TINY_SIZES)
    started = time.perf_counter()

    def say(text):
        print(f"sd_train {time.perf_counter() - started:6.1f} s: {text}", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    with torch.device("meta"):
        clip_model = clip.CLIP(**sizes["clip"])
    clip_model = random_weights(clip_model, "cpu").eval()  # frozen, shared by every mode's model; kept on the CPU
    repeats = 2 if quick else 5
    rows = []
    for mode, context, checkpointing in (("none", "splice", True), ("none", "splice", False), ("lora", "splice", True),
                                         ("lora", "splice", False), ("full", "splice", True), ("full", "splice", False),
                                         ("none", "append", True)):
        say(f"--train_unet {mode}, sd_context {context}, gradient checkpointing {checkpointing}: building")
        try:
            sd_train_rows(rows, sizes, clip_model, mode, context, checkpointing, device, repeats, say,
                          extras=(mode, context) == ("none", "splice"))
        except torch.cuda.OutOfMemoryError:  # a smaller GPU: say so and go on with the next mode
            rows.append({"preset": sizes["label"], "benchmark": f"--train_unet {mode}, sd_context {context}, "
                         f"gradient checkpointing {checkpointing}: CUDA out of memory", "batch": sizes["batch"]})
            say(markdown_row(rows[-1]))
        gc.collect()  # the mode's model, optimiser and EMA, before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    say("done")
    return rows


BENCHES = [bench_unet, bench_vae, bench_axf]
SHARED_BENCHES = [bench_clip, bench_metrics, bench_sd, bench_sd_train]  # preset-independent: run once


# ----------------------------------------------------------------------------------------------

def markdown_row(r):
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
        return str(value)
    return "| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |"


def markdown_table(rows):
    return "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + [markdown_row(r) for r in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # the sd preset has no network sizes of its own (they come from the SD file): bench_sd_train stands for it
    parser.add_argument("--preset", default="all", choices=["all", "toy", "mvtec"])
    parser.add_argument("--quick", action="store_true", help="one timed run each and a smaller peak matmul")
    parser.add_argument("--generation_metrics", type=int, default=0, metavar="N",
                        help="also time IS, KID, FID and IC-LPIPS on N generated 256 px images of one defect type "
                             "(metrics.bench_rows; random Inception and VGG weights); on a CPU that takes long "
                             "(docs/speed.md), so 0 (the default) skips them")
    names = [b.__name__.removeprefix("bench_") for b in BENCHES + SHARED_BENCHES]
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated benchmarks to run, of {', '.join(names)} "
                        "(bench_<name>; the first three per preset); default all")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(names)
    if only - set(names):
        parser.error(f"--only: unknown {', '.join(sorted(only - set(names)))}; choose from {', '.join(names)}")
    selected = lambda benches: [b for b in benches if b.__name__.removeprefix("bench_") in only]
    device = torch.device(args.device)
    torch.manual_seed(0)
    presets = ["toy", "mvtec"] if args.preset == "all" else [args.preset]
    peaks = matmul_peaks(device, args.quick)
    rows = []
    for preset in presets if selected(BENCHES) else []:
        config = resolve(preset)
        for bench in selected(BENCHES):
            rows += bench(config, device, args.quick)
    for bench in selected(SHARED_BENCHES):
        rows += bench(device, args.quick)
    if args.generation_metrics:
        rows += metrics.bench_rows(device, n=args.generation_metrics)
    for r in rows:
        if "TFLOP/s" in r:
            r.update({f"% of {dtype} peak": 100 * r["TFLOP/s"] / peak for dtype, peak in peaks.items()})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    dtype = "bf16 autocast" if cli.uses_bf16(device) else "fp32"
    print(f"{name}, torch {torch.__version__}, {dtype}; matmul peaks {peaks['bf16']:.3g} TFLOP/s bf16, "
          f"{peaks['fp32']:.3g} TFLOP/s fp32 "
          f"({'CUDA max allocated' if device.type == 'cuda' else 'process max RSS so far'} as peak memory)\n")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
