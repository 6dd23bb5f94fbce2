"""Evaluation of synthesised anomalies (paper §5), next to baselines on the same protocol, over seeds, with a
protocol stamp that makes a table citable. In reading order:
  SegmentationUNet, focal_loss        DRAEM's discriminative U-Net, trained on a method's anomalies (§5.3)
  draem_anomalies, crop_paste_anomalies, augmented_anomalies, METHODS   baselines: Perlin noise, crop-paste,
                                      flips/turns/jitter of the real few (`aug`), `real` (the few-shot real
                                      anomalies alone), `real+<method>` (real's batches, plus the method's in
                                      extra slots: the real anomalies are seen exactly as in `real`)
  augmented_mix, OPT_IN_METHODS       opt-in rows that mix the generated ones in: `real+aug+axf`, `real+crop_paste+axf`
  EVAL_KEYS, EVAL_PRESETS, resolve_eval_config   sizes and budgets, one table of config.py's Key rows: toy
                                      (CPU, minutes), mvtec (one GPU)
  train_segmenter, classification_accuracy   downstream models: fixed epochs, the last one is reported
  estimate_seconds, evaluate_method, markdown_table
  comma_list, output_files, write_results, main   the flags checked before any work (a malformed list, an --out
                                      that is no .json file, a .md beside it that evaluate.py did not write:
                                      one line each), the JSON and the table written atomically
The metrics (auroc, ..., kid, fid, au_pro, ic_lpips, generation_metrics), the protocol stamp and the leak
check live in metrics.py and are re-exported here. Protocol: train on a method's anomalies + the normal training
images; test on the held-out two thirds of the real anomalies (data.few_shot_split) plus all good test images.
"""
import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import cli
import data
from toy_checks import toy_checks
import files
import toy
from config import Key, within
from metrics import (LPIPS, _said, au_pro, auroc, average_precision, f1_max, fid, generation_metrics,  # noqa: F401
                     ic_lpips, inception_features, inception_probs, inception_score, kid, load_inception,
                     protocol_stamp, refuse_leaks, segmentation_scores)

# ----------------------------------------------------------------------------------------------
# Downstream segmenter: DRAEM's discriminative sub-network (Zavrtanik et al. 2021), taking the image
# alone as AnomalyDiffusion does; 5 poolings, so the image size must be a multiple of 32.


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(cin, cout):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegmentationUNet(nn.Module):
    """Image [B, 3, S, S] -> logits [B, 2, S, S] (normal, anomalous); widths base x (1, 2, 4, 8, 8, 8)."""

    def __init__(self, base=64):
        super().__init__()
        w = [base * m for m in (1, 2, 4, 8, 8, 8)]
        self.encoder = nn.ModuleList([_block(3, w[0])] + [_block(w[i], w[i + 1]) for i in range(5)])
        # decoder, deepest first: upsample, then a block over the concatenated skip connection
        self.ups = nn.ModuleList([_up(w[5], w[4]), _up(w[4], w[2]), _up(w[2], w[1]), _up(w[1], w[0]), _up(w[0], w[0])])
        self.blocks = nn.ModuleList([_block(w[4] + w[4], w[4]), _block(w[2] + w[3], w[2]),
                                     _block(w[1] + w[2], w[1]), _block(w[0] + w[1], w[0]), _block(w[0] + w[0], w[0])])
        self.out = nn.Conv2d(w[0], 2, 3, padding=1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()   # [B, 8w, S/32, S/32]
        for up, block in zip(self.ups, self.blocks):
            x = block(torch.cat([up(x), skips.pop()], 1))
        return self.out(x)   # [B, 2, S, S]


def focal_loss(logits, mask, gamma=2.0):
    """DRAEM's focal loss: -(1 - p_t)^gamma log p_t, with its 1e-5 smoothing of p_t."""
    p = logits.float().softmax(1)
    pt = torch.where(mask[:, 0] > 0.5, p[:, 1], p[:, 0]) + 1e-5
    return (-(1 - pt) ** gamma * pt.log()).mean()


# ----------------------------------------------------------------------------------------------
# Anomaly sets: (images [N, 3, S, S], masks [N, 1, S, S], defect index [N]) for each method. A defect's
# index is its position in the category's sorted list of defect types.


def draem_anomalies(normals, counts, g, size):
    """DRAEM's recipe: a Perlin-noise mask filled with another normal image or colour noise, blended.

    Without downloads there is no DTD texture set: the texture is a random other normal image (DRAEM's
    self-augmentation) or uniform colour noise. The defect label only spreads samples over the types."""
    out_images, out_masks, labels = [], [], []
    for d, n in counts.items():
        for _ in range(n):
            i, j = torch.randint(len(normals), (2,), generator=g).tolist()
            mask = data.perlin_mask(size, g)   # [1, S, S]
            texture = normals[j] if torch.rand(1, generator=g) < 0.5 else torch.rand(3, size, size, generator=g)
            opacity = 0.2 + 0.8 * torch.rand(1, generator=g)   # DRAEM: beta ~ U(0, 0.8), opacity = 1 - beta
            out_images.append(normals[i] * (1 - mask) + mask * (opacity * texture + (1 - opacity) * normals[i]))
            out_masks.append(mask)
            labels.append(d)
    return torch.stack(out_images), torch.stack(out_masks), torch.tensor(labels)


def crop_paste_anomalies(real, normals, counts, g):
    """Cut the masked pixels of a few-shot real anomaly and paste them onto a normal image at a random place."""
    images, masks, labels = real
    S = images.shape[-1]
    out_images, out_masks, out_labels = [], [], []
    for d, n in counts.items():
        pool = torch.nonzero((labels == d) & (masks.flatten(1).amax(1) > 0)).flatten()
        if len(pool) == 0:
            raise ValueError(f"crop_paste: no few-shot anomaly of defect type {d} keeps a mask pixel at {S} px")
        for _ in range(n):
            k = pool[torch.randint(len(pool), (1,), generator=g)].item()
            ys, xs = torch.nonzero(masks[k, 0], as_tuple=True)
            y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
            dy = torch.randint(S - (y1 - y0) + 1, (1,), generator=g).item() - y0   # shift keeps the box inside
            dx = torch.randint(S - (x1 - x0) + 1, (1,), generator=g).item() - x0
            mask, patch = (torch.roll(t[k], (dy, dx), (1, 2)) for t in (masks, images))
            normal = normals[torch.randint(len(normals), (1,), generator=g).item()]
            out_images.append(normal * (1 - mask) + patch * mask)
            out_masks.append(mask)
            out_labels.append(d)
    return torch.stack(out_images), torch.stack(out_masks), torch.tensor(out_labels)


def augmented_anomalies(real, counts, g):
    """The few-shot real anomalies again, each flipped, turned by a multiple of 90° (its mask with it) and
    colour-jittered (brightness and contrast x U(0.9, 1.1)): what one tries before synthesis."""
    images, masks, labels = real
    out_images, out_masks, out_labels = [], [], []
    for d, n in counts.items():
        pool = torch.nonzero(labels == d).flatten()
        for _ in range(n):
            k = pool[torch.randint(len(pool), (1,), generator=g)].item()
            image, mask = images[k], masks[k]
            if torch.rand(1, generator=g) < 0.5:
                image, mask = image.flip(-1), mask.flip(-1)
            turns = torch.randint(4, (1,), generator=g).item()
            image, mask = image.rot90(turns, (1, 2)), mask.rot90(turns, (1, 2))
            brightness, contrast = (0.9 + 0.2 * torch.rand(2, generator=g)).tolist()
            mean = image.mean()
            out_images.append(((image - mean) * contrast + mean * brightness).clamp(0, 1))
            out_masks.append(mask)
            out_labels.append(d)
    return torch.stack(out_images), torch.stack(out_masks), torch.tensor(out_labels)


def augmented_mix(real, generated, counts, g):
    """Per defect type, half the pool the real few augmented as `aug`, half the generated ones augmented alike: moved
    to new places and turns after they are drawn, where the generator draws worse (docs/results.md, "Wider places")."""
    shares = ((real, {d: n // 2 for d, n in counts.items()}), (generated, {d: n - n // 2 for d, n in counts.items()}))
    halves = [augmented_anomalies(source, share, g) for source, share in shares if sum(share.values())]
    return tuple(torch.cat(parts) for parts in zip(*halves))


METHODS = ("axf", "draem", "crop_paste", "aug", "real", "real+axf", "real+draem", "real+crop_paste", "real+aug")
OPT_IN_METHODS = ("real+aug+axf", "real+crop_paste+axf")   # named in --methods only: the default table keeps nine


# ----------------------------------------------------------------------------------------------
# The evaluation's settings: one table of config.py's Key rows (default, help, allowed values), the toy preset's
# defaults (a CPU, minutes); the mvtec preset (one GPU, the paper's 256 px recipe) overrides a few.

EVAL_KEYS = dict(
    seed=Key(0, "seeds the baselines' anomalies and KID's subsets; --seeds seeds the downstream models",
             range="0 <= x <= 4294967295"),
    image_size=Key(64, "images are resized to this many px square; the segmenter pools 5 times", range=">= 32",
                   multiple_of=32),
    seg_width=Key(8, "base width of the segmenter (DRAEM's: 64)", range=">= 1"),
    seg_epochs=Key(5, "segmenter epochs; an epoch is one pass over the normal training images, each batch half "
                      "anomalies", range=">= 1"),
    seg_lr=Key(1e-3, "segmenter Adam learning rate", range="> 0"),
    cls_epochs=Key(3, "ResNet-34 epochs, each as many anomalies as there are normal training images", range=">= 1"),
    cls_lr=Key(1e-3, "ResNet-34 Adam learning rate", range="> 0"),
    batch_size=Key(16, "batch size of the downstream models and of the feature extractors", range=">= 1"),
    pool_window=Key(21, "image score window at 256 px (DRAEM's), scaled with image_size", range=">= 1"),
    is_splits=Key(10, "Inception Score splits", range=">= 1"),
    kid_subsets=Key(100, "KID subsets of min(1000, generated, held-out) images per defect type", range=">= 1"),
)

EVAL_PRESETS = {
    "toy": dict(),
    # DRAEM trains 700 passes over the normal images with batch 8; here each step also sees as many anomalies
    "mvtec": dict(image_size=256, seg_width=64, seg_epochs=200, seg_lr=1e-4, cls_epochs=50, cls_lr=1e-4),
}


def allowed(key):
    """What a Key row allows, in words ('>= 32, a multiple of 32'): config.allowed_text for this table."""
    return ", ".join([key.range] + [f"a multiple of {key.multiple_of}"] * bool(key.multiple_of))


def add_eval_args(parser):
    """A `--key value` flag for each EVAL_KEYS row, typed like its default (cli.value_parser), with its help, its
    toy default and what it allows: cli.add_config_args for this table."""
    group = parser.add_argument_group("evaluation config (toy preset defaults shown; --preset mvtec changes some)")
    for name, key in EVAL_KEYS.items():
        group.add_argument(f"--{name}", type=cli.value_parser(key.default), default=None,
                           metavar=type(key.default).__name__.upper(),
                           help=f"{key.help} (default: {key.default}) [allowed: {allowed(key)}]".replace("%", "%%"))


def resolve_eval_config(preset, overrides=None):
    """The table's defaults, then the preset's values, then the overrides; each value checked against its row
    (one line listing every problem), as config.resolve checks a run's config."""
    eval_config = {**{name: key.default for name, key in EVAL_KEYS.items()}, **EVAL_PRESETS[preset],
                   "preset": preset, **(overrides or {})}
    problems = [f"--{name} must be {allowed(key)}, not {value}" for name, key in EVAL_KEYS.items()
                if not within(value := eval_config[name], key.range) or key.multiple_of and value % key.multiple_of]
    if problems:
        raise ValueError("; ".join(problems))
    return eval_config


def _epoch(n, steps, per_step, g):
    """Index batches [steps, per_step] into n items: permutations back to back, so each is seen evenly."""
    perm = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * per_step / n))])
    return perm[:steps * per_step].view(steps, per_step)


def _step(model, optimizer, x, y, loss_fn, device):
    """One optimiser step on a batch (x, y), under bf16 autocast on CUDA; the loss in float32, whatever autocast did."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(x.to(device))
    loss = loss_fn(out.float(), y.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _fit(model, lr, batches, total, loss_fn, desc, device):
    """Adam over a fixed number of (x, y) batches; the model after the last step is the one reported."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    bar = cli.progress(total, desc)
    for x, y in batches:
        loss = _step(model, optimizer, x, y, loss_fn, device)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    return model.eval()


def segmenter_batches(anomalies, normals, eval_config, g, extra=None, g_extra=None):
    """DRAEM's batches: half anomalies, half normal images (all-zero masks); an epoch is one pass over the normal
    images. With `extra` (real+<method>), as many of its anomalies again in extra slots, drawn by g_extra alone,
    so the anomaly and normal slots are exactly those of the run without it."""
    images, masks, _ = anomalies
    half = max(1, eval_config["batch_size"] // 2)
    steps = math.ceil(len(normals) / half)
    for _ in range(eval_config["seg_epochs"]):
        extra_idx = [None] * steps if extra is None else _epoch(len(extra[0]), steps, half, g_extra)
        for idx, normal_idx, e in zip(_epoch(len(images), steps, half, g), _epoch(len(normals), steps, half, g),
                                      extra_idx):
            x, y = [images[idx], normals[normal_idx]], [masks[idx], torch.zeros_like(masks[idx])]
            if e is not None:
                x, y = x + [extra[0][e]], y + [extra[1][e]]
            yield torch.cat(x), torch.cat(y)   # [2 or 3 x half, 3, S, S], [.., 1, S, S]


def train_segmenter(anomalies, normals, eval_config, device, g, extra=None, g_extra=None):
    """Fixed epochs of focal-loss training on segmenter_batches."""
    steps = math.ceil(len(normals) / max(1, eval_config["batch_size"] // 2))
    model = SegmentationUNet(eval_config["seg_width"]).to(device)
    return _fit(model, eval_config["seg_lr"], segmenter_batches(anomalies, normals, eval_config, g, extra, g_extra),
                eval_config["seg_epochs"] * steps, focal_loss, "segmenter", device)


@torch.no_grad()
def segmentation_metrics(model, test, eval_config, device):
    """The segmenter's anomaly maps of the test images, scored by metrics.segmentation_scores."""
    maps = torch.cat([model(x.to(device)).float().softmax(1)[:, 1:].cpu()
                      for x in test[0].split(eval_config["batch_size"])])   # [N, 1, S, S]
    window = max(1, round(eval_config["pool_window"] * eval_config["image_size"] / 256))
    return segmentation_scores(maps, test[1], test[2], window)


def build_resnet(num_classes, path=None):
    """torchvision ResNet-34, from scratch or from an ImageNet state dict (its fc head replaced)."""
    sd = None if path is None else files.read_state_dict(path, "ResNet-34", "--resnet")
    model = torchvision.models.resnet34(weights=None, num_classes=num_classes)
    if path is not None:
        missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")},
                                                    strict=False)   # the new head stays at its fresh init
        if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
            raise ValueError(f"{path}: not a torchvision ResNet-34 state dict (--resnet)")
    return model


def classification_accuracy(anomalies, test, num_classes, steps, eval_config, device, g, resnet_path=None,
                            extra=None, g_extra=None):
    """Train a ResNet-34 on a method's anomalies; accuracy over defect types on the held-out real ones.

    An epoch is `steps` batches (sized by the normal training set, as the segmenter's), so every method
    gets the same training budget however many anomalies it made; `extra` adds a batch of its own to each
    step, drawn by g_extra (as segmenter_batches does)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)   # ImageNet statistics
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images, labels = (anomalies[0] - mean) / std, anomalies[2]
    B, epochs = eval_config["batch_size"], range(eval_config["cls_epochs"])
    batches = ((images[idx], labels[idx]) for _ in epochs for idx in _epoch(len(images), steps, B, g))
    if extra is not None:
        extra_images = (extra[0] - mean) / std
        extra_batches = (idx for _ in epochs for idx in _epoch(len(extra_images), steps, B, g_extra))
        batches = ((torch.cat([x, extra_images[e]]), torch.cat([y, extra[2][e]]))
                   for (x, y), e in zip(batches, extra_batches))
    model = build_resnet(num_classes, resnet_path).to(device)
    model = _fit(model, eval_config["cls_lr"], batches, eval_config["cls_epochs"] * steps, F.cross_entropy,
                 "classifier", device)
    with torch.no_grad():
        pred = torch.cat([model(((x - mean) / std).to(device)).argmax(1).cpu()
                          for x in test[0].split(eval_config["batch_size"])])
    return float((pred == test[1]).double().mean())


def estimate_seconds(ctx, eval_config, device, runs):
    """`runs` trainings of both downstream models, from the time of each one's second step (the first warms up)."""
    B, S, seconds = eval_config["batch_size"], eval_config["image_size"], []
    for model, loss, y in ((SegmentationUNet(eval_config["seg_width"]), focal_loss, torch.zeros(B, 1, S, S)),
                           (build_resnet(len(ctx["defects"])), F.cross_entropy, torch.zeros(B, dtype=torch.long))):
        model = model.to(device).train()
        for _ in range(2):
            t0 = time.perf_counter()
            _step(model, torch.optim.Adam(model.parameters(), lr=1e-4), torch.rand(B, 3, S, S), y, loss, device)
        seconds.append(time.perf_counter() - t0)
    steps = (math.ceil(len(ctx["normals"]) / max(1, B // 2)) * eval_config["seg_epochs"],
             ctx["cls_steps"] * eval_config["cls_epochs"])
    return runs * (steps[0] * seconds[0] + steps[1] * seconds[1])   # a real+<method> run: up to 1.5x, 2x


# ----------------------------------------------------------------------------------------------
# One row of the table per method, its downstream metrics over the seeds, then the script.


def evaluate_method(material, ctx, eval_config, device, seeds, resnet_path=None):
    """Segmentation and classification of one method (material: its anomalies and the extra ones, anomaly_sets),
    trained once per seed: means, stds and every seed's value."""
    (anomalies, extra), runs = material, []
    for seed in seeds:
        torch.manual_seed(seed)   # the same network initialisation for every method
        g = torch.Generator().manual_seed(seed)   # the same draws of real and normal images as `real` makes
        g_extra = torch.Generator().manual_seed(seed + 2 ** 32)   # the extra slots' own draws
        segmenter = train_segmenter(anomalies, ctx["normals"], eval_config, device, g, extra, g_extra)
        runs.append({"segmentation": segmentation_metrics(segmenter, ctx["test"], eval_config, device),
                     "classification": {"accuracy": classification_accuracy(
                         anomalies, ctx["test_classes"], len(ctx["defects"]), ctx["cls_steps"], eval_config, device, g,
                         resnet_path, extra, g_extra)}})
    stat = lambda fn: {part: {k: fn([r[part][k] for r in runs]) for k in runs[0][part]} for part in runs[0]}
    sample_std = lambda values: float(np.std(values, ddof=1)) if len(values) > 1 else None  # one seed: no spread
    return {**stat(lambda values: float(np.mean(values))), "std": stat(sample_std),
            "per_seed": dict(zip(map(str, seeds), runs))}


def markdown_table(results, category, stamp):
    """IS, KID ×1000, FID, IC-LPIPS raw; the rest in percent as in the paper's tables, the mean ± sample std over
    seeds (n=1: the one seed's value)."""
    cols = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_au_pro", "image_auroc", "image_ap", "image_f1_max"]
    lines = [f"## {category}", "", "| method | IS | KID ×1000 | FID | IC-LPIPS | " + " | ".join(cols) + " | accuracy |",
             "| --- " * (len(cols) + 6) + "|"]
    pm = lambda v, scale=100, d=1: "-" if v is None else f"{v[0] * scale:.{d}f} ± {v[1] * scale:.{d}f}"
    one = lambda v, d: "-" if v is None else f"{v:.{d}f}"
    for name, row in results.items():
        gen = row["generation"]
        cells = [pm(gen["is"], 1, 2), pm(gen["kid"], 1000, 1), one(gen["fid"], 1), one(gen["ic_lpips"], 3)]
        seeds = lambda part, c: (f"{row[part][c] * 100:.1f} (n=1)" if row["std"][part][c] is None
                                 else pm((row[part][c], row["std"][part][c])))
        cells += [seeds(part, c) for part, c in [("segmentation", c) for c in cols] + [("classification", "accuracy")]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Protocol: {stamp['split']}. Few-shot per type {stamp['few_shot']}; test {stamp['test']}; "
              f"generated {stamp['generated']}; {stamp['combined']}. IC-LPIPS {stamp['ic_lpips']}; KID {stamp['kid']}. Epochs "
              f"{stamp['epochs']}, seeds {stamp['seeds']}, preset {stamp['preset']} ({stamp['image_size']} px). "
              f"Weights {stamp['weights']}. Commit {stamp['git_commit']}. `{stamp['command']}`"]
    return "\n".join(lines) + "\n"


def generator_of(folder):
    """(checkpoint, sampling settings) a sample.py folder was drawn with, as its manifest names them; None for
    what it does not name (another folder; a manifest older than the sampling settings)."""
    manifest = Path(folder) / ".axf_samples.json"  # sample.MANIFEST
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    path, sampling = (content.get(key) if isinstance(content, dict) else None for key in ("checkpoint", "sampling"))
    return (path if isinstance(path, str) and Path(path).is_file() else None,
            sampling if isinstance(sampling, dict) else None)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Evaluate synthesised anomalies (IS, KID, FID, IC-LPIPS; segmentation "
                                     "AUROC/AP/F1-max/AU-PRO; classification) next to baselines, over seeds.",
                                     epilog="The mvtec preset sets " + ", ".join(f"{k}={v}" for k, v in
                                                                                 EVAL_PRESETS["mvtec"].items()))
    arg = parser.add_argument
    arg("--category", required=True, help="category folder name, e.g. bottle")
    arg("--generated", required=True, help="the 'axf' row: sample.py's output folder (MVTec layout) or "
        "AnomalyDiffusion's <category>/ with <defect>/image/ and <defect>/mask/")
    arg("--data_root", default="data/mvtec", help="folder holding <category>/ in MVTec layout")
    arg("--toy", action="store_true", help="use the built-in toy dataset (made on first use)")
    arg("--preset", choices=sorted(EVAL_PRESETS), help="default: mvtec on a GPU for images >= 256 px, else toy")
    arg("--out", help="result JSON, with a .md table beside it (default out/evaluate_<category>.json); a .md "
        "there that evaluate.py did not write is never overwritten")
    arg("--inception", help="torchvision Inception-v3 state dict (IS, KID, FID), or 'random'")
    arg("--vgg", help="torchvision VGG16 state dict (LPIPS backbone for IC-LPIPS), or 'random'")
    arg("--resnet", help="torchvision ResNet-34 state dict for the classifier (default: from scratch)")
    arg("--methods", default=",".join(METHODS), help="comma-separated rows: axf (--generated), draem (Perlin noise), "
        "crop_paste (few-shot anomalies pasted), aug (the few-shot ones flipped, turned, jittered), real (the few-shot "
        "anomalies), real+<method> (real's batches, the method's anomalies in extra slots); not in the default: "
        "real+aug+axf (extra slots: half the real few, half the generated ones, each flipped, turned, jittered as aug), "
        "real+crop_paste+axf (extra slots: crop_paste's and the generated ones)")
    arg("--seeds", help="comma-separated seeds of the downstream models, e.g. 0,1,2 (default: the seed key)")
    arg("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    arg("--ckpt", help="with --toy, the generator's checkpoint, for the control checks (toy_checks.py; default: the "
        "one the --generated folder's manifest names), drawn with the folder's sampling settings, else the checkpoint's")
    add_eval_args(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args, {k: getattr(args, k) for k in EVAL_KEYS if getattr(args, k) is not None}


def choose_eval_config(args, overrides, category, device):
    """The evaluation's sizes and budgets: the preset (the paper's 256 px recipe only on a GPU for images of
    256 px or more), then the command line's overrides (resolve_eval_config), printed once."""
    with Image.open(category.train_good[0]) as im:
        side = min(im.size)
    preset = args.preset or ("mvtec" if device.type == "cuda" and side >= 256 and not args.toy else "toy")
    if not args.preset:
        print(f"preset {preset} ({side} px images, {device.type}); --preset mvtec|toy chooses")
    eval_config = resolve_eval_config(preset, overrides)
    print("evaluation config:", json.dumps(eval_config))
    if preset == "mvtec" and not args.resnet:  # said before any work: the accuracy column depends on it
        print("--resnet not given: the classifier (ResNet-34) trains from scratch; the recipe the paper's accuracies "
              "follow (AnomalyDiffusion's) fine-tunes ImageNet weights: pass torchvision's resnet34 state dict")
    return eval_config


def real_data(category, eval_config):
    """At the evaluation size: the normal training images, the few-shot anomalies (the baselines' material) and
    the test, held-out anomalies + good images, each image labelled by where it comes from."""
    S, (few, held) = eval_config["image_size"], data.few_shot_split(category.anomalies)
    if not category.test_good or not held:
        raise ValueError(f"{category.folder}: the test needs good test images and held-out anomalies, found "
                         f"{len(category.test_good)} and {len(held)}")
    normals, good = (torch.stack([data.read_image(p, S) for p in files]) for files in (category.train_good,
                                                                                       category.test_good))
    real, test = (data.read_anomalies(a, category.defects, S) for a in (few, held))
    print(f"{category.name}: {len(normals)} normal training images, {len(few)} few-shot anomalies, test: "
          f"{len(held)} held-out anomalies + {len(good)} good images; defects {category.defects}")
    return dict(defects=category.defects, normals=normals, real=real, held=test, held_anomalies=held,
                n_good=len(good), test_classes=(test[0], test[2]),
                cls_steps=math.ceil(len(normals) / eval_config["batch_size"]),
                test=(torch.cat([test[0], good]), torch.cat([test[1], torch.zeros(len(good), *test[1].shape[1:])]),
                      torch.cat([torch.ones(len(held)), torch.zeros(len(good))])))


def anomaly_sets(methods, generated, ctx, eval_config):
    """Each method's material: (anomalies, extra), each (images, masks, defect index) or None. The baselines make as
    many per defect type as were generated; real+<method> trains on the real ones, the method's in extra slots
    (real+crop_paste+axf: the crop_paste row's very pool and the generated ones, about half the slots each)."""
    counts = {d: n for d in range(len(ctx["defects"])) if (n := int((generated[2] == d).sum()))}
    g, normals, real = torch.Generator().manual_seed(eval_config["seed"]), ctx["normals"], ctx["real"]
    crop_paste = functools.cache(lambda: crop_paste_anomalies(real, normals, counts, g))   # once, before draem/aug
    make = {"axf": lambda: generated, "real": lambda: real, "crop_paste": crop_paste,
        "crop_paste+axf": lambda: tuple(torch.cat(parts) for parts in zip(crop_paste(), generated)),
        "draem": lambda: draem_anomalies(normals, counts, g, eval_config["image_size"]),
        "aug": lambda: augmented_anomalies(real, counts, g),
        # its own draws: the same pool whichever rows run beside it, and theirs unchanged by it
        "aug+axf": lambda: augmented_mix(real, generated, counts, torch.Generator().manual_seed(eval_config["seed"] + 1))}
    sets = {m: make[m]() for m in make if m in methods or f"real+{m}" in methods}
    return {m: (sets[m], None) if m in sets else (real, sets[m.removeprefix("real+")]) for m in methods}


# ----------------------------------------------------------------------------------------------
# The command line: every flag checked before any work, results written whole and beside no one else's file.

TABLE_MARK = "<!-- written by evaluate.py: a re-run may overwrite this table; it overwrites no other .md -->"


def comma_list(flag, text, convert, example):
    """A comma-separated flag's values: an empty item, a value `convert` refuses or a repeat is one line naming
    the flag."""
    items = [item.strip() for item in text.split(",")]
    try:
        values = [convert(item) for item in items]
    except ValueError:
        values = []
    if not all(items) or not values or len(set(values)) != len(values):
        kind = "integers" if convert is int else "names"
        raise ValueError(f"{flag} {text!r}: expected distinct {kind} separated by commas, e.g. {flag} {example}")
    return values


def output_files(args):
    """--out and the table beside it, checked before any work, since a refusal at the end would lose the results:
    a .json file name in a folder that can be written, and a .md table beside it that is absent or written by
    evaluate.py (its first line is TABLE_MARK): a user's notes.md is never overwritten."""
    out = Path(args.out or f"out/evaluate_{args.category}.json")
    table = out.with_suffix(".md")
    if out.suffix.lower() != ".json" or out.is_dir():
        raise ValueError(f"--out {out}: expected a .json file name (the table is written beside it as .md)")
    existing = next(p for p in out.parents if p.exists())   # the folder it goes in, or the nearest one there is
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"--out {out}: {existing} is not a folder this process can write in")
    if table.exists() and not written_by_evaluate(table):
        raise ValueError(f"--out {out}: the table would overwrite {table}, which evaluate.py did not write; "
                         f"move it, or pass another --out")
    return out, table


def written_by_evaluate(table):
    """Whether a .md file is a table evaluate.py wrote: its first line is TABLE_MARK."""
    try:
        with open(table, encoding="utf-8") as f:
            return f.readline().rstrip("\n") == TABLE_MARK
    except (OSError, UnicodeDecodeError):   # a folder, unreadable, or not text
        return False


def write_results(out, table, results, text):
    """The JSON and the marked table, each written whole or not at all (files.atomic_write)."""
    for path, content in ((out, json.dumps(results, indent=2) + "\n"), (table, f"{TABLE_MARK}\n{text}")):
        with files.atomic_write(path) as tmp:
            tmp.write_text(content, encoding="utf-8")


def main(argv=None):
    args, overrides = parse_args(argv)
    _said.clear()   # each run explains its nulls
    methods = comma_list("--methods", args.methods, str, "axf,draem,real")
    if unknown := sorted(set(methods) - set(METHODS + OPT_IN_METHODS)):
        raise ValueError(f"--methods: unknown {unknown}; choose from {','.join(METHODS + OPT_IN_METHODS)}")
    seeds = (comma_list("--seeds", args.seeds, int, "0,1,2") if args.seeds is not None
             else [overrides.get("seed", EVAL_KEYS["seed"].default)])
    out, table_path = output_files(args)
    device = cli.pick_device(args.device)
    start = time.time()

    category = data.load_category(toy.ensure_toy(args.category) if args.toy else Path(args.data_root) / args.category)
    eval_config = choose_eval_config(args, overrides, category, device)
    ctx = real_data(category, eval_config)
    gen_anomalies = data.load_generated(args.generated)   # only its anomalies, never one of the test images
    if unknown := sorted({a.defect for a in gen_anomalies} - set(ctx["defects"])):
        raise ValueError(f"{args.generated}: defect types {unknown} are not in {category.folder}")
    refuse_leaks(gen_anomalies, ctx["held_anomalies"])
    generated = data.read_anomalies(gen_anomalies, ctx["defects"], eval_config["image_size"])
    sets = anomaly_sets(methods, generated, ctx, eval_config)

    if args.resnet:   # read now, not when the first method's segmenter has trained
        build_resnet(len(ctx["defects"]), args.resnet)
    inception = load_inception(args.inception, device) if args.inception else None
    lpips = LPIPS(args.vgg).to(device) if args.vgg else None
    if inception is not None:   # the held-out anomalies' features, for KID and FID of every method
        ctx["held_features"] = inception_features(inception, ctx["held"][0], eval_config["batch_size"])[0]
    eta = estimate_seconds(ctx, eval_config, device, len(methods) * len(seeds))
    preset = eval_config["preset"]
    print(f"estimated time for the downstream models: {eta / 60:.1f} min ({len(methods)} methods x {len(seeds)} seeds"
          f" on {device.type}, preset {preset})" + (" -- on a CPU, --preset toy takes minutes"
                                                    if preset != "toy" and device.type == "cpu" else ""))
    results = {}
    for i, name in enumerate(methods, 1):  # a line each (a bar around the models' own bars would nest them)
        anomalies, extra = sets[name]
        gen = (dict.fromkeys(("is", "ic_lpips", "kid", "fid")) if extra is not None  # its parts have rows
               else generation_metrics(anomalies, ctx, eval_config, device, inception, lpips))
        results[name] = {"generation": gen,
                         **evaluate_method(sets[name], ctx, eval_config, device, seeds, args.resnet)}
        count = f"{len(anomalies[0])}" + ("" if extra is None else f" + {len(extra[0])} in extra slots")
        print(f"{i}/{len(methods)} {name} ({count} anomalies): {json.dumps(results[name]['segmentation'])}")

    stamp = protocol_stamp(args, eval_config, seeds, ctx, generated)
    table = markdown_table(results, args.category, stamp)
    results["protocol"] = stamp
    if args.toy:
        checkpoint, sampling = generator_of(args.generated)
        results["toy_checks"] = toy_checks(gen_anomalies, generated, category, eval_config, device,
                                           args.ckpt or checkpoint, sampling)
        table += "\ntoy checks of the generated anomalies: " + json.dumps(results["toy_checks"]) + "\n"
    write_results(out, table_path, results, table)
    print(table + f"\nwrote {out} and {table_path} in {time.time() - start:.0f} s")
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, PermissionError, ValueError) as error:
        raise SystemExit(f"error: {error}")
