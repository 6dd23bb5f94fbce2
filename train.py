"""train.py: train AnomalyXFusion on one category, every stage the output folder still lacks.

    python train.py --category bottle --toy                 # the built-in toy world, on a CPU
    python train.py --category bottle --data_root DIR       # MVTec AD + MVTec Caption, one GPU

Stages, in order, each a checkpoint in --out_dir (default runs/<category>):
  1. vae.pt       the KL autoencoder on normal and few-shot anomalous images (vae.py), defect pixels
                  weighted up and random-colour blobs painted on normal images so that it can draw
                  any defect; its latent scale factor is measured at the end (unit-std latents)
  2. mask_ae.pt   the mask encoder pre-trained as a mask autoencoder (mask_encoder.py, Eq. 2)
  3. axf.pt       AnomalyXFusion: MIF + DDF + UNet with the loss of Eq. (17) (axf.py)

Re-running the same command resumes: a finished stage is skipped, an unfinished one continues
from its last checkpoint (model, optimiser, EMA, step, RNG). Checkpoints are written atomically.
Only the few-shot third of each defect type's anomalies is ever read for training (data.py).
"""
import argparse
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import axf
import data
from mask_encoder import MaskAutoencoder
from vae import VAE, vae_loss


# ----------------------------------------------------------------------------------------------
# The command line, shared with sample.py: data flags, and every CONFIG key as `--key value`


def add_data_args(parser):
    parser.add_argument("--category", required=True, help="category folder name, e.g. bottle")
    parser.add_argument("--toy", action="store_true", help="use the built-in toy world (generated on first use)")
    parser.add_argument("--data_root", help="folder holding <category>/ in the MVTec AD or LOCO layout")
    parser.add_argument("--preset", choices=sorted(axf.PRESETS),
                        help="size preset (default: toy with --toy, mvtec otherwise)")


def parse_value(text, default):
    """A command-line string typed like the CONFIG default it overrides."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        return tuple(int(v) for v in text.split(",") if v.strip())
    return type(default)(text)


def config_comments():
    """The comment beside each key of axf.CONFIG, as the --help text of its flag."""
    source = Path(axf.__file__).read_text(encoding="utf-8")
    block = source[source.index("CONFIG = dict("):source.index("PRESETS = {")]
    return dict(re.findall(r"^    (\w+)=[^#\n]*#\s*(.+)$", block, re.M))


def add_config_args(parser):
    group = parser.add_argument_group("config (toy preset defaults shown; a preset or checkpoint may change them)")
    comments = config_comments()
    for key, default in axf.CONFIG.items():
        if key == "preset":  # --preset, above, picks the whole preset
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument(f"--{key}", type=lambda text, d=default: parse_value(text, d), default=None,
                           metavar=type(default).__name__.upper(),
                           help=f"{comments.get(key, '')} (default: {shown})".replace("%", "%%").lstrip())


def config_overrides(args):
    return {key: getattr(args, key) for key in axf.CONFIG if key != "preset" and getattr(args, key) is not None}


def category_folder(args):
    """The category folder the flags name, validated whole (data.load_category) before any writing."""
    if args.toy and args.data_root:
        raise ValueError("give either --toy or --data_root, not both")
    if args.toy:
        if args.category not in data.TOY_CATEGORIES:
            raise ValueError(f"--toy has categories {', '.join(data.TOY_CATEGORIES)}, not {args.category!r}")
        return data.ensure_toy(args.category)
    folder = Path(args.data_root or "data/mvtec") / args.category
    data.load_category(folder)  # raises one clear line on a missing folder or bad data
    return folder


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the stages


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a kill mid-write never leaves a broken checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device):
    """bf16 autocast on CUDA (fast, no loss scaling needed); full fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def load_stage(path, total):
    """The stage's last checkpoint, if any; says in one line whether it resumes or is complete."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["step"] < total:
        print(f"resuming from {path} at step {state['step']}")
    else:
        print(f"{path}: complete at step {state['step']}")
    return state


class EMA:
    """An exponential moving average of the trainable weights; the samples come from it."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model, step):
        # warm-up: early on the average would mostly remember the random initialisation
        decay = min(self.decay, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1 - decay)

    def swap(self, model):
        """Exchange the model's weights with the averaged ones (call twice to swap back)."""
        params = dict(model.named_parameters())
        for n, shadow in self.shadow.items():
            current = params[n].detach().clone()
            params[n].data.copy_(shadow)
            shadow.copy_(current)


# ----------------------------------------------------------------------------------------------
# The training set: every image decoded once and kept in memory


def load_training_set(folder, config):
    """Normal training images and the few-shot anomalies, as tensors at the config's image size."""
    category = data.load_category(folder)
    few_shot, _ = data.few_shot_split(category.anomalies)
    size = config["image_size"]
    normals = torch.stack([data.read_image(p, size) for p in tqdm(category.train_good, desc="normal images", leave=False)])
    return {
        "category": category,
        "normals": normals,  # [N, 3, S, S]
        "images": torch.stack([data.read_image(a.image, size) for a in few_shot]),  # [M, 3, S, S]
        "masks": torch.stack([data.read_mask(a, size) for a in few_shot]),  # [M, 1, S, S]
        "captions": [a.caption for a in few_shot],
        "defect_ids": torch.tensor([category.defects.index(a.defect) + 1 for a in few_shot]),  # 0 is "good"
    }


def sample_masks(train, batch_size, size, generator):
    """Masks to pre-train the mask encoder on: jittered real masks and Perlin blobs (data.py)."""
    return torch.stack([data.sample_mask(size, generator, real_masks=train["masks"]) for _ in range(batch_size)])


# ----------------------------------------------------------------------------------------------
# Stage 1: the VAE


def paint_colour_blobs(images, masks, probability):
    """Paint a Perlin blob (data.perlin_mask) of a random colour onto a random `probability` of the
    normal images [B, 3, S, S], in place; their masks [B, 1, S, S] become the blobs.

    A defect can bring a colour the category never shows (a red stain in a green bottle). A VAE that
    has only seen the category's palette and a handful of stains decodes it into the nearest colour
    it knows (the red stains of the toy bottle came back black). Blobs of every colour, anywhere,
    teach it to carry any colour at any place, as a general-purpose autoencoder would.
    """
    for i in range(len(images)):
        if torch.rand(()) < probability:
            blob = data.perlin_mask(images.shape[-1], None).to(images.device)
            images[i] = images[i] * (1 - blob) + torch.rand(3, 1, 1, device=images.device) * blob
            masks[i] = blob


def train_vae(train, config, out_dir, device):
    path = out_dir / "vae.pt"
    total = config["vae_steps"]
    state = load_stage(path, total)
    vae = VAE(3, config["vae_channels"], config["vae_channel_mult"], config["vae_num_res_blocks"],
              config["vae_latent_channels"]).to(device)
    if state and state["step"] >= total:
        vae.load_state_dict(state["model"])
        return vae
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config["vae_lr"])
    step = 0
    if state:
        vae.load_state_dict(state["model"]), optimizer.load_state_dict(state["optimizer"]), set_rng_state(state["rng"])
        step = state["step"]
    images = torch.cat([train["normals"], train["images"]])

    def checkpoint():
        save_atomic({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "rng": rng_state(), "config": config}, path)

    bar = tqdm(total=total, initial=step, desc="1/3 vae")
    half = config["vae_batch_size"] // 2
    while step < total:
        # half of each batch is anomalies: they are few, and a VAE that never learnt to encode a
        # defect would decode every latent the diffusion model makes back into a normal object
        anomaly_idx = torch.randint(len(train["images"]), (config["vae_batch_size"] - half,))
        batch = torch.cat([train["normals"][torch.randint(len(train["normals"]), (half,))], train["images"][anomaly_idx]])
        masks = torch.cat([torch.zeros(half, *train["masks"].shape[1:]), train["masks"][anomaly_idx]])
        flip = torch.rand(len(batch), 1, 1, 1) < 0.5
        batch, masks = torch.where(flip, batch.flip(3), batch).to(device), torch.where(flip, masks.flip(3), masks).to(device)
        paint_colour_blobs(batch[:half], masks[:half], config["vae_colour_blobs"])
        # a defect is a few percent of an image's pixels: weighted like the rest, the autoencoder
        # would learn to draw the normal object over it (a cut wire decoded back to a whole one)
        with autocast(device):
            loss, logs = vae_loss(vae, batch * 2 - 1, config["vae_kl_weight"], 1 + config["vae_defect_weight"] * masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % config["checkpoint_every"] == 0 and step < total:
            checkpoint()
    bar.close()
    # the latent scale factor (LDM's 0.18215 was found the same way): scaled latents get unit std
    with torch.no_grad():
        latents = torch.cat([vae.encode(b.to(device) * 2 - 1).mode() for b in images.split(64)])
        vae.measure_scale_factor(latents)
    checkpoint()
    print(f"vae: latent scale factor {vae.scale_factor.item():.4f}, saved {path}")
    return vae


# ----------------------------------------------------------------------------------------------
# Stage 2: the mask encoder, pre-trained as a mask autoencoder


def pretrain_mask_encoder(train, config, out_dir, device):
    path = out_dir / "mask_ae.pt"
    total = config["mask_steps"]
    state = load_stage(path, total)
    autoencoder = MaskAutoencoder(config["image_size"], config["mask_channels"], config["mask_feature_channels"]).to(device)
    if state and state["step"] >= total:
        autoencoder.load_state_dict(state["model"])
        return autoencoder.encoder
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=config["mask_lr"])
    generator = torch.Generator().manual_seed(config["seed"] + 1)
    step = 0
    if state:
        autoencoder.load_state_dict(state["model"]), optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"])
        step = state["step"]

    def checkpoint():
        save_atomic({"model": autoencoder.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "rng": generator.get_state(), "config": config}, path)

    bar = tqdm(total=total, initial=step, desc="2/3 mask encoder")
    while step < total:
        masks = sample_masks(train, config["vae_batch_size"], config["image_size"], generator).to(device)
        loss, logs = autoencoder.loss(masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(bce=f"{logs['mask_bce']:.4f}", iou=f"{logs['mask_iou']:.3f}")
        if step % config["checkpoint_every"] == 0 and step < total:
            checkpoint()
    bar.close()
    checkpoint()
    return autoencoder.encoder


# ----------------------------------------------------------------------------------------------
# Stage 3: AnomalyXFusion


def make_batch(train, latents, config, generator):
    """A batch of cached latents: `anomaly_fraction` few-shot anomalies, the rest normal images.

    Image and mask are rolled together by whole latent cells, so the few anomalies are seen at
    many positions without resampling anything.
    """
    B = config["batch_size"]
    num_anomalies = round(B * config["anomaly_fraction"])
    anomaly_idx = torch.randint(len(train["captions"]), (num_anomalies,), generator=generator)
    normal_idx = torch.randint(len(train["normals"]), (B - num_anomalies,), generator=generator)
    z = torch.cat([latents["anomalies"][anomaly_idx], latents["normals"][normal_idx]])
    S = config["image_size"]
    masks = torch.cat([train["masks"][anomaly_idx], torch.zeros(B - num_anomalies, 1, S, S)])
    factor = S // z.shape[-1]
    shifts = torch.randint(-config["shift_cells"], config["shift_cells"] + 1, (B, 2), generator=generator)
    z = torch.stack([zi.roll(tuple(s.tolist()), (1, 2)) for zi, s in zip(z, shifts)])
    masks = torch.stack([m.roll(tuple((s * factor).tolist()), (1, 2)) for m, s in zip(masks, shifts)])
    captions = [train["captions"][i] for i in anomaly_idx] + [""] * (B - num_anomalies)
    defect_ids = torch.cat([train["defect_ids"][anomaly_idx], torch.zeros(B - num_anomalies, dtype=torch.long)])
    is_anomaly = torch.arange(B) < num_anomalies
    return z, masks, captions, defect_ids, is_anomaly


def train_axf(train, vae, mask_encoder, clip_model, config, out_dir, device, folder):
    path = out_dir / "axf.pt"
    total = config["steps"]
    state = load_stage(path, total)
    if state and state["step"] >= total:
        return
    category = train["category"]
    model = axf.AnomalyXFusion(config, clip_model, category.defects).to(device)
    model.vae.load_state_dict(vae.state_dict())
    model.vae.requires_grad_(False)  # stage 1 trained it; the diffusion runs in its latent space
    if model.use_mif:
        model.mask_encoder.load_state_dict(mask_encoder.state_dict())  # pre-trained, now fine-tuned
        model.init_textures(train["defect_ids"].to(device), train["images"].to(device), train["masks"].to(device))
    if model.use_text and config["center_text"]:
        model.center_captions(train["captions"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config["lr"], weight_decay=0.0)
    ema = EMA(model, config["ema_decay"])
    generator = torch.Generator().manual_seed(config["seed"] + 2)
    step = 0
    if state:
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        generator.set_state(state["rng"]), set_rng_state(state["torch_rng"])
        step = state["step"]
    with torch.no_grad():  # the VAE is frozen: encode every training image once
        latents = {"normals": torch.cat([model.encode_images(b.to(device)) for b in train["normals"].split(64)]).cpu(),
                   "anomalies": torch.cat([model.encode_images(b.to(device)) for b in train["images"].split(64)]).cpu()}

    def checkpoint():
        save_atomic({"model": axf.model_state_dict(model), "ema": ema.shadow, "optimizer": optimizer.state_dict(),
                     "step": step, "rng": generator.get_state(), "torch_rng": rng_state(),
                     "config": config, "defects": category.defects, "data_folder": str(folder),
                     "clip": clip_model.state_dict() if not config["clip"] else None}, path)

    bar = tqdm(total=total, initial=step, desc="3/3 anomalyxfusion")
    started, losses = time.time(), []
    while step < total:
        z, masks, captions, defect_ids, is_anomaly = make_batch(train, latents, config, generator)
        lr = config["lr"] * min(1.0, (step + 1) / config["warmup_steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device):
            loss = model.loss(z.to(device), masks.to(device), captions, defect_ids.to(device), is_anomaly.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config["grad_clip"])
        optimizer.step()
        ema.update(model, step)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % config["checkpoint_every"] == 0 and step < total:
            checkpoint()
        if step % config["preview_every"] == 0 or step == total:
            ema.swap(model)
            preview(model, train, config, out_dir / f"preview_{step:06d}.png", device)
            ema.swap(model)
    bar.close()
    checkpoint()
    print(f"anomalyxfusion: {total} steps, {time.time() - started:.0f} s this run, saved {path}")


@torch.no_grad()
def preview(model, train, config, path, device):
    """A grid of normal | mask | generated | caption for a few few-shot captions and masks."""
    n = min(8, len(train["captions"]))
    pick = torch.linspace(0, len(train["captions"]) - 1, n).long()
    normals = train["normals"][:n].to(device)
    masks = train["masks"][pick].to(device)
    captions = [train["captions"][i] for i in pick]
    with autocast(device):
        generated = model.sample(normals, masks, captions, train["defect_ids"][pick].to(device),
                                 steps=config["sample_steps"], guidance_scale=config["guidance_scale"],
                                 generator=torch.Generator(device).manual_seed(0))
    data.save_grid([list(row) for row in zip(normals, masks, generated.float(), captions)], path)
    print(f"preview: {path}")


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--out_dir", help="where checkpoints and previews go (default: runs/<category>)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    folder = category_folder(args)  # checks the whole dataset before anything is written
    config = axf.resolve_config(args.preset or ("toy" if args.toy else "mvtec"), config_overrides(args))
    out_dir = Path(args.out_dir or Path("runs") / args.category)
    device = pick_device(config["device"])
    print(f"config: {config}")
    torch.manual_seed(config["seed"])
    train = load_training_set(folder, config)
    print(f"{args.category}: {len(train['normals'])} normal images, {len(train['captions'])} few-shot anomalies "
          f"of {len(train['category'].defects)} defect types; device {device}")
    clip_model = axf.build_clip(config, device)  # a bad --clip file stops here, before any writing
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = train_vae(train, config, out_dir, device)
    mask_encoder = pretrain_mask_encoder(train, config, out_dir, device)
    train_axf(train, vae, mask_encoder, clip_model, config, out_dir, device, folder)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
