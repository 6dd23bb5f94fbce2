"""A miniature Stable Diffusion, pretrained here on the toy world: the students' picture of how SD was made.

Stable Diffusion 1.x is a text-to-image latent diffusion model (Rombach et al. 2022): a KL autoencoder
(kl-f8) trained first, then a UNet trained to predict the noise ε in the autoencoder's latents, conditioned
by cross-attention on the 77 per-token hidden states of a CLIP text tower, on billions of captioned images.
AnomalyXFusion's authors start from such a frozen model. This script makes a small one the same way, on
what this project has instead of LAION: many seeds of one toy category, normal and anomalous images with
their captions ("a photo of a normal bottle", "A large red contamination lies inside the bottle"):

    python toy_sd.py --out runs/toy_sd.safetensors        # then: python sd.py --sd runs/toy_sd.safetensors

  1. data     toy.ensure_toy for seeds 1..--seeds (seed 0 is the toy set train.py uses: never seen here),
              read at --size px; cached in data/toy_sd/
  2. VAE      vae.py at the toy preset's size, L1 + KL as LDM (vae.vae_loss), on the images of every toy
              category (no captions) and half its batches made generic (random disks on random backgrounds):
              a generic codec, as SD's VAE trained on OpenImages; then rescaled so that its
              latents have SD's std 1 / 0.18215: load_sd sets scale_factor = 0.18215 for every SD file
  3. LDM      unet.py in SD-1.x's layout at toy widths (8 heads, as load_sd assumes) and a small CLIP text
              tower (clip.py, text only), ε-prediction on the scaled latents with SD's scaled_linear
              schedule (ddpm.DDPM), 10% of captions dropped to "" (classifier-free guidance), EMA weights
  4. file     the EMA weights (training.EMA over both) written by sd.save_sd as an SD-1.x single file (original
              key layout), checked by reading it back with sd.load_sd

The text tower is trained together with the UNet, as LDM trained its BERT text encoder: SD's is a frozen
CLIP that was pretrained contrastively on 400M pairs, and a random tiny tower has learned nothing to freeze.
The UNet and the text tower see one category only, so that train.py --sd can learn AnomalyXFusion on a
category they have never seen (cable, with --category bottle). Resumable: re-running the same command
continues from <out>.train.pt (written atomically). Writes <out>.png: samples for a few captions, two per caption.
Depends on ddpm.py (DDPM, guided_eps: the schedule and the DDIM sampler), training.py (EMA), files.py (save_atomic),
sd.py (save_sd, load_sd, SD's constants), clip.py, unet.py, vae.py, and toy.py and data.py (the toy world).
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data
import files
import sd
import toy
import training
from ddpm import DDPM, guided_eps
from training import EMA
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


def build_networks(args):
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
    files.save_atomic(world, cache)
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
    backgrounds and shapes the category lacks, and decodes a category it never saw far better (measured:
    docs/stable-diffusion.md)."""
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
    context, null = context[:B], context[B:].expand(B, -1, -1)
    z = torch.randn(B, 4, latent_size, latent_size, generator=generator)
    for t, t_prev in ddpm.sampling_timesteps("ddim", steps):
        t, t_prev = torch.full((B,), t), torch.full((B,), t_prev)
        z = ddpm.reverse_step(guided_eps(unet, z, t, context, null, guidance), t, t_prev, z)
    return ((vae.decode_latents(z) + 1) / 2).clamp(0, 1)


def named_colour(image):
    """The contaminant colour (toy.CONTAMINANTS) most pixels of image [3, S, S] are close to, or None."""
    table = torch.tensor([toy.TOY_COLOURS[c] for c in toy.CONTAMINANTS], dtype=torch.float32)  # [5, 3]
    dist = torch.cdist(image.reshape(3, -1).t() * 255, table)  # [S * S, 5]
    near = dist.min(dim=1)
    counts = torch.bincount(near.indices[near.values < 60], minlength=len(table))
    return toy.CONTAMINANTS[int(counts.argmax())] if counts.max() >= 4 else None


def preview(unet, text, vae, ddpm, category, path, latent_size, per_caption=2, seed=0):
    """Samples for preview_captions in a grid (caption | samples); returns how many contamination samples
    show the colour their caption names (most pixels near a contaminant colour)."""
    captions = preview_captions(category)
    images = sample(unet, text, vae, ddpm, [c for c in captions for _ in range(per_caption)],
                    torch.Generator().manual_seed(seed), latent_size=latent_size).split(per_caption)
    data.save_grid([[c, *imgs] for c, imgs in zip(captions, images)], path, cell=96)
    checks = [(c.split()[2], img) for c, imgs in zip(captions, images) if "contamination" in c for img in imgs]
    return sum(named_colour(img) == colour for colour, img in checks), len(checks)


# ----------------------------------------------------------------------------------------------
# the run: the command line, then stage 2 (VAE) and stage 3 (UNet + text tower), one resumable loop each,
# then the file. A checkpoint holds one stage's state: an "ldm" one holds the finished, rescaled VAE too.


def parse_args(argv=None):
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
    return parser.parse_args(argv)


def run_settings(args):
    """What a checkpoint must agree on to be resumed; --steps may grow (a longer run continues a shorter one)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "threads", "checkpoint_every", "steps")}


def load_checkpoint(path, settings):
    """<out>.train.pt, or None when there is none; refused when it was trained with other settings."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    if state["settings"] != settings:
        raise SystemExit(f"error: {path} was trained with {state['settings']}; rerun with those flags or delete it")
    print(f"resuming from {path} at {state['stage']} step {state['step']}")
    return state


def save_checkpoint(path, settings, stage, step, generator, **parts):
    """Everything a resume needs: the state_dict of every part, the step and the batch generator's state."""
    files.save_atomic(dict(settings=settings, stage=stage, step=step, rng=generator.get_state(),
                         **{name: part.state_dict() for name, part in parts.items()}), path)


def train_vae(vae, world, args, state, generator, ckpt_path, settings):
    """Stage 2: the autoencoder, then its latents rescaled to SD's std. Returns it frozen, in eval mode."""
    if state is not None and state["stage"] == "ldm":  # finished and rescaled in an earlier run
        vae.load_state_dict(state["vae"])
        return vae.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    step = 0
    if state is not None:
        vae.load_state_dict(state["vae"]), optimizer.load_state_dict(state["optimizer"]), generator.set_state(state["rng"])
        step = state["step"]
    # the first stage is a generic image codec (SD's saw OpenImages): it may see every toy category, unlabelled
    images = torch.cat([load_world(c, args.seeds, args.size)["images"] for c in args.vae_categories.split(",")])
    vae.train()
    bar, start, first_step = tqdm(total=args.vae_steps, initial=step, desc="2/4 VAE"), time.time(), step
    while step < args.vae_steps:
        x = generic_images(to_unit(images[torch.randint(len(images), (args.vae_batch_size,), generator=generator)]), generator)
        loss, logs = vae_loss(vae, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(l1=f"{logs['rec']:.4f}")
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            save_checkpoint(ckpt_path, settings, "vae", step, generator, vae=vae, optimizer=optimizer)
    bar.close()
    if step > first_step:
        print(f"VAE: L1 {logs['rec']:.4f} at the last step, {(time.time() - start) / (step - first_step):.3f} s a step")
    vae.eval()
    print(f"VAE: latents rescaled by {match_sd_scale(vae, to_unit(world['images'])):.3f} to SD's std 1 / {sd.SD_SCALE_FACTOR}")
    return vae.requires_grad_(False)


@torch.no_grad()
def encode_world(vae, world):
    """The latents as the posterior's scaled mean and std [N, 4, size / 4, size / 4], so that a batch draws
    fresh samples, and the captions as tokens [N, 77]."""
    posteriors = [vae.encode(x) for x in to_unit(world["images"]).split(64)]
    mean = torch.cat([p.mean for p in posteriors]) * sd.SD_SCALE_FACTOR
    std = torch.cat([p.std for p in posteriors]) * sd.SD_SCALE_FACTOR
    print(f"scaled latents: std {(mean + std * torch.randn_like(std)).std().item():.3f} (SD's convention: about 1)")
    return mean, std, clip.tokenize(world["captions"], pad_id=SD_PAD)


def train_ldm(networks, vae, ddpm, world, args, state, generator, ckpt_path, settings):
    """Stage 3: UNet and text tower (networks = [unet, text]) together, ε-prediction (Eq. (17) without the mask
    weights), with classifier-free guidance's caption dropout. Returns the EMA of both."""
    unet, text = networks
    mean, std, tokens = encode_world(vae, world)
    null = clip.tokenize([""], pad_id=SD_PAD)[0]
    ema = EMA(networks, args.ema_decay)
    optimizer = torch.optim.AdamW(networks.parameters(), lr=args.lr)
    step = 0
    if state is not None and state["stage"] == "ldm":
        networks.load_state_dict(state["networks"]), ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"]), generator.set_state(state["rng"])
        step = state["step"]
    networks.train()
    losses, start, first_step = [], time.time(), step
    bar = tqdm(total=args.steps, initial=step, desc="3/4 UNet + text")
    while step < args.steps:
        idx = pick(world, args.batch_size, generator)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        tok = tokens[idx].clone()
        tok[torch.rand(len(idx), generator=generator) < args.caption_dropout] = null  # the unconditional model
        t = torch.randint(0, ddpm.num_steps, (len(idx),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        loss = F.mse_loss(unet(ddpm.q_sample(z0, t, noise), t, text.encode_text_tokens(tok)), noise)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)  # 100 warm-up steps
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(networks.parameters(), 1.0)
        optimizer.step()
        ema.update(networks, step)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(ckpt_path, settings, "ldm", step, generator, vae=vae, networks=networks, ema=ema,
                            optimizer=optimizer)
    bar.close()
    if losses:
        n = min(100, len(losses) // 2) or 1
        print(f"loss: first {n} steps {sum(losses[:n]) / n:.4f}, last {n} {sum(losses[-n:]) / n:.4f}; "
              f"{(time.time() - start) / (step - first_step):.3f} s a step")
    else:
        print(f"UNet + text tower: already trained for {step} steps")
    return ema


def write_file(out, vae, networks, ema, ddpm, args):
    """4. The SD-1.x file with the EMA weights (like SD's emaonly files), checked by loading it back, and the
    preview <out>.png drawn by the file's model. Leaves the averages swapped into networks."""
    ema.swap(networks)
    unet, text = networks.eval()
    sd.save_sd(out, vae, unet, text)
    vae2, unet2, text2 = sd.load_sd(out)
    with torch.no_grad():
        x, t = torch.randn(2, 4, args.size // 4, args.size // 4), torch.tensor([10, 900])
        c = text2.encode_text_tokens(clip.tokenize([normal_caption(args.category)] * 2, pad_id=SD_PAD))
        assert torch.equal(unet2(x, t, c), unet(x, t, c)), "the written file does not load back equal"
    preview_path = out.with_suffix(".png")
    right, total = preview(unet2, text2, vae2, ddpm, args.category, preview_path, latent_size=args.size // 4)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {preview_path}: "
          f"{right}/{total} contamination samples show their caption's colour")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out, settings = Path(args.out), run_settings(args)
    ckpt_path = Path(f"{out}.train.pt")
    print("toy_sd:", settings)
    torch.manual_seed(0)
    vae, unet, text = build_networks(args)
    networks = torch.nn.ModuleList([unet, text])  # one optimiser and one EMA over both
    ddpm = DDPM(1000, "scaled_linear", 0.00085, 0.012)  # SD's schedule
    state = load_checkpoint(ckpt_path, settings)
    world = load_world(args.category, args.seeds, args.size)
    print(f"{len(world['captions'])} images, {int(world['anomalous'].sum())} anomalous, {len(set(world['captions']))} captions")
    generator = torch.Generator().manual_seed(1)  # every batch: a checkpoint holds its state
    vae = train_vae(vae, world, args, state, generator, ckpt_path, settings)
    ema = train_ldm(networks, vae, ddpm, world, args, state, generator, ckpt_path, settings)
    write_file(out, vae, networks, ema, ddpm, args)


if __name__ == "__main__":
    main()
