"""train.py: train AnomalyXFusion on one category or several, every stage the output folder still lacks.

    python train.py --category bottle --toy                 # the built-in toy world, on a CPU
    python train.py --category bottle --data_root DIR       # MVTec AD + MVTec Caption, one GPU
    python train.py --category bottle --data_root DIR --sd v1-5-pruned-emaonly.safetensors --clip ViT-L-14.pt
    python train.py --category bottle,cable,pill --toy      # one model of three categories (or --category all)
    torchrun --standalone --nproc_per_node 8 train.py --category all --data_root DIR   # 8 GPUs, DDP

Stages, in order, each a checkpoint in --out_dir (default runs/<category>; several: runs/<a>+<b>+..., or
runs/all), each one explicit loop:
  1. vae.pt       the KL autoencoder on normal and few-shot anomalous images (vae.py), defect pixels
                  weighted up and random-colour blobs painted on normal images so that it can draw
                  any defect; its latent scale factor is measured at the end (unit-std latents). The toy
                  preset skips the training, as the paper's frozen autoencoder: --vae_weights toy loads the
                  VAE toy_vae.py pretrained with this stage on toy worlds the run never sees
  2. mask_ae.pt   the mask encoder pre-trained as a mask autoencoder (mask_encoder.py, Eq. (2))
  3. axf.pt       AnomalyXFusion: MIF + DDF + UNet with the loss of Eq. (17) (axf.py)

With --sd FILE (a Stable Diffusion 1.x file; sd.py) the file supplies the VAE (stage 1 is skipped), the
UNet (frozen, LoRA or fully trained: --train_unet) and the frozen text encoder through which e_t reaches
it; --clip FILE still gives Eq. (1)'s caption feature and Eq. (3)'s image feature. axf.pt then holds only
what trained and the SD file's size and sha256: it refuses any other file.

Several categories share one VAE, one mask encoder and one UNet; each (category, defect type) has its texture
tokens and each category its caption mean (axf.py), and every batch gives each category an equal share
(draw_balanced). Under torchrun every stage runs on N processes with DDP: each process draws the batch one
process would draw and keeps its share (cli.share), so N processes take the same steps; only rank 0 writes.

Re-running the same command resumes: a finished stage is skipped, an unfinished one continues from its
last checkpoint (model, optimiser, EMA, step, RNG) and reaches the weights an uninterrupted run would. A
resume may change budgets (more --steps) but not the networks (config.py's fixed keys) or the categories.
One run at a time in an --out_dir (a lock; a second is refused). Every flag, folder and size is checked before
anything is written. Checkpoints are written atomically. Only the few-shot third of each defect type's
anomalies is ever read.
"""
import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import axf
import checkpoints
import cli
import data
import files
import sd
import sd_backbone
import toy
import training
from config import PRESETS, default_preset, resolve
from vae import vae_loss

# The recipe's constants: no user and no row of the paper needs to change them
KL_WEIGHT = 1e-6         # LDM kl-f8's: the latent stays close to a plain autoencoder's
MASK_LR = 1e-3           # stage 2: a small conv autoencoder on binary masks
ANOMALY_FRACTION = 0.75  # of each stage-3 batch: the few-shot anomalies are what the model must learn
GRAD_CLIP = 1.0
STAGE_FILES = ("vae.pt", "mask_ae.pt", "axf.pt")  # the checkpoints in --out_dir, one a stage
STAGE_STEPS = ("vae_steps", "mask_steps", "steps")  # each stage's budget, per category


def log_step(bar, **logs):
    bar.update(1)
    bar.set_postfix(logs, refresh=False)  # the bar prints on its own clock (cli.progress)


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun): every process draws the whole batch that one process would draw (the same
# seeds, the same RNG calls), keeps its share of the rows, and DDP averages the shares' gradients in
# backward(). N processes thus take the steps of one, up to the order of float sums. One process: no DDP.


def share(batch):
    """This process's rows of a batch that every process drew whole (a dict of tensors and lists; None stays
    None): rows r*b .. (r+1)*b - 1, b = the batch size / the number of processes. One process: the batch."""
    rank, n = cli.rank(), cli.world_size()
    cut = lambda x: x if x is None or n == 1 else x[rank * len(x) // n:(rank + 1) * len(x) // n]
    return {name: cut(value) for name, value in batch.items()}


def data_parallel(model, device):
    """The model as the loop calls it: under torchrun wrapped in DDP, which averages the gradients of what its
    forward() computes over the processes; one process: the model itself. What does not train (the frozen CLIP,
    kept on the CPU; a frozen VAE or SD UNet) and the buffers are alike in every process: DDP ignores them."""
    if cli.world_size() == 1:
        return model
    alike = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, alike)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def mean_over_processes(loss):
    """A logged loss (of this process's share) averaged over the processes: the whole batch's."""
    if cli.world_size() == 1:
        return loss.item()
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss.item() / cli.world_size()


# ----------------------------------------------------------------------------------------------
# The training set: every image decoded once and kept in memory


def load_training_set(folders, config):
    """The normal training images and the few-shot anomalies of each category folder, one category after the
    other, as tensors at the config's image size; each image's texture id (its row of the texture tokens,
    axf.texture_rows: its category's "good" row for a normal image), each anomaly's category index, and how many
    images each category has (draw_balanced)."""
    size, categories, few_shots, normals = config["image_size"], {}, [], []
    for folder in folders:
        category = data.load_category(folder)
        if not category.anomalies:  # its batches would draw from nothing, and it has no defect type to learn
            raise ValueError(f"{folder}: no anomalous images (test/<defect>/*.png); train.py learns each defect type "
                             f"from its few-shot anomalies, so leave {category.name} out of --category")
        categories[category.name] = category.defects
        few_shots.append(data.few_shot_split(category.anomalies)[0])
        normals.append(category.train_good)
    rows = axf.texture_rows(categories)
    few_shot = [a for anomalies in few_shots for a in anomalies]
    return {
        "categories": categories, "folders": {name: str(folder) for name, folder in zip(categories, folders)},
        "normals": torch.stack([data.read_image(p, size) for paths in normals for p in paths]),  # [N, 3, S, S]
        "normal_texture_ids": torch.tensor([rows.index((name, "good")) for name, paths in zip(categories, normals)
                                            for _ in paths]),  # [N]
        "images": torch.stack([data.read_image(a.image, size) for a in few_shot]),  # [M, 3, S, S]
        "masks": torch.stack([data.read_mask(a, size) for a in few_shot]),  # [M, 1, S, S]
        "captions": [a.caption for a in few_shot],
        "texture_ids": torch.tensor([rows.index((name, a.defect)) for name, anomalies in zip(categories, few_shots)
                                     for a in anomalies]),  # [M]
        "anomaly_categories": torch.tensor([c for c, anomalies in enumerate(few_shots) for _ in anomalies]),  # [M]
        "num_normals": [len(paths) for paths in normals], "num_anomalies": [len(a) for a in few_shots],
    }


def draw_balanced(counts, k, generator=None):
    """k indices into images stored category after category, `counts` of each.

    Several categories: each slot picks a category uniformly, then one of its images uniformly. A category's
    share of a batch does not grow with how many images it has (the toy pill has half the anomalies of the
    cable; MVTec's toothbrush 60 normal images to the hazelnut's 391), and within a category the draw is the
    one a single-category run makes, so each category is trained on what its own run would see. (Uniform
    over (category, defect) pairs would instead change a single-category MVTec run, whose defect types
    have 3 to 9 few-shot images each.) One category: uniform over its images, the very draw of before.
    """
    if len(counts) == 1:
        return torch.randint(counts[0], (k,), generator=generator)
    counts = torch.tensor(counts)
    starts = counts.cumsum(0) - counts
    category = torch.randint(len(counts), (k,), generator=generator)
    # randint has one upper bound for all k: a draw in [0, 2^62) modulo each count is uniform to 1e-17
    return starts[category] + torch.randint(2 ** 62, (k,), generator=generator) % counts[category]


# ----------------------------------------------------------------------------------------------
# Stage 1: the VAE


def paint_colour_blobs(images, masks, probability):
    """Paint a Perlin blob (data.perlin_mask) of a random colour onto a random `probability` of the
    normal images [B, 3, S, S], in place; their masks [B, 1, S, S] become the blobs.

    A defect can bring a colour the category never shows (a red stain in a green bottle). A VAE that
    has only seen the category's palette and a handful of stains decodes it into the nearest colour
    it knows. Blobs of every colour, anywhere, teach it to carry any colour at any place, as a
    general-purpose autoencoder would.
    """
    for i in range(len(images)):
        if torch.rand(()) < probability:
            blob = data.perlin_mask(images.shape[-1], None).to(images.device)
            images[i] = images[i] * (1 - blob) + torch.rand(3, 1, 1, device=images.device) * blob
            masks[i] = blob


def vae_batch(train, config, device):
    """Half normal images (half of those with a colour blob), half few-shot anomalies, randomly mirrored; and
    each pixel's L1 weight: a defect is a few percent of an image's pixels, and weighted like the rest the
    autoencoder would learn to draw the normal object over it (a cut wire decoded back to a whole one)."""
    half = config["vae_batch_size"] // 2
    anomaly_idx = draw_balanced(train["num_anomalies"], config["vae_batch_size"] - half)
    images = torch.cat([train["normals"][draw_balanced(train["num_normals"], half)], train["images"][anomaly_idx]])
    masks = torch.cat([torch.zeros(half, *train["masks"].shape[1:]), train["masks"][anomaly_idx]])
    flip = torch.rand(len(images), 1, 1, 1) < 0.5
    images, masks = torch.where(flip, images.flip(3), images).to(device), torch.where(flip, masks.flip(3), masks).to(device)
    paint_colour_blobs(images[:half], masks[:half], config["vae_colour_blobs"])
    return images * 2 - 1, 1 + config["vae_defect_weight"] * masks


def train_vae(train, config, out_dir, device, pretrained=None):
    path, total = out_dir / "vae.pt", config["vae_steps"] * len(train["categories"])
    vae = axf.build_vae(config).to(device)
    optimizer = training.adamw(vae.parameters(), lr=config["vae_lr"])
    state = checkpoints.load_stage(path, total, config, train["categories"], depends_on=("image_size", "vae_"))
    if state is None and pretrained:
        return pretrained_vae(vae, optimizer, pretrained, train, config, path, total, device)
    step = checkpoints.restore(state, total, vae, optimizer, where=path)
    parallel_vae, autocast = data_parallel(vae, device), cli.autocast(device, config["bf16"])
    # the posterior sample's ε, drawn as DiagonalGaussian.sample would draw it: in the latent's dtype
    S = config["image_size"] // axf.latent_factor(config)
    dtype = torch.bfloat16 if cli.uses_bf16(device, config["bf16"]) else torch.float32
    bar = cli.progress(total, "1/3 vae", initial=step)
    while step < total:
        images, weights = vae_batch(train, config, device)  # the whole batch in every process (share keeps rows)
        noise = torch.randn(len(images), axf.LATENT_CHANNELS, S, S, device=device, dtype=dtype)
        weight_sum = weights.expand_as(images).sum() / cli.world_size()  # the whole batch's weighted mean, in shares
        batch = share(dict(images=images, weights=weights, noise=noise))
        with autocast:
            loss, _ = vae_loss(parallel_vae, batch["images"], KL_WEIGHT, batch["weights"], batch["noise"], weight_sum)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        log_step(bar, loss=f"{mean_over_processes(loss):.4f}")
        if step == total:
            measure_scale_factor(vae, train, device)
        if step % config["checkpoint_every"] == 0 or step == total:
            checkpoints.save_checkpoint(path, step, config, vae, optimizer, categories=train["categories"])
    bar.close()
    return vae


@torch.no_grad()
def measure_scale_factor(vae, train, device):
    """LDM's 0.18215 was found the same way: latents times the scale factor have unit std (on this training set)."""
    all_images = torch.cat([train["normals"], train["images"]]).split(64)
    vae.measure_scale_factor(torch.cat([vae.encode(x.to(device) * 2 - 1).mode() for x in all_images]))
    print(f"vae: latent scale factor {vae.scale_factor.item():.4f}")


def read_vae_weights(config):
    """--vae_weights as a state dict the config's VAE loads (None for train), read before anything is written: a
    missing file or one of other sizes stops the run in one line."""
    if config["vae_weights"] == "train" or config["sd"]:  # an SD file brings its own VAE
        return None
    source = toy.TOY_VAE if config["vae_weights"] == "toy" else Path(config["vae_weights"])
    if source.name.endswith(".pt.gz"):  # toy_vae.py's file
        state = toy.read_toy_vae(source)
    else:  # a Stable Diffusion VAE (vae-ft-mse-840000-ema-pruned.safetensors, a diffusers AutoencoderKL folder)
        state = sd.build("VAE", sd.read_vae(source), str(source), "cpu").state_dict()
    try:
        axf.build_vae(config).load_state_dict(state)
    except RuntimeError:  # another network's sizes: one line, not torch's list of every mismatched tensor
        raise ValueError(f"{source}: a VAE of other sizes than --image_size {config['image_size']} --vae_channels "
                         f"{config['vae_channels']} --vae_channel_mult {config['vae_channel_mult']} "
                         f"--vae_num_res_blocks {config['vae_num_res_blocks']}; pass --vae_weights train to train one "
                         f"(stage 1)") from None
    return source, state


def pretrained_vae(vae, optimizer, pretrained, train, config, path, total, device):
    """Stage 1 skipped, as the paper's frozen autoencoder: the weights of --vae_weights (toy: toy_vae.py's file,
    made on toy worlds this run never sees), the latent scale factor measured on this run's images, and vae.pt
    written complete, so that a resume and sample.py find the stage done."""
    source, state = pretrained
    vae.load_state_dict(state)
    print(f"vae: pretrained, from {source} (stage 1 skipped)")
    measure_scale_factor(vae, train, device)
    checkpoints.save_checkpoint(path, total, config, vae, optimizer, categories=train["categories"])
    return vae


# ----------------------------------------------------------------------------------------------
# Stage 2: the mask encoder, pre-trained as a mask autoencoder


def pretrain_mask_encoder(train, config, out_dir, device):
    path, total = out_dir / "mask_ae.pt", config["mask_steps"] * len(train["categories"])
    autoencoder = axf.build_mask_autoencoder(config).to(device)
    optimizer = training.adamw(autoencoder.parameters(), lr=MASK_LR)
    generator = torch.Generator().manual_seed(config["seed"] + 1)
    state = checkpoints.load_stage(path, total, config, train["categories"], depends_on=("image_size", "mask_"))
    step = checkpoints.restore(state, total, autoencoder, optimizer, generator=generator, where=path)
    parallel_autoencoder = data_parallel(autoencoder, device)
    bar = cli.progress(total, "2/3 mask encoder", initial=step)
    while step < total:
        # jittered real masks and Perlin blobs (data.py); the whole batch in every process, each keeps its share
        masks = torch.stack([data.sample_mask(config["image_size"], generator, real_masks=train["masks"])
                             for _ in range(config["vae_batch_size"])]).to(device)
        loss, logs = parallel_autoencoder(share(dict(masks=masks))["masks"])  # its forward is its loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        log_step(bar, bce=f"{mean_over_processes(loss):.4f}", iou=f"{logs['mask_iou']:.3f}")
        if step % config["checkpoint_every"] == 0 or step == total:
            checkpoints.save_checkpoint(path, step, config, autoencoder, optimizer, generator=generator,
                                        categories=train["categories"])
    bar.close()
    return autoencoder.encoder


# ----------------------------------------------------------------------------------------------
# Stage 3: AnomalyXFusion


def assemble_model(train, vae, mask_encoder, clip_model, config, device, backbone=None):
    """AnomalyXFusion on the trained VAE and mask encoder (or an SD file's networks), with its texture tokens
    (Eq. (3)) and each category's caption mean set from the few-shot anomalies."""
    networks = backbone or dict(vae=vae)
    model = axf.AnomalyXFusion(config, clip_model, train["categories"], mask_encoder=mask_encoder, **networks)
    model = model.to(device)
    if model.mif.use_mif:
        model.mif.init_textures(train["texture_ids"].to(device), train["images"].to(device), train["masks"].to(device))
    if model.mif.use_text and config["center_text"]:
        for c in range(len(train["categories"])):
            model.mif.center_captions([caption for caption, k in zip(train["captions"], train["anomaly_categories"])
                                       if k == c], c)
    if model.mif.use_text:
        model.mif.encode_captions(train["captions"])  # cached once: CLIP is not needed again for these
    # Frozen CLIP has given its features: on the CPU it leaves its memory (ViT-L/14 is large) to training;
    # a caption it has not seen (none in training) is then encoded on the CPU, in fp32
    model.mif.clip.cpu().float()
    return model


@torch.no_grad()
def encode_training_set(model, train, device):
    """Every training image's latent, once (the VAE is frozen; SD's encoder costs more than a UNet step),
    and for an inpainting UNet the latents of the few-shot anomalies with their masks grey."""
    def encode(images, masks=None):
        if masks is None:
            return torch.cat([model.encode_images(x.to(device)) for x in images.split(32)]).cpu()
        return torch.cat([model.encode_images(x.to(device), m.to(device))
                          for x, m in zip(images.split(32), masks.split(32))]).cpu()
    latents = {"normals": encode(train["normals"]), "anomalies": encode(train["images"])}
    if model.reads_masked_image:
        latents["masked_anomalies"] = encode(train["images"], train["masks"])
    return latents


def make_batch(train, latents, config, generator, device):
    """A batch of cached latents on the device: ANOMALY_FRACTION few-shot anomalies, the rest normal images
    (draw_balanced), as the keyword arguments of AnomalyXFusion.loss: latents, masks, captions, texture ids,
    is_anomaly, and the masked images' latents (an inpainting UNet's input; a normal image's mask is empty: its
    masked latent is its latent) or None.

    Image and mask are rolled together by whole latent cells (up to an eighth of the latent's side), so
    the few anomalies are seen at many positions without resampling anything.
    """
    B, S = config["batch_size"], config["image_size"]
    num_anomalies = round(B * ANOMALY_FRACTION)
    anomaly_idx = draw_balanced(train["num_anomalies"], num_anomalies, generator)
    normal_idx = draw_balanced(train["num_normals"], B - num_anomalies, generator)
    z = torch.cat([latents["anomalies"][anomaly_idx], latents["normals"][normal_idx]])
    masked = None
    if "masked_anomalies" in latents:
        masked = torch.cat([latents["masked_anomalies"][anomaly_idx], latents["normals"][normal_idx]])
    masks = torch.cat([train["masks"][anomaly_idx], torch.zeros(B - num_anomalies, 1, S, S)])
    factor = axf.latent_factor(config)
    most = S // factor // 8
    shifts = torch.randint(-most, most + 1, (B, 2), generator=generator)
    roll = lambda x, scale: torch.stack([xi.roll(tuple((s * scale).tolist()), (1, 2)) for xi, s in zip(x, shifts)])
    z, masks = roll(z, 1), roll(masks, factor)
    masked = roll(masked, 1).to(device) if masked is not None else None
    captions = [train["captions"][i] for i in anomaly_idx] + [""] * (B - num_anomalies)
    texture_ids = torch.cat([train["texture_ids"][anomaly_idx], train["normal_texture_ids"][normal_idx]])
    is_anomaly = torch.arange(B) < num_anomalies
    return dict(latents=z.to(device), masks=masks.to(device), captions=captions, texture_ids=texture_ids.to(device),
                is_anomaly=is_anomaly.to(device), masked_latents=masked)


@torch.no_grad()
def preview(model, ema, train, config, path, device):
    """A grid of normal | mask | generated (EMA weights) | caption; each anomaly's mask on a normal image of its
    own category (row j: the category's normal j)."""
    n = min(8, len(train["captions"]))
    pick = torch.linspace(0, len(train["captions"]) - 1, n).long()
    counts, category = torch.tensor(train["num_normals"]), train["anomaly_categories"][pick]
    normal_idx = (counts.cumsum(0) - counts)[category] + torch.arange(n) % counts[category]
    normals, masks = train["normals"][normal_idx].to(device), train["masks"][pick].to(device)
    captions = [train["captions"][j] for j in pick]
    ema.swap(model)
    with cli.autocast(device, config["bf16"]):
        generated = model.sample(normals, masks, captions, train["texture_ids"][pick].to(device),
                                 steps=config["sample_steps"], guidance_scale=config["guidance_scale"],
                                 generator=torch.Generator(device).manual_seed(0))
    ema.swap(model)
    print(f"preview: {data.save_grid([list(row) for row in zip(normals, masks, generated.float(), captions)], path)}")


def train_axf(train, vae, mask_encoder, clip_model, config, out_dir, device, backbone=None):
    path, total = out_dir / "axf.pt", config["steps"] * len(train["categories"])
    state = checkpoints.load_stage(path, total, config, train["categories"])
    if state and config["sd"]:  # the trained weights belong to one SD file (and VAE)
        sd_backbone.check_sd_file(config["sd"], state["sd_file"])
        if config["sd_vae"]:
            sd_backbone.check_sd_file(config["sd_vae"], state["sd_vae_file"], ("VAE",))
    if state and state["step"] >= total:
        return
    if state and backbone:  # an older checkpoint's layout (LoRA keys, a conv_in trained whole) made today's
        sd_backbone.upgrade_checkpoint(state, backbone["unet"])
    model = assemble_model(train, vae, mask_encoder, clip_model, config, device, backbone)
    groups = axf.parameter_groups(model)
    print(f"trainable: {sum(p.numel() for p in groups[0]['params']):,} UNet and "
          f"{sum(p.numel() for p in groups[1]['params']):,} conditioning parameters")
    optimizer = training.adamw(groups, lr=config["lr"], weight_decay=0.0)
    ema = training.EMA(model, config["ema_decay"])
    generator = torch.Generator().manual_seed(config["seed"] + 2)
    step = checkpoints.restore(state, total, model, optimizer, ema, generator, where=path)
    parallel_model, autocast = data_parallel(model, device), cli.autocast(device, config["bf16"])
    latents = encode_training_set(model, train, device)
    extra = {"categories": train["categories"], "data_folders": train["folders"],
             "sd_file": sd_backbone.sd_file(config["sd"]) if config["sd"] else None,
             "sd_vae_file": sd_backbone.sd_file(config["sd_vae"], ("VAE",)) if config["sd_vae"] else None,
             "clip": clip_model.state_dict() if config["clip"] in axf.CLIPS_SAVED_IN_CHECKPOINTS else None}
    losses, started = [], time.time()
    bar = cli.progress(total, "3/3 anomalyxfusion", initial=step)
    while step < total:
        batch = make_batch(train, latents, config, generator, device)  # the whole batch, alike in every process
        # Eq. (17)'s draws for every image: its timestep t, its noise ε, whether its condition is dropped (for
        # classifier-free guidance); drawn for the whole batch, so that every process draws the same numbers
        batch.update(model.draw_noise(batch["latents"]))
        with autocast:
            loss = parallel_model(**share(batch))  # the loss of Eq. (17) on this process's rows (axf.py)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], GRAD_CLIP)
        training.warm_up(optimizer, step, config["warmup_steps"])
        optimizer.step()
        ema.update(model, step)
        step += 1
        losses.append(mean_over_processes(loss))
        log_step(bar, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % config["checkpoint_every"] == 0 or step == total:
            checkpoints.save_checkpoint(path, step, config, model, optimizer, ema, generator, **extra)
        if (step % config["preview_every"] == 0 or step == total) and cli.is_main():
            preview(model, ema, train, config, out_dir / f"preview_{step:06d}.png", device)
    bar.close()
    if cli.is_main():
        print(f"anomalyxfusion: {total} steps, {time.time() - started:.0f} s this run, saved {path} "
              f"({path.stat().st_size / 2 ** 20:.1f} MiB); peak memory {training.peak_memory(device)}")


# ----------------------------------------------------------------------------------------------


def set_file_sizes(config, sizes, source):
    """The keys a weights file decides, whatever the preset says, set in the config with one line each."""
    for key, value in sizes.items():
        if config[key] != value:
            print(f"{key} set to {value} by {source}")
            config[key] = value


def refuse_sd_switch(out_dir, config):
    """Before stage 1: a run made with --sd is not continued without it, nor one made without it with it
    (its stage 1 would be trained, or skipped, before stage 2's checkpoint said so)."""
    path = out_dir / "mask_ae.pt"  # every run has one
    files.refuse_special_file(path, "a checkpoint")
    if path.exists():
        saved = checkpoints.read_checkpoint(path)["config"].get("sd", "")
        if not isinstance(saved, str):
            raise ValueError(f"{path}: its config's sd is not a file name; {checkpoints.NOT_TRAIN_PY}")
        if bool(saved) != bool(config["sd"]):
            raise ValueError(f"{path} was trained {'with --sd ' + saved if saved else 'without --sd'}; "
                             f"resume it the same way or pass a new --out_dir")


def check_out_dir(out_dir):
    """--out_dir must be a folder, or not yet exist (it is made, with the folders above it)."""
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out_dir {out_dir}: {folder} is a file; give a folder, new or of an earlier "
                             f"train.py run")


@contextmanager
def holding(out_dir):
    """The output folder, held for the whole run: a second train.py run on it is refused in one line (the two
    would interleave their stages' checkpoints). Only rank 0 writes, so under torchrun only rank 0 holds it, for
    all the processes. Holding it, the temporary files a kill during a checkpoint's write left are removed (at
    Stable Diffusion sizes, GBs each)."""
    if not cli.is_main():
        yield
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only place: say which flag, not only the system's word
        raise ValueError(f"--out_dir {out_dir}: cannot make it ({error.strerror}); give a folder you can write to") \
            from None
    with files.run_lock(out_dir, "train.py run"):
        files.remove_stale_temporaries(out_dir, STAGE_FILES)
        yield


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_data_args(parser, several=True)
    preset = cli.chosen_preset(sys.argv[1:] if argv is None else argv)
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="size preset (default: toy with --toy, else sd with --sd, else mvtec)")
    parser.add_argument("--out_dir", help="where checkpoints and previews go (default: runs/<category>; several "
                                          "categories: runs/<a>+<b>+...; --category all: runs/all)")
    cli.add_config_args(parser, defaults=resolve(preset), title=f"config (the {preset} preset's defaults; --preset "
                        f"toy|mvtec|sd shows another's)")
    args = parser.parse_args(argv)
    overrides = cli.config_overrides(args)
    config = resolve(args.preset or default_preset(args.toy, overrides.get("sd")), overrides)
    _, world_size, device = cli.init_distributed(config["device"])  # torchrun: this process's GPU
    for key in ("vae_batch_size", "batch_size"):
        if config[key] % world_size:
            raise ValueError(f"--{key} {config[key]} does not split into {world_size} equal shares, one a process")
    names = cli.category_names(args)
    out_dir = Path(args.out_dir or Path("runs") / ("all" if args.category == "all" else "+".join(names)))
    check_out_dir(out_dir)
    with cli.main_first():  # checks every dataset before anything is written; rank 0 writes the toy world
        folders = [cli.category_folder(args, name) for name in names]
    torch.manual_seed(config["seed"])  # before any network is built: a resumed run builds the same ones
    clip_model = axf.build_clip(config, device)  # a bad --clip file stops here, before any writing
    set_file_sizes(config, {"context_dim": axf.clip_width(clip_model)}, f"the CLIP ({config['clip'] or 'random'})")
    pretrained_vae_weights = read_vae_weights(config)  # a bad --vae_weights file too
    backbone = None
    if config["sd"]:  # a bad --sd file too
        backbone = sd_backbone.load_backbone(config, device)
        set_file_sizes(config, sd_backbone.file_sizes(backbone), config["sd"])
        vae_from = f" (from {config['sd_vae']})" if config["sd_vae"] else ""
        print(f"{config['sd']}: UNet ({sum(p.numel() for p in backbone['unet'].parameters()):,} parameters, "
              f"{backbone['unet'].conv_in.in_channels} input channels), text encoder and VAE{vae_from}; "
              f"--train_unet {config['train_unet']}")
    print(f"config: {config}")
    train = load_training_set(folders, config)
    for name, n, m in zip(names, train["num_normals"], train["num_anomalies"]):
        print(f"{name}: {n} normal images, {m} few-shot anomalies of {len(train['categories'][name])} defect types")
    if len(names) > 1:  # a model of C categories takes C times a one-category run's steps: each gets as many
        totals = ", ".join(f"{len(names) * config[key]:,} {key}" for key in STAGE_STEPS)
        print(f"{len(names)} categories: the stages' steps are per category, {totals} in all")
    print(f"device {device}" + (f", {world_size} processes" if world_size > 1 else ""))
    with holding(out_dir):  # the first write: the folder is made if new
        refuse_sd_switch(out_dir, config)
        vae = backbone["vae"] if backbone else train_vae(train, config, out_dir, device, pretrained_vae_weights)
        mask_encoder = pretrain_mask_encoder(train, config, out_dir, device)
        train_axf(train, vae, mask_encoder, clip_model, config, out_dir, device, backbone)
    cli.finish_distributed()


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as error:  # a missing file, a folder in use, a bad value: one line, no traceback
        sys.exit(f"error: {error}")
