"""A miniature Stable Diffusion, pretrained here on the toy world: the students' picture of how SD was made.

Stable Diffusion 1.x is a text-to-image latent diffusion model (Rombach et al. 2022): a KL autoencoder
(kl-f8) trained first, then a UNet trained to predict the noise ε in the autoencoder's latents, conditioned
by cross-attention on the 77 per-token hidden states of a CLIP text tower, on billions of captioned images.
AnomalyXFusion's authors start from such a frozen model. This script makes a small one the same way, on
what this project has instead of LAION: many seeds of one toy category, normal and anomalous images with
their captions ("a photo of a normal bottle", "A large red contamination lies inside the bottle"):

    python toy_sd.py --out runs/toy_sd.safetensors        # then: python sd.py --sd runs/toy_sd.safetensors

  1. data     toy.make_toy for seeds 1..--seeds (seed 0 is the toy set train.py uses: never seen here),
              read at --size px; cached in data/toy_sd/
  2. VAE      vae.py at the toy preset's size, L1 + KL as LDM (vae.vae_loss), on the images of every toy
              category (no captions) and half its batches made generic (random disks on random backgrounds):
              a generic codec, as SD's VAE trained on OpenImages; then rescaled so that its
              latents have SD's std 1 / 0.18215: load_sd sets scale_factor = 0.18215 for every SD file
  3. LDM      unet.py in SD-1.x's layout at toy widths (8 heads, as load_sd assumes) and a small CLIP text
              tower (clip.py, text only), ε-prediction on the scaled latents with SD's scaled_linear
              schedule (axf.DDPM), 10% of captions dropped to "" (classifier-free guidance), EMA weights
  4. file     the EMA weights written by sd.save_sd as an SD-1.x single file (original key layout)

The text tower is trained together with the UNet, as LDM trained its BERT text encoder: SD's is a frozen
CLIP that was pretrained contrastively on 400M pairs, and a random tiny tower has learned nothing to freeze.
The UNet and the text tower see one category only, so that train.py --sd can learn AnomalyXFusion on a
category they have never seen (cable, with --category bottle). Resumable: re-running the same command continues from
<out>.train.pt (written atomically). Writes <out>.png: samples for a few captions, two per caption.
Depends on axf.py (DDPM, save_sd, load_sd), clip.py, unet.py, vae.py and data.py (the toy world).
"""
import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import axf
import sd
import clip
import data
import toy
from unet import UNet
from vae import VAE, vae_loss

ROOT = Path(__file__).parent / "data" / "toy_sd"
TOY_RENDER_SIZE = 128  # toy.ensure_toy's default: train.py reads these 128 px images at its image_size
SD_PAD = 49407  # SD-1.x pads prompts with the end token (clip.tokenize's pad_id)
VAE_SIZES = dict(in_channels=3, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4)  # toy preset's


def normal_caption(category):
    return f"a photo of a normal {category}"


def preview_captions(category):
    """What the preview draws: a normal object and one caption per defect kind and contaminant colour."""
    if category == "bottle":
        return [normal_caption("bottle")] + [f"A large {c} contamination lies inside the bottle" for c in toy.CONTAMINANTS] + [
            "A large piece of the bottle rim is broken off at the top"]
    return [normal_caption("cable"), "The green cable is replaced by a repeated blue cable",
            "One gray cable is missing, replaced by a black hole"]


def build_models(args):
    """VAE, UNet and text tower with SD-1.x's key structure at toy widths (load_sd reads every size back)."""
    vae = VAE(**VAE_SIZES)
    text = clip.CLIP(None, None, 0, None, None, 77, 49408, args.text_width, args.text_width // 64, args.text_layers)
    unet = UNet(4, 4, args.unet_channels, (1, 2, 2), 1, (0, 1), sd.SD_HEADS, args.text_width)
    return vae, unet, text


# ----------------------------------------------------------------------------------------------
# 1. data: many seeds of the toy world, every image with a caption


def load_world(category, seeds, size):
    """-> images uint8 [N, 3, size, size], captions [N], anomalous bool [N]; cached in data/toy_sd/."""
    cache = ROOT / f"{category}_{size}px_seeds1-{seeds}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    images, captions, anomalous = [], [], []
    for seed in tqdm(range(1, seeds + 1), desc="1/4 toy world"):
        folder = toy.ensure_toy(category, ROOT / f"seed{seed}", TOY_RENDER_SIZE, seed)
        cat = data.load_category(folder)
        items = [(p, normal_caption(category), False) for p in cat.train_good + cat.test_good]
        items += [(a.image, a.caption, True) for a in cat.anomalies]
        for path, caption, bad in items:
            images.append((data.read_image(path, size) * 255).round().to(torch.uint8))
            captions.append(caption)
            anomalous.append(bad)
    world = dict(images=torch.stack(images), captions=captions, anomalous=torch.tensor(anomalous))
    save_atomic(world, cache)
    return world


def pick(world, batch_size, generator):
    """Indices of a batch: half anomalous images (the rare, interesting half), half normal ones."""
    bad, good = world["anomalous"].nonzero()[:, 0], (~world["anomalous"]).nonzero()[:, 0]
    n_bad = batch_size // 2
    return torch.cat([bad[torch.randint(len(bad), (n_bad,), generator=generator)],
                      good[torch.randint(len(good), (batch_size - n_bad,), generator=generator)]])


def disks(x, generator, n, colours):
    """Paint n disks of random centre, radius and colour (rows of `colours`, in [-1, 1]) on image x [3, S, S]."""
    S = x.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    for _ in range(n):
        cy, cx, r = (torch.rand(3, generator=generator) * torch.tensor([S, S, S / 4]) + torch.tensor([0, 0, S / 32])).tolist()
        x[:, (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = colours[torch.randint(len(colours), (1,), generator=generator)][0][:, None]
    return x


def generic_images(x, generator):
    """The VAE's stand-in for SD's generic training images (OpenImages): a quarter of the batch becomes random
    disks on a random background, another quarter gets one disk painted on. So the autoencoder carries colours,
    backgrounds and shapes the category lacks (without it, the unseen cable decodes with ~7x the L1 error)."""
    palette = torch.cat([torch.tensor(list(toy.TOY_COLOURS.values()), dtype=torch.float32) / 127.5 - 1,
                         torch.rand(8, 3, generator=generator) * 2 - 1])  # the toy colours and any others
    for i in range(len(x)):
        u = torch.rand(1, generator=generator).item()
        if u < 0.25:
            x[i] = palette[torch.randint(len(palette), (1,), generator=generator)][0][:, None, None]
            disks(x[i], generator, int(torch.randint(2, 9, (1,), generator=generator)), palette)
        elif u < 0.5:
            disks(x[i], generator, 1, palette)
    return x


def save_atomic(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)  # a kill never leaves half a file


# ----------------------------------------------------------------------------------------------
# 2. the VAE, and its latents at SD's scale


@torch.no_grad()
def match_sd_scale(vae, images):
    """Rescale the latent space so that latents have std 1 / 0.18215, the value load_sd assumes for every SD
    file. Exact: quant_conv's mean rows are multiplied by s (its log-variance shifted by 2 log s) and
    post_quant_conv divides its input by s, so decode(encode(x)) is unchanged. Returns s."""
    z = torch.cat([vae.encode(x).sample() for x in images.split(64)])
    s = 1.0 / (sd.SD_SCALE_FACTOR * z.std().item())
    C = vae.post_quant_conv.in_channels
    vae.quant_conv.weight[:C] *= s
    vae.quant_conv.bias[:C] *= s
    vae.quant_conv.bias[C:] += 2 * math.log(s)
    vae.post_quant_conv.weight /= s
    vae.scale_factor.fill_(sd.SD_SCALE_FACTOR)
    return s


def to_unit(images_uint8):
    return images_uint8.float() / 127.5 - 1.0  # [-1, 1], as LDM's autoencoders take images


# ----------------------------------------------------------------------------------------------
# 3. the latent diffusion model: sampling for the preview


@torch.no_grad()
def sample(unet, text, vae, ddpm, captions, generator, steps=50, guidance=3.0, latent_size=16):
    """DDIM with classifier-free guidance: ε = ε(∅) + g (ε(caption) - ε(∅)). -> images [B, 3, S, S] in [0, 1]."""
    B = len(captions)
    context = text.encode_text_tokens(clip.tokenize(captions + [""], pad_id=SD_PAD))  # [B + 1, 77, width]
    context = torch.cat([context[:B], context[B:].expand(B, -1, -1)])
    z = torch.randn(B, 4, latent_size, latent_size, generator=generator)
    ts = ddpm.ddim_timesteps(steps).tolist()
    for i, t in enumerate(ts):
        t_now, t_prev = torch.full((B,), t), torch.full((B,), ts[i + 1] if i + 1 < len(ts) else -1)
        eps_text, eps_null = unet(torch.cat([z, z]), torch.cat([t_now, t_now]), context).chunk(2)
        z = ddpm.ddim_step(eps_null + guidance * (eps_text - eps_null), t_now, t_prev, z)
    return ((vae.decode_latents(z) + 1) / 2).clamp(0, 1)


def named_colour(image):
    """The contaminant colour (toy.CONTAMINANTS) most pixels of image [3, S, S] are close to, or None."""
    table = torch.tensor([toy.TOY_COLOURS[c] for c in toy.CONTAMINANTS], dtype=torch.float32)  # [5, 3]
    dist = torch.cdist(image.reshape(3, -1).t() * 255, table)  # [S * S, 5]
    near = dist.min(dim=1)
    counts = torch.bincount(near.indices[near.values < 60], minlength=len(table))
    return toy.CONTAMINANTS[int(counts.argmax())] if counts.max() >= 4 else None


def preview(unet, text, vae, ddpm, category, path, per_caption=2, seed=0):
    """Samples for preview_captions in a grid (caption | samples); returns how many contamination samples
    show the colour their caption names (most pixels near a contaminant colour)."""
    captions = preview_captions(category)
    images = sample(unet, text, vae, ddpm, [c for c in captions for _ in range(per_caption)],
                    torch.Generator().manual_seed(seed)).split(per_caption)
    data.save_grid([[c, *imgs] for c, imgs in zip(captions, images)], path, cell=96)
    checks = [(c.split()[2], img) for c, imgs in zip(captions, images) if "contamination" in c for img in imgs]
    return sum(named_colour(img) == colour for colour, img in checks), len(checks)


# ----------------------------------------------------------------------------------------------
# training: stage 2 (VAE) and stage 3 (UNet + text tower), one resumable loop each


def ema_update(ema, model, decay, step):
    """ema <- d ema + (1 - d) model, with LDM's warm-up d = min(decay, (1 + step) / (10 + step)): without it the
    random initial weights would still weigh 0.999 ** steps (45% after 800 steps) in the written model."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/toy_sd.safetensors", help="the SD-1.x single file to write (.safetensors or .ckpt)")
    parser.add_argument("--category", default="bottle", choices=toy.TOY_CATEGORIES,
                        help="the one toy category pretrained on; the other stays unseen for train.py --sd")
    parser.add_argument("--seeds", type=int, default=8, help="toy worlds 1..N (292 images each; seed 0 is never used)")
    parser.add_argument("--size", type=int, default=64, help="image size in px (the toy preset's); latents are size / 4")
    parser.add_argument("--vae_steps", type=int, default=800, help="stage 2: autoencoder training steps")
    parser.add_argument("--vae_categories", default="bottle,cable",
                        help="what the VAE trains on (images only, no captions); the UNet and text tower see --category only "
                             "(the pill, made later, is seen by none of them)")
    parser.add_argument("--vae_batch_size", type=int, default=8, help="stage 2 batch size")
    parser.add_argument("--steps", type=int, default=2400, help="stage 3: UNet + text tower training steps")
    parser.add_argument("--batch_size", type=int, default=16, help="stage 3 batch size")
    parser.add_argument("--lr", type=float, default=3e-4, help="stage 3 AdamW learning rate (stage 2 uses 1e-3)")
    parser.add_argument("--unet_channels", type=int, default=64, help="UNet base width (levels 1x, 2x, 2x; a multiple of 32)")
    parser.add_argument("--text_width", type=int, default=128, help="text tower width = UNet context width (a multiple of 64)")
    parser.add_argument("--text_layers", type=int, default=2, help="text tower transformer layers")
    parser.add_argument("--caption_dropout", type=float, default=0.1, help="share of captions replaced by '' (for guidance)")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA of the weights written to --out")
    parser.add_argument("--checkpoint_every", type=int, default=250, help="steps between resumable checkpoints")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_path, preview_path = Path(f"{out}.train.pt"), out.with_suffix(".png")
    # what a checkpoint must agree on to be resumed; --steps may grow (a longer run continues a shorter one)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads", "checkpoint_every", "steps")}
    print("toy_sd:", settings)
    torch.manual_seed(0)
    vae, unet, text = build_models(args)
    ddpm = axf.DDPM(1000, "scaled_linear", 0.00085, 0.012)  # SD's schedule
    state = torch.load(ckpt_path, weights_only=True) if ckpt_path.is_file() else None
    if state is not None:
        if state["settings"] != settings:
            raise SystemExit(f"error: {ckpt_path} was trained with {state['settings']}; rerun with those flags or delete it")
        print(f"resuming from {ckpt_path} at {state['stage']} step {state['step']}")
    world = load_world(args.category, args.seeds, args.size)
    print(f"{len(world['captions'])} images, {int(world['anomalous'].sum())} anomalous, {len(set(world['captions']))} captions")
    generator = torch.Generator().manual_seed(1)
    timing = {}

    # stage 2: the autoencoder
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    step = 0
    if state is not None:
        vae.load_state_dict(state["vae"])
    if state is None or state["stage"] == "vae":  # an "ldm" checkpoint holds the finished, rescaled VAE
        if state is not None:
            vae_opt.load_state_dict(state["optimizer"]), generator.set_state(state["rng"])
            step = state["step"]
        # the first stage is a generic image codec (SD's saw OpenImages): it may see every toy category, unlabelled
        vae_images = torch.cat([load_world(c, args.seeds, args.size)["images"] for c in args.vae_categories.split(",")])
        vae.train()
        bar, start, first_step = tqdm(total=args.vae_steps, initial=step, desc="2/4 VAE"), time.time(), step
        while step < args.vae_steps:
            x = generic_images(to_unit(vae_images[torch.randint(len(vae_images), (args.vae_batch_size,), generator=generator)]), generator)
            loss, logs = vae_loss(vae, x)
            vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            vae_opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(l1=f"{logs['rec']:.4f}")
            if step % args.checkpoint_every == 0 or step == args.vae_steps:
                save_atomic(dict(settings=settings, stage="vae", step=step, vae=vae.state_dict(),
                                 optimizer=vae_opt.state_dict(), rng=generator.get_state()), ckpt_path)
        bar.close()
        if step > first_step:
            timing["vae"] = (time.time() - start) / (step - first_step)
            print(f"VAE: L1 {logs['rec']:.4f} at the last step")
        vae.eval()
        with torch.no_grad():
            print(f"VAE: latents rescaled by {match_sd_scale(vae, to_unit(world['images'])):.3f} "
                  f"to SD's std 1 / {sd.SD_SCALE_FACTOR}")
    vae.eval().requires_grad_(False)

    # the latents, cached as the posterior's scaled mean and std: a batch draws fresh samples
    with torch.no_grad():
        posteriors = [vae.encode(x) for x in to_unit(world["images"]).split(64)]
    mean = torch.cat([p.mean for p in posteriors]) * sd.SD_SCALE_FACTOR  # [N, 4, size / 4, size / 4]
    std = torch.cat([p.std for p in posteriors]) * sd.SD_SCALE_FACTOR
    print(f"scaled latents: std {(mean + std * torch.randn_like(std)).std().item():.3f} (SD's convention: about 1)")
    tokens = clip.tokenize(world["captions"], pad_id=SD_PAD)  # [N, 77]
    null = clip.tokenize([""], pad_id=SD_PAD)[0]

    # stage 3: UNet and text tower together, ε-prediction (Eq. 17 without the mask weights)
    ema_unet, ema_text = build_models(args)[1:]
    ema_unet.load_state_dict(unet.state_dict()), ema_text.load_state_dict(text.state_dict())
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    step = 0
    if state is not None and state["stage"] == "ldm":
        for module, key in ((unet, "unet"), (text, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text"), (opt, "optimizer")):
            module.load_state_dict(state[key])
        generator.set_state(state["rng"])
        step = state["step"]
    unet.train(), text.train()
    losses, start, first_step = [], time.time(), step
    bar = tqdm(total=args.steps, initial=step, desc="3/4 UNet + text")
    while step < args.steps:
        idx = pick(world, args.batch_size, generator)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        tok = tokens[idx].clone()
        tok[torch.rand(len(idx), generator=generator) < args.caption_dropout] = null  # 10%: the unconditional model
        t = torch.randint(0, ddpm.num_steps, (len(idx),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        loss = F.mse_loss(unet(ddpm.q_sample(z0, t, noise), t, text.encode_text_tokens(tok)), noise)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)  # 100 warm-up steps
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, args.ema_decay, step)
        ema_update(ema_text, text, args.ema_decay, step)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_atomic(dict(settings=settings, stage="ldm", step=step, vae=vae.state_dict(), unet=unet.state_dict(),
                             text=text.state_dict(), ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict(),
                             optimizer=opt.state_dict(), rng=generator.get_state()), ckpt_path)
    bar.close()
    if losses:
        timing["ldm"] = (time.time() - start) / (step - first_step)
        n = min(100, len(losses) // 2) or 1
        print(f"loss: first {n} steps {sum(losses[:n]) / n:.4f}, last {n} {sum(losses[-n:]) / n:.4f}")
    for name, seconds in timing.items():
        print(f"{name}: {seconds:.3f} s a step")

    # 4. the SD-1.x file (EMA weights, like SD's emaonly files), checked by loading it back
    ema_unet.eval(), ema_text.eval()
    sd.save_sd(out, vae, ema_unet, ema_text)
    vae2, unet2, text2 = sd.load_sd(out)
    with torch.no_grad():
        x, tt = torch.randn(2, 4, args.size // 4, args.size // 4), torch.tensor([10, 900])
        c = text2.encode_text_tokens(clip.tokenize(["a photo of a normal bottle"] * 2, pad_id=SD_PAD))
        assert torch.equal(unet2(x, tt, c), ema_unet(x, tt, c)), "the written file does not load back equal"
    right, total = preview(unet2, text2, vae2, ddpm, args.category, preview_path)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {preview_path}: "
          f"{right}/{total} contamination samples show their caption's colour")


if __name__ == "__main__":
    main()
