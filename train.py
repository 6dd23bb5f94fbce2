"""train.py: train AnomalyXFusion on one category, every stage the output folder still lacks.

    python train.py --category bottle --toy                 # the built-in toy world, on a CPU
    python train.py --category bottle --data_root DIR       # MVTec AD + MVTec Caption, one GPU

    python train.py --category bottle --data_root DIR --sd v1-5-pruned-emaonly.safetensors --clip ViT-L-14.pt

Stages, in order, each a checkpoint in --out_dir (default runs/<category>):
  1. vae.pt       the KL autoencoder on normal and few-shot anomalous images (vae.py), defect pixels
                  weighted up and random-colour blobs painted on normal images so that it can draw
                  any defect; its latent scale factor is measured at the end (unit-std latents)
  2. mask_ae.pt   the mask encoder pre-trained as a mask autoencoder (mask_encoder.py, Eq. 2)
  3. axf.pt       AnomalyXFusion: MIF + DDF + UNet with the loss of Eq. (17) (axf.py)

With --sd FILE (a Stable Diffusion 1.x single file; preset sd: 256 px) the file supplies the VAE
(stage 1 is skipped; SD's latent scale), the UNet (frozen, LoRA or fully trained: --train_unet)
and the text encoder (frozen): e_t's tokens follow its 77 hidden states of --sd_prompt
(--sd_context splice: e_t replaces the prompt's * inside it, as the authors' code does).
--clip FILE (OpenAI CLIP) still gives Eq. (1)'s caption feature and Eq. (3)'s image feature;
without it a small random CLIP does (the toy world's default). axf.pt then holds only what
trained and the SD file's size and sha256: it refuses any other file.

Re-running the same command resumes: a finished stage is skipped, an unfinished one continues
from its last checkpoint (model, optimiser, EMA, step, RNG), and reaches the weights an
uninterrupted run would. A resume may change budgets (more --steps) but not the architecture
(axf.ARCHITECTURE_KEYS): use a new --out_dir for that. Checkpoints are written atomically.
Only the few-shot third of each defect type's anomalies is ever read for training (data.py).
"""
import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

import axf
import cli
import data
from vae import vae_loss


# ----------------------------------------------------------------------------------------------
# Checkpoints, RNG and the EMA


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


class EMA:
    """An exponential moving average of the trainable weights; the samples come from it."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model, step):
        # warm-up: early on the average would mostly remember the random initialisation
        decay = min(self.decay, (1 + step) / (10 + step))
        params = dict(model.named_parameters())
        # shadow += (1 - decay) * (weight - shadow) for every tensor at once: one call, not a Python loop
        torch._foreach_lerp_(list(self.shadow.values()), [params[n].detach() for n in self.shadow], 1 - decay)

    def swap(self, model):
        """Exchange the model's weights with the averaged ones (call twice to swap back)."""
        params = dict(model.named_parameters())
        for n, shadow in self.shadow.items():
            current = params[n].detach().clone()
            params[n].data.copy_(shadow)
            shadow.copy_(current)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, shadow):
        """Saved averages, moved onto the device of the weights they average (a checkpoint is read on the CPU)."""
        if shadow.keys() != self.shadow.keys():
            raise ValueError("the saved EMA averages other weights than this model's")
        self.shadow = {n: v.to(self.shadow[n].device, self.shadow[n].dtype) for n, v in shadow.items()}


# ----------------------------------------------------------------------------------------------
# The loop every stage shares: resume, step, show the loss, checkpoint


def refuse_sd_switch(out_dir, config):
    """Before stage 1: a run made with --sd is not continued without it, nor one made without it with it
    (its stage 1 would be trained, or skipped, before stage 2's checkpoint said so)."""
    path = out_dir / "mask_ae.pt"  # every run has one
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["config"].get("sd", "")
        if bool(saved) != bool(config["sd"]):
            raise ValueError(f"{path} was trained {'with --sd ' + saved if saved else 'without --sd'}; "
                             f"resume it the same way or pass a new --out_dir")


def load_stage(path, total, config):
    """The stage's last checkpoint, if any; says in one line whether it resumes or is complete.

    A checkpoint of another architecture is refused: loading it would drop or mismatch weights.
    """
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: a full UNet is not read twice
    changed = axf.architecture_changes(state["config"], config)
    if changed:
        raise ValueError(f"{path} was trained with another architecture ({'; '.join(changed)}); "
                         f"resume with the same settings or pass a new --out_dir")
    print(f"resuming from {path} at step {state['step']}" if state["step"] < total
          else f"{path}: complete at step {state['step']}")
    return state


def restore(state, parts, generator, device, path):
    """Put a checkpoint back: weights, optimiser and EMA state on `device`, and both RNGs."""
    for name, part in parts.items():
        if name == "model":
            axf.load_weights(part, state["model"], path)
        else:  # the optimiser casts its state to its parameters' device; the EMA moves to its own
            part.load_state_dict(state[name])
    if generator is not None:
        generator.set_state(state["rng"])
    set_rng_state(state["torch_rng"])


def run_stage(desc, path, total, state, config, device, parts, step, generator=None, extra=None,
              after_step=None, before_save=None):
    """Train parts["model"] for `total` steps of step(i) -> logs, resuming from `state`.

    parts: the objects a checkpoint holds ("model", "optimizer", and "ema" in stage 3); extra:
    more entries for the checkpoint; after_step(i) runs after each step (previews); before_save()
    once at the end, before the last checkpoint.
    """
    def save(i):
        save_atomic({**{name: axf.model_state_dict(p) if name == "model" else p.state_dict()
                        for name, p in parts.items()}, "step": i, "config": config, **(extra or {}),
                     "rng": generator.get_state() if generator is not None else None,
                     "torch_rng": rng_state()}, path)

    i = 0
    if state:
        restore(state, parts if state["step"] < total else {"model": parts["model"]}, generator, device, path)
        i = state["step"]
        if i >= total:
            return
    bar = cli.progress(total, desc, initial=i)
    while i < total:
        logs = step(i)
        i += 1
        bar.update(1)
        bar.set_postfix(logs, refresh=False)  # the bar prints on its own clock (cli.progress)
        if i % config["checkpoint_every"] == 0 and i < total:
            save(i)
        if after_step is not None:
            after_step(i)
    bar.close()
    if before_save is not None:
        before_save()
    save(i)


# ----------------------------------------------------------------------------------------------
# The training set: every image decoded once and kept in memory


def load_training_set(folder, config):
    """Normal training images and the few-shot anomalies, as tensors at the config's image size."""
    category = data.load_category(folder)
    few_shot, _ = data.few_shot_split(category.anomalies)
    size = config["image_size"]
    normals = torch.stack([data.read_image(p, size) for p in category.train_good])
    return {
        "category": category,
        "normals": normals,  # [N, 3, S, S]
        "images": torch.stack([data.read_image(a.image, size) for a in few_shot]),  # [M, 3, S, S]
        "masks": torch.stack([cli.read_mask(a, size) for a in few_shot]),  # [M, 1, S, S]
        "captions": [a.caption for a in few_shot],
        "defect_ids": axf.defect_ids([a.defect for a in few_shot], category.defects),
    }


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


def vae_step(vae, optimizer, train, config, device, i):
    # half of each batch is anomalies: they are few, and a VAE that never learnt to encode a
    # defect would decode every latent the diffusion model makes back into a normal object
    half = config["vae_batch_size"] // 2
    anomaly_idx = torch.randint(len(train["images"]), (config["vae_batch_size"] - half,))
    batch = torch.cat([train["normals"][torch.randint(len(train["normals"]), (half,))], train["images"][anomaly_idx]])
    masks = torch.cat([torch.zeros(half, *train["masks"].shape[1:]), train["masks"][anomaly_idx]])
    flip = torch.rand(len(batch), 1, 1, 1) < 0.5
    batch, masks = torch.where(flip, batch.flip(3), batch).to(device), torch.where(flip, masks.flip(3), masks).to(device)
    paint_colour_blobs(batch[:half], masks[:half], config["vae_colour_blobs"])
    # a defect is a few percent of an image's pixels: weighted like the rest, the autoencoder
    # would learn to draw the normal object over it (a cut wire decoded back to a whole one)
    with cli.autocast(device, config["bf16"]):
        loss, _ = vae_loss(vae, batch * 2 - 1, config["vae_kl_weight"], 1 + config["vae_defect_weight"] * masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": f"{loss.item():.4f}"}


@torch.no_grad()
def measure_scale_factor(vae, images, device):
    """The latent scale factor (LDM's 0.18215 was found the same way): scaled latents get unit std."""
    vae.measure_scale_factor(torch.cat([vae.encode(b.to(device) * 2 - 1).mode() for b in images.split(64)]))
    print(f"vae: latent scale factor {vae.scale_factor.item():.4f}")


def train_vae(train, config, out_dir, device):
    path, total = out_dir / "vae.pt", config["vae_steps"]
    state = load_stage(path, total, config)
    vae = axf.build_vae(config).to(device)
    optimizer = cli.adamw(vae.parameters(), lr=config["vae_lr"])
    images = torch.cat([train["normals"], train["images"]])
    run_stage("1/3 vae", path, total, state, config, device, dict(model=vae, optimizer=optimizer),
              partial(vae_step, vae, optimizer, train, config, device),
              before_save=partial(measure_scale_factor, vae, images, device))
    return vae


# ----------------------------------------------------------------------------------------------
# Stage 2: the mask encoder, pre-trained as a mask autoencoder


def mask_step(autoencoder, optimizer, train, config, generator, device, i):
    # jittered real masks and Perlin blobs (data.py)
    masks = torch.stack([data.sample_mask(config["image_size"], generator, real_masks=train["masks"])
                         for _ in range(config["vae_batch_size"])]).to(device)
    loss, logs = autoencoder.loss(masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"bce": f"{logs['mask_bce']:.4f}", "iou": f"{logs['mask_iou']:.3f}"}


def pretrain_mask_encoder(train, config, out_dir, device):
    path, total = out_dir / "mask_ae.pt", config["mask_steps"]
    state = load_stage(path, total, config)
    autoencoder = axf.build_mask_autoencoder(config).to(device)
    optimizer = cli.adamw(autoencoder.parameters(), lr=config["mask_lr"])
    generator = torch.Generator().manual_seed(config["seed"] + 1)
    run_stage("2/3 mask encoder", path, total, state, config, device, dict(model=autoencoder, optimizer=optimizer),
              partial(mask_step, autoencoder, optimizer, train, config, generator, device), generator)
    return autoencoder.encoder


# ----------------------------------------------------------------------------------------------
# Stage 3: AnomalyXFusion


def make_batch(train, latents, config, generator):
    """A batch of cached latents: `anomaly_fraction` few-shot anomalies, the rest normal images.
    -> latents, masks, captions, defect ids, is_anomaly, and the masked images' latents (an inpainting
    UNet's input; a normal image's mask is empty: its masked latent is its latent) or None.

    Image and mask are rolled together by whole latent cells, so the few anomalies are seen at
    many positions without resampling anything.
    """
    B = config["batch_size"]
    num_anomalies = round(B * config["anomaly_fraction"])
    anomaly_idx = torch.randint(len(train["captions"]), (num_anomalies,), generator=generator)
    normal_idx = torch.randint(len(train["normals"]), (B - num_anomalies,), generator=generator)
    z = torch.cat([latents["anomalies"][anomaly_idx], latents["normals"][normal_idx]])
    masked = None
    if "masked_anomalies" in latents:
        masked = torch.cat([latents["masked_anomalies"][anomaly_idx], latents["normals"][normal_idx]])
    S = config["image_size"]
    masks = torch.cat([train["masks"][anomaly_idx], torch.zeros(B - num_anomalies, 1, S, S)])
    factor = axf.latent_factor(config)
    shifts = torch.randint(-config["shift_cells"], config["shift_cells"] + 1, (B, 2), generator=generator)
    z = torch.stack([zi.roll(tuple(s.tolist()), (1, 2)) for zi, s in zip(z, shifts)])
    if masked is not None:
        masked = torch.stack([mi.roll(tuple(s.tolist()), (1, 2)) for mi, s in zip(masked, shifts)])
    masks = torch.stack([m.roll(tuple((s * factor).tolist()), (1, 2)) for m, s in zip(masks, shifts)])
    captions = [train["captions"][i] for i in anomaly_idx] + [""] * (B - num_anomalies)
    defect_ids = torch.cat([train["defect_ids"][anomaly_idx], torch.zeros(B - num_anomalies, dtype=torch.long)])
    is_anomaly = torch.arange(B) < num_anomalies
    return z, masks, captions, defect_ids, is_anomaly, masked


def build_model(train, vae, mask_encoder, clip_model, config, device, backbone=None):
    """AnomalyXFusion with the trained VAE (frozen) and mask encoder, texture tokens and caption mean set;
    on an SD backbone (vae, unet, text encoder), with the file's networks."""
    model = axf.AnomalyXFusion(config, clip_model, train["category"].defects, backbone).to(device)
    if backbone is None:
        model.vae.load_state_dict(vae.state_dict())
    model.vae.requires_grad_(False)  # stage 1 (or SD) trained it; the diffusion runs in its latent space
    if model.use_mif:
        model.mask_encoder.load_state_dict(mask_encoder.state_dict())  # pre-trained, now fine-tuned
        model.init_textures(train["defect_ids"].to(device), train["images"].to(device), train["masks"].to(device))
    if model.use_text and config["center_text"]:
        model.center_captions(train["captions"])
    if model.use_text:
        model.encode_captions(train["captions"])  # cached once: CLIP is not needed again for these
    # Frozen CLIP has given its features: on the CPU it leaves its memory (1.7 GB for ViT-L/14) to training, e.g.
    # SD-1.5's full fine-tuning; a caption it has not seen (none in training) is then encoded on the CPU
    model.clip.cpu().float()  # (a CLIP file's fp16 weights: fp32 on the CPU, as clip.load gives them there)
    return model


def axf_step(model, optimizer, ema, train, latents, config, generator, device, losses, i):
    z, masks, captions, defect_ids, is_anomaly, masked = make_batch(train, latents, config, generator)
    for group in optimizer.param_groups:  # linear warm-up of the learning rate
        group["lr"] = group["base_lr"] * min(1.0, (i + 1) / max(1, config["warmup_steps"]))
    with cli.autocast(device, config["bf16"]):
        loss = model.loss(z.to(device), masks.to(device), captions, defect_ids.to(device), is_anomaly.to(device),
                          masked_latents=None if masked is None else masked.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config["grad_clip"])
    optimizer.step()
    ema.update(model, i)
    losses.append(loss.item())
    return {"loss": f"{sum(losses[-50:]) / len(losses[-50:]):.4f}"}


@torch.no_grad()
def preview(model, ema, train, config, out_dir, device, i):
    """Every preview_every steps and at the end, a grid of normal | mask | generated (EMA) | caption."""
    if i % config["preview_every"] and i != config["steps"]:
        return
    n = min(8, len(train["captions"]))
    pick = torch.linspace(0, len(train["captions"]) - 1, n).long()
    normals, masks = train["normals"][:n].to(device), train["masks"][pick].to(device)
    captions = [train["captions"][j] for j in pick]
    ema.swap(model)
    with cli.autocast(device, config["bf16"]):
        generated = model.sample(normals, masks, captions, train["defect_ids"][pick].to(device),
                                 steps=config["sample_steps"], guidance_scale=config["guidance_scale"],
                                 generator=torch.Generator(device).manual_seed(0))
    ema.swap(model)
    path = data.save_grid([list(row) for row in zip(normals, masks, generated.float(), captions)],
                          out_dir / f"preview_{i:06d}.png")
    print(f"preview: {path}")


def parameter_groups(model, config):
    """The UNet's trained weights (LoRA, full fine-tuning, a widened conv_in) at unet_lr; the conditioning
    (MIF, DDF, mask encoder, texture and null tokens) at lr. On a from-scratch UNet both are lr."""
    unet_lr = config["unet_lr"] if config["sd"] else config["lr"]
    groups = {"unet": [], "conditioning": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["unet" if name.startswith("unet.") else "conditioning"].append(p)
    return [{"params": groups["unet"], "lr": unet_lr, "base_lr": unet_lr},
            {"params": groups["conditioning"], "lr": config["lr"], "base_lr": config["lr"]}]


@torch.no_grad()
def encode_training_set(model, train, device):
    """Every training image's latent, once (the VAE is frozen; SD's encoder costs more than a UNet step),
    and for an inpainting UNet the latents of the few-shot anomalies with their masks grey."""
    def encode(images, masks=None):
        batches = zip(images.split(32), masks.split(32) if masks is not None else [None] * len(images))
        return torch.cat([model.encode_images(x.to(device)) if m is None else model.encode_masked_images(x.to(device), m.to(device))
                          for x, m in batches]).cpu()
    latents = {"normals": encode(train["normals"]), "anomalies": encode(train["images"])}
    if model.masked_image_input:
        latents["masked_anomalies"] = encode(train["images"], train["masks"])
    return latents


def peak_memory(device):
    """The most memory this run held: CUDA's max allocated, else the process's max resident set (Linux)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB (CUDA max allocated)"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process max resident set)"


def train_axf(train, vae, mask_encoder, clip_model, config, out_dir, device, folder, backbone=None):
    path, total = out_dir / "axf.pt", config["steps"]
    state = load_stage(path, total, config)
    sd_file = axf.sd_file(config["sd"]) if config["sd"] else None
    if state and config["sd"]:  # the trained weights belong to one SD file
        axf.check_sd_file(config["sd"], state["sd_file"])
    if state and state["step"] >= total:
        return
    model = build_model(train, vae, mask_encoder, clip_model, config, device, backbone)
    groups = parameter_groups(model, config)
    print(f"trainable: {sum(p.numel() for p in groups[0]['params']):,} UNet and "
          f"{sum(p.numel() for p in groups[1]['params']):,} conditioning parameters")
    optimizer = cli.adamw(groups, lr=config["lr"], weight_decay=0.0)
    ema = EMA(model, config["ema_decay"])
    generator = torch.Generator().manual_seed(config["seed"] + 2)
    latents = encode_training_set(model, train, device)
    started = time.time()
    run_stage("3/3 anomalyxfusion", path, total, state, config, device, dict(model=model, optimizer=optimizer, ema=ema),
              partial(axf_step, model, optimizer, ema, train, latents, config, generator, device, []), generator,
              extra={"defects": train["category"].defects, "data_folder": str(folder), "sd_file": sd_file,
                     "clip": clip_model.state_dict() if not config["clip"] else None},
              after_step=partial(preview, model, ema, train, config, out_dir, device))
    print(f"anomalyxfusion: {total} steps, {time.time() - started:.0f} s this run, saved {path} "
          f"({path.stat().st_size / 2 ** 20:.1f} MiB); peak memory {peak_memory(device)}")


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_data_args(parser)
    parser.add_argument("--preset", choices=sorted(axf.PRESETS),
                        help="size preset (default: toy with --toy, else sd with --sd, else mvtec)")
    parser.add_argument("--out_dir", help="where checkpoints and previews go (default: runs/<category>)")
    cli.add_config_args(parser)
    args = parser.parse_args(argv)
    folder = cli.category_folder(args)  # checks the whole dataset before anything is written
    overrides = cli.config_overrides(args)
    config = axf.resolve_config(args.preset or ("toy" if args.toy else "sd" if overrides.get("sd") else "mvtec"), overrides)
    device = cli.pick_device(config["device"])
    clip_model = axf.build_clip(config, device)  # a bad --clip file stops here, before any writing
    backbone = None
    if config["sd"]:  # a bad --sd file too; its sizes replace the preset's in the config
        backbone = axf.load_backbone(config, device)
        print(f"{config['sd']}: VAE, UNet ({sum(p.numel() for p in backbone[1].parameters()):,} parameters, "
              f"{backbone[1].conv_in.in_channels} input channels) and text encoder; --train_unet {config['train_unet']}")
    out_dir = Path(args.out_dir or Path("runs") / args.category)
    print(f"config: {config}")
    torch.manual_seed(config["seed"])
    train = load_training_set(folder, config)
    print(f"{args.category}: {len(train['normals'])} normal images, {len(train['captions'])} few-shot anomalies "
          f"of {len(train['category'].defects)} defect types; device {device}")
    out_dir.mkdir(parents=True, exist_ok=True)
    refuse_sd_switch(out_dir, config)
    vae = backbone[0] if backbone else train_vae(train, config, out_dir, device)  # SD's VAE: no stage 1
    mask_encoder = pretrain_mask_encoder(train, config, out_dir, device)
    train_axf(train, vae, mask_encoder, clip_model, config, out_dir, device, folder, backbone)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
