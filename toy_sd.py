"""A miniature Stable Diffusion, pretrained here on the toy world: the students' picture of how SD was made.

Stable Diffusion 1.x is a text-to-image latent diffusion model (Rombach et al. 2022): a KL autoencoder
(kl-f8) trained first, then a UNet trained to predict the noise ε in the autoencoder's latents, conditioned
by cross-attention on the 77 per-token hidden states of a CLIP text tower, on billions of captioned images.
AnomalyXFusion's authors start from such a frozen model. This script makes a small one the same way, on
what this project has instead of LAION: many seeds of one toy category, normal and anomalous images with
their captions ("a photo of a normal bottle", "A large red contamination lies inside the bottle"):

    python toy_sd.py --out runs/toy_sd.safetensors        # then: python sd.py --sd runs/toy_sd.safetensors

  1/3 toy world   toy.ensure_toy for seeds 1..--seeds (seed 0 is the toy set train.py uses: never seen here),
                  read at --size px; cached in data/toy_sd/
  2/3 VAE         vae.py at the toy preset's size, L1 + KL as LDM (vae.vae_loss), on the images of every toy
                  category (no captions) and half its batches made generic (random disks on random backgrounds):
                  a generic codec, as SD's VAE trained on OpenImages; then rescaled so that its
                  latents have SD's std 1 / 0.18215: load_sd sets scale_factor = 0.18215 for every SD file
  3/3 UNet + text tower   unet.py in SD-1.x's layout at toy widths (8 heads, as load_sd assumes) and a small CLIP
                  text tower (clip.py, text only), ε-prediction on the scaled latents with SD's scaled_linear
                  schedule (ddpm.DDPM), 10% of captions dropped to "" (classifier-free guidance), EMA weights
  then the file   the EMA weights (training.EMA over both) written by sd.save_sd as an SD-1.x single file
                  (original key layout), checked by reading it back with sd.load_sd

The text tower is trained together with the UNet, as LDM trained its BERT text encoder: SD's is a frozen
CLIP that was pretrained contrastively on 400M pairs, and a random tiny tower has learned nothing to freeze.
The UNet and the text tower see one category only, so that train.py --sd can learn AnomalyXFusion on a
category they have never seen (cable, with --category bottle). Resumable: re-running the same command
continues from the last checkpoint of the stage it was in, <out>.vae.pt or <out>.ldm.pt (checkpoints.py, as
train.py's vae.pt and axf.pt). Writes <out>.png: samples for a few captions, two per caption.
Its settings are one table of config.py's Key rows (TOY_SD_KEYS): `python toy_sd.py --help` lists them.
Depends on ddpm.py (DDPM, guided_eps: the schedule and the DDIM sampler), training.py (adamw, warm_up, EMA),
checkpoints.py and files.py (checkpoints, the world's cache), cli.py (flags, progress), sd.py (save_sd, load_sd,
SD's constants), clip.py, unet.py, vae.py, and toy.py and data.py (the toy world).
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints
import cli
import clip
import data
import files
import sd
import toy
import training
from config import Key, within
from ddpm import DDPM, guided_eps
from unet import UNet
from vae import VAE, vae_loss

ROOT = Path(__file__).parent / "data" / "toy_sd"
TOY_RENDER_SIZE = 128  # toy.ensure_toy's default: train.py reads these 128 px images at its image_size
SD_PAD = 49407  # SD-1.x pads prompts with the end token (clip.tokenize's pad_id)
VAE_SIZES = dict(in_channels=3, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4)  # toy preset's
VAE_LR = 1e-3
WARMUP_STEPS = 100  # of the UNet + text tower's learning rate
GRAD_CLIP = 1.0

# The settings: a resume must keep the fixed ones (it may raise --steps: a longer run continues a shorter one)
TOY_SD_KEYS = dict(
    out=Key("runs/toy_sd.safetensors", "the SD-1.x single file to write (.safetensors or .ckpt)"),
    category=Key("bottle", "the one toy category pretrained on; the others stay unseen for train.py --sd", fixed=True,
                 choices=toy.TOY_CATEGORIES),
    seeds=Key(8, "toy worlds 1..N (seed 0, train.py's, is never used)", fixed=True, range=">= 1"),
    size=Key(64, "image size in px (the toy preset's); latents are size / 4, which the UNet halves twice", fixed=True,
             range=">= 16", multiple_of=16),
    vae_steps=Key(800, "2/3 VAE: training steps", fixed=True, range=">= 1"),
    vae_categories=Key("bottle,cable", "what the VAE trains on (images only, no captions); the UNet and text tower "
                                       "see --category only (the pill, made later, is seen by none of them)",
                       fixed=True),
    vae_batch_size=Key(8, "2/3 VAE: batch size", fixed=True, range=">= 1"),
    steps=Key(2400, "3/3 UNet + text tower: training steps", range=">= 1"),
    batch_size=Key(16, "3/3 UNet + text tower: batch size", fixed=True, range=">= 1"),
    lr=Key(3e-4, f"3/3 UNet + text tower: AdamW learning rate (the VAE's: {VAE_LR:g})", fixed=True, range="> 0"),
    unet_channels=Key(64, "UNet base width (levels 1x, 2x, 2x)", fixed=True, range=">= 32", multiple_of=32),
    text_width=Key(128, "text tower width = UNet context width, 64 per attention head", fixed=True, range=">= 64",
                   multiple_of=64),
    text_layers=Key(2, "text tower transformer layers", fixed=True, range=">= 1"),
    caption_dropout=Key(0.1, "share of captions replaced by '' (for guidance)", fixed=True, range="0 <= x <= 1"),
    ema_decay=Key(0.999, "EMA of the weights written to --out", fixed=True, range="0 <= x < 1"),
    checkpoint_every=Key(250, "steps between resumable checkpoints", range=">= 1"),
    threads=Key(0, "torch threads (0: torch's default); 1 on a shared machine", range=">= 0"),
)


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
# 1/3 toy world: many seeds of it, every image with a caption


def load_world(category, seeds, size):
    """-> images uint8 [N, 3, size, size], captions [N], anomalous bool [N]; cached in data/toy_sd/."""
    cache = ROOT / f"{category}_{size}px_seeds1-{seeds}.pt"
    if cache.is_file():
        return files.read_torch(cache, advice="delete it: toy_sd.py writes it again")
    images, captions, anomalous = [], [], []
    bar = cli.progress(seeds, "1/3 toy world")
    for seed in range(1, seeds + 1):
        folder = toy.ensure_toy(category, ROOT / f"seed{seed}", TOY_RENDER_SIZE, seed)
        cat = data.load_category(folder)
        items = [(p, normal_caption(category), False) for p in cat.train_good + cat.test_good]
        items += [(a.image, a.caption, True) for a in cat.anomalies]
        for path, caption, bad in items:
            images.append((data.read_image(path, size) * 255).round().to(torch.uint8))
            captions.append(caption)
            anomalous.append(bad)
        bar.update(1)
    bar.close()
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
# 2/3 VAE, and its latents at SD's scale


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
# 3/3 UNet + text tower: sampling for the preview


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
# the run: the command line, then 2/3 VAE and 3/3 UNet + text tower, one resumable loop each (a checkpoint a
# stage: <out>.vae.pt holds the VAE, finished and rescaled at its last step; <out>.ldm.pt the UNet and text
# tower), then the file


def allowed(key):
    """What a row's range allows, in words ('>= 32, a multiple of 32'): config.allowed_text for this table."""
    return ", ".join([key.range] + [f"a multiple of {key.multiple_of}"] * bool(key.multiple_of))


def refused(value, key):
    return not within(value, key.range) or bool(key.multiple_of and value % key.multiple_of)


def parse_args(argv=None):
    """The flags of TOY_SD_KEYS, typed like their defaults (cli.value_parser); a value its row does not allow is
    refused in one line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, key in TOY_SD_KEYS.items():
        parser.add_argument(f"--{name}", type=cli.value_parser(key.default), default=key.default, choices=key.choices,
                            metavar=None if key.choices else type(key.default).__name__.upper(),
                            help=f"{key.help} (default: {key.default})".replace("%", "%%")
                            + (f" [allowed: {allowed(key)}]" if key.range else ""))
    args = parser.parse_args(argv)
    problems = [f"--{name} must be {allowed(key)}, not {value}" for name, key in TOY_SD_KEYS.items()
                if key.range and refused(value := getattr(args, name), key)]
    problems += [f"--vae_categories: {name!r} is no toy category ({', '.join(toy.TOY_CATEGORIES)})"
                 for name in args.vae_categories.split(",") if name not in toy.TOY_CATEGORIES]
    if problems:
        parser.error("; ".join(problems))
    return args


def recipe(args):
    """What a checkpoint must agree on to be resumed: the fixed keys of TOY_SD_KEYS."""
    return {name: getattr(args, name) for name, key in TOY_SD_KEYS.items() if key.fixed}


def trained_on(names):
    """The toy categories a stage sees and their defect types: a checkpoint's "categories"."""
    return {name: list(toy.TOY_DEFECTS[name]) for name in names}


def read_stage(path, expected, total):
    """A stage's checkpoint (checkpoints.read_checkpoint: weights-only, each field checked), or None when there is
    none; one of another recipe than `expected` is refused."""
    if not path.is_file():
        return None
    state = checkpoints.read_checkpoint(path)
    if state["config"] != expected:
        raise ValueError(f"{path} was trained with {state['config']}; rerun with those flags or delete it")
    print(f"resuming from {path} at step {state['step']}" if state["step"] < total
          else f"{path}: complete at step {state['step']}")
    return state


def train_vae(vae, world, args, generator, path):
    """2/3 VAE: the autoencoder, then at its last step its latents rescaled to SD's std. Returns it frozen, in eval
    mode. A finished stage is read back; the batches' generator goes on into 3/3 where this stage left it."""
    optimizer = training.adamw(vae.parameters(), lr=VAE_LR)
    state = read_stage(path, recipe(args), args.vae_steps)
    step = checkpoints.restore(state, args.vae_steps, vae, optimizer, generator=generator, where=path)
    if step == args.vae_steps:  # finished: restore put back its weights only, and the batches go on from its rng
        generator.set_state(state["rng"])
        return vae.eval().requires_grad_(False)
    # the first stage is a generic image codec (SD's saw OpenImages): it may see every toy category, unlabelled
    images = torch.cat([load_world(c, args.seeds, args.size)["images"] for c in args.vae_categories.split(",")])
    vae.train()
    bar, start, first_step = cli.progress(args.vae_steps, "2/3 VAE", initial=step), time.time(), step
    while step < args.vae_steps:
        x = generic_images(to_unit(images[torch.randint(len(images), (args.vae_batch_size,), generator=generator)]),
                           generator)
        loss, logs = vae_loss(vae, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(l1=f"{logs['rec']:.4f}", refresh=False)
        if step == args.vae_steps:
            print(f"VAE: L1 {logs['rec']:.4f} at the last step, "
                  f"{(time.time() - start) / (step - first_step):.3f} s a step")
            vae.eval()
            print(f"VAE: latents rescaled by {match_sd_scale(vae, to_unit(world['images'])):.3f} to SD's std "
                  f"1 / {sd.SD_SCALE_FACTOR}")
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            checkpoints.save_checkpoint(path, step, recipe(args), vae, optimizer, generator=generator,
                                        categories=trained_on(args.vae_categories.split(",")))
    bar.close()
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


def train_ldm(networks, vae, ddpm, world, args, generator, path):
    """3/3 UNet + text tower (networks = [unet, text]) together, ε-prediction (Eq. (17) without the mask
    weights), with classifier-free guidance's caption dropout. Returns the EMA of both."""
    unet, text = networks
    mean, std, tokens = encode_world(vae, world)
    null = clip.tokenize([""], pad_id=SD_PAD)[0]
    ema = training.EMA(networks, args.ema_decay)
    optimizer = training.adamw([{"params": list(networks.parameters()), "base_lr": args.lr}], lr=args.lr)
    state = read_stage(path, recipe(args), args.steps)
    step = checkpoints.restore(state, args.steps, networks, optimizer, ema, generator, where=path)
    if state is not None and step >= args.steps:  # restore puts back a finished stage's weights only
        ema.load_state_dict(state["ema"])
    networks.train()
    losses, start, first_step = [], time.time(), step
    bar = cli.progress(args.steps, "3/3 UNet + text tower", initial=step)
    while step < args.steps:
        idx = pick(world, args.batch_size, generator)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        tok = tokens[idx].clone()
        tok[torch.rand(len(idx), generator=generator) < args.caption_dropout] = null  # the unconditional model
        t = torch.randint(0, ddpm.num_steps, (len(idx),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        loss = F.mse_loss(unet(ddpm.q_sample(z0, t, noise), t, text.encode_text_tokens(tok)), noise)
        training.warm_up(optimizer, step, WARMUP_STEPS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(networks.parameters(), GRAD_CLIP)
        optimizer.step()
        ema.update(networks, step)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
        if step % args.checkpoint_every == 0 or step == args.steps:
            checkpoints.save_checkpoint(path, step, recipe(args), networks, optimizer, ema, generator,
                                        categories=trained_on([args.category]))
    bar.close()
    if losses:
        n = min(100, len(losses) // 2) or 1
        print(f"loss: first {n} steps {sum(losses[:n]) / n:.4f}, last {n} {sum(losses[-n:]) / n:.4f}; "
              f"{(time.time() - start) / (step - first_step):.3f} s a step")
    return ema


def write_file(out, vae, networks, ema, ddpm, args):
    """The SD-1.x file with the EMA weights (like SD's emaonly files), checked by loading it back, and the
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
    out = Path(args.out)
    print("toy_sd:", recipe(args))
    torch.manual_seed(0)
    vae, unet, text = build_networks(args)
    networks = torch.nn.ModuleList([unet, text])  # one optimiser and one EMA over both
    ddpm = DDPM(1000, "scaled_linear", 0.00085, 0.012)  # SD's schedule
    world = load_world(args.category, args.seeds, args.size)
    print(f"{len(world['captions'])} images, {int(world['anomalous'].sum())} anomalous, "
          f"{len(set(world['captions']))} captions")
    generator = torch.Generator().manual_seed(1)  # every batch: a checkpoint holds its state
    vae = train_vae(vae, world, args, generator, Path(f"{out}.vae.pt"))
    ema = train_ldm(networks, vae, ddpm, world, args, generator, Path(f"{out}.ldm.pt"))
    write_file(out, vae, networks, ema, ddpm, args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
