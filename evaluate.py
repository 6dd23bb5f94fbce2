"""Evaluation of synthesised anomalies (paper §5): generation quality and downstream perception.

What this file holds, in reading order:
  auroc, average_precision, f1_max   exact ranking metrics on flat arrays (scikit-learn's definitions)
  inception_score, inception_probs   IS (§5.1) from class probabilities or from images + Inception-v3 weights
  LPIPS, ic_lpips                    the LPIPS (VGG) distance and IC-LPIPS, the diversity metric of §5.1
  SegmentationUNet, focal_loss       DRAEM's discriminative U-Net, trained on synthesised anomalies (§5.3)
  draem_anomalies, crop_paste_anomalies, oracle_anomalies   the baselines, on the same protocol
  evaluate_method, main              one table row per method -> JSON + markdown table

Protocol (DESIGN.md "Evaluation protocol"): the segmenter and the ResNet-34 classifier are trained on
a method's anomalies (+ normal training images), tested on the held-out two thirds of the real
anomalies (data.few_shot_split) plus all good test images; fixed epochs, the last one is reported.
Depends on data.py (MVTec layout reading, few-shot split, Perlin masks) and torchvision architectures.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import data

HERE = Path(__file__).parent
LPIPS_LIN = HERE / "lpips_vgg_lin.pth"   # official LPIPS v0.1 linear layers (vgg.pth of lpips 0.1.4, BSD-2)

# ----------------------------------------------------------------------------------------------
# Ranking metrics. One descending sort, cumulative sums of positives/negatives, and ties grouped by
# keeping only the last index of each run of equal scores: every distinct score is one threshold,
# exactly as scikit-learn's _binary_clf_curve does it.


def _binary_curve(scores, labels):
    """True/false positive counts at each distinct threshold, highest threshold first."""
    scores, labels = (np.asarray(a.detach().cpu() if torch.is_tensor(a) else a).ravel() for a in (scores, labels))
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} vs {labels.size}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("labels contain a single class; the metric needs positives and negatives")
    order = np.argsort(scores)[::-1]   # any sort will do: tied scores are grouped just below
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), scores.size - 1]   # end of each tie run
    tps = np.cumsum(labels, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def auroc(scores, labels):
    """Area under the ROC curve (trapezoids between distinct thresholds = ties count one half)."""
    tps, fps = _binary_curve(scores, labels)
    tpr, fpr = np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(scores, labels):
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds (scikit-learn's, no interpolation)."""
    tps, fps = _binary_curve(scores, labels)
    precision, recall = tps / (tps + fps), tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(scores, labels):
    """Best F1 = 2PR/(P+R) over every distinct threshold (not a 0.05 sweep, unlike AnomalyDiffusion)."""
    tps, fps = _binary_curve(scores, labels)
    precision, recall = tps / (tps + fps), tps / tps[-1]
    f1 = np.divide(2 * precision * recall, precision + recall,
                   out=np.zeros_like(precision), where=precision + recall > 0)
    return float(f1.max())


# ----------------------------------------------------------------------------------------------
# Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), per split, mean and std.


def inception_score(probs, splits=10):
    """IS of class probabilities [N, C]; returns (mean, std) over `splits` equal chunks."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"inception_score needs probs [N, C] with N >= splits={splits}, got {tuple(p.shape)}")
    n = len(p) // splits   # the standard implementation's equal chunks (a remainder is dropped)
    parts = (p / p.sum(1, keepdim=True))[:n * splits].view(splits, n, -1)   # [splits, n, C]
    py = parts.mean(1, keepdim=True).expand_as(parts)   # p(y) of each split
    # xlogy gives 0 log 0 = 0: a one-hot row must not turn the KL into NaN
    scores = (torch.xlogy(parts, parts) - torch.xlogy(parts, py)).sum(2).mean(1).exp()   # [splits]
    return float(scores.mean()), float(scores.std(unbiased=False))   # np.std, as the reference code


def load_inception(path, device):
    """torchvision's Inception-v3 with the user's weights; sizes (classes, aux head) read from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Inception-v3 weights file not found (--inception)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = torchvision.models.inception_v3(
        weights=None, num_classes=sd["fc.weight"].shape[0], init_weights=False, transform_input=False,
        aux_logits=any(k.startswith("AuxLogits.") for k in sd))
    model.load_state_dict(sd)
    return model.eval().to(device)


@torch.no_grad()
def inception_probs(model, images, batch_size=32):
    """p(y|x) [N, C] of images [N, 3, S, S] in [0, 1]."""
    device = next(model.parameters()).device
    out = []
    for x in images.split(batch_size):
        x = F.interpolate(x.to(device).float(), size=(299, 299), mode="bilinear", align_corners=False)
        # torchvision's weights come from TensorFlow, which expects [-1, 1]: this is what its
        # transform_input=True does to ImageNet-normalised input, done here directly
        out.append(model(2 * x - 1).float().softmax(1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018), VGG variant: features at relu1_2 .. relu5_3, unit-normalised over
# channels, squared difference, a learned 1x1 layer per level, spatial mean, summed over levels.


class LPIPS(nn.Module):
    """LPIPS distance d(x, y) -> [B] for images in [0, 1]; VGG16 backbone and linear layers from files."""

    slices = (4, 9, 16, 23, 30)   # vgg16.features indices just after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, vgg_path=None, lin_path=LPIPS_LIN):
        super().__init__()
        if vgg_path is not None and not Path(vgg_path).is_file():
            raise FileNotFoundError(f"{vgg_path}: VGG16 weights file not found (--vgg)")
        # torchvision's vgg16().features (config "D"), without building the 120M-parameter classifier
        self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])[:30]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        # the official ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        if vgg_path is not None:
            sd = torch.load(vgg_path, map_location="cpu", weights_only=True)
            # a full torchvision vgg16 state dict ("features.0.weight", ...) or its features alone
            sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}
            self.features.load_state_dict(sd)
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)   # keys lin{k}.model.1.weight
        for k, layer in enumerate(self.lins):
            layer.weight.data.copy_(lin[f"lin{k}.model.1.weight"])
        self.eval().requires_grad_(False)

    def levels(self, x):
        """Channel-unit-normalised features at the five levels."""
        h, out, start = (2 * x - 1 - self.shift) / self.scale, [], 0
        for end in self.slices:
            h = self.features[start:end](h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))   # lpips.normalize_tensor
            start = end
        return out

    def forward(self, x, y):
        fx, fy = self.levels(x), self.levels(y)
        return sum(lin((a - b) ** 2).mean((2, 3)) for lin, a, b in zip(self.lins, fx, fy)).flatten()


@torch.no_grad()
def ic_lpips(generated, centres, lpips_fn, batch_size=32):
    """Intra-cluster pairwise LPIPS (Ojha et al. 2021, as AnomalyDiffusion computes it).

    generated [N, 3, S, S] joins the nearest of centres [M, 3, S, S] (the few-shot real anomalies) by
    LPIPS; the mean pairwise LPIPS within each cluster of >= 2 images, averaged over clusters.
    """
    def dist(a, b, ia, ib):   # d(a[ia[k]], b[ib[k]]) for every k, a batch of pairs at a time
        pairs = zip(ia.split(batch_size), ib.split(batch_size))
        return torch.cat([lpips_fn(a[i], b[j]).float().cpu() for i, j in pairs])

    N, M = len(generated), len(centres)
    to_centre = dist(generated, centres, torch.arange(N).repeat_interleave(M), torch.arange(M).repeat(N))
    nearest = to_centre.view(N, M).argmin(1)   # [N]: each generated image's cluster
    cluster_means = []
    for c in range(M):
        members = generated[nearest == c]
        if len(members) < 2:
            continue   # a pair is needed for a distance: singleton clusters are dropped
        i, j = torch.triu_indices(len(members), len(members), offset=1)   # every unordered pair once
        cluster_means.append(dist(members, members, i, j).mean())
    if not cluster_means:
        raise ValueError("no IC-LPIPS cluster holds 2 or more images")
    return float(torch.stack(cluster_means).mean())


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
# Anomaly sets: (images [N, 3, S, S], masks [N, 1, S, S], defect index [N]) for each method.


def read_anomalies(anomalies, defects, size):
    return (torch.stack([data.read_image(a.image, size) for a in anomalies]),
            torch.stack([data.read_mask(a, size) for a in anomalies]),
            torch.tensor([defects.index(a.defect) for a in anomalies]))


def oracle_anomalies(real, counts):
    """The few-shot real anomalies themselves, cycled up to each defect type's count."""
    images, masks, labels = real
    idx = torch.cat([torch.nonzero(labels == d).flatten().repeat(n)[:n] for d, n in counts.items()])
    return images[idx], masks[idx], labels[idx]


def draem_anomalies(normals, counts, g, size):
    """DRAEM's recipe: a Perlin-noise mask filled with another normal image or colour noise, blended.

    Without downloads there is no DTD texture set: the texture is a random other normal image (DRAEM's
    self-augmentation) or uniform colour noise. The defect label only spreads samples over the types.
    """
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


# ----------------------------------------------------------------------------------------------
# The evaluation config: sizes and budgets, with a toy (CPU, minutes) and an MVTec (one GPU) preset.

EVAL_CONFIG = dict(
    seed=0,
    image_size=64,
    seg_width=8,           # base width of the segmenter (DRAEM: 64)
    seg_epochs=8,          # an epoch: one pass over the normal training images, each batch half anomalies
    seg_lr=1e-3,
    cls_epochs=5,          # ResNet-34 epochs, each as many anomalies as there are normal training images
    cls_lr=1e-3,
    batch_size=16,
    pool_window=21,        # image score window at 256 px (DRAEM), scaled with image_size
    is_splits=10,
)

EVAL_PRESETS = {
    "toy": dict(),
    # DRAEM trains 700 passes over the normal images with batch 8; here each step also sees as many anomalies
    "mvtec": dict(image_size=256, seg_width=64, seg_epochs=200, seg_lr=1e-4, cls_epochs=50, cls_lr=1e-4),
}


def _epoch(n, steps, per_step, g):
    """Index batches [steps, per_step] into n items: permutations back to back, so each is seen evenly."""
    perm = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * per_step / n))])
    return perm[:steps * per_step].view(steps, per_step)


def _fit(model, lr, batches, total, loss_fn, desc, device):
    """Adam over a fixed number of (x, y) batches; the model after the last step is the one reported."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    for x, y in (bar := tqdm(batches, total=total, desc=desc, leave=False)):
        with autocast:
            out = model(x.to(device))
        loss = loss_fn(out.float(), y.to(device))   # the loss in float32, whatever autocast did
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()


def train_segmenter(anomalies, normals, cfg, device, g):
    """Fixed epochs of focal-loss training, each batch half anomalies and half normal images (DRAEM)."""
    images, masks, _ = anomalies
    half = max(1, cfg["batch_size"] // 2)
    steps = math.ceil(len(normals) / half)   # an epoch: one pass over the normal images, as many anomalies

    def batches():
        for _ in range(cfg["seg_epochs"]):
            for idx, normal_idx in zip(_epoch(len(images), steps, half, g), _epoch(len(normals), steps, half, g)):
                yield (torch.cat([images[idx], normals[normal_idx]]),   # [2*half, 3, S, S]
                       torch.cat([masks[idx], torch.zeros_like(masks[idx])]))   # normal: all-zero masks

    model = SegmentationUNet(cfg["seg_width"]).to(device)
    return _fit(model, cfg["seg_lr"], batches(), cfg["seg_epochs"] * steps, focal_loss, "segmenter", device)


@torch.no_grad()
def segmentation_metrics(model, test_images, test_masks, cfg, device):
    """Pixel metrics over all test pixels pooled; image score = max of the average-pooled anomaly map."""
    maps = torch.cat([model(x.to(device)).float().softmax(1)[:, 1:].cpu()
                      for x in test_images.split(cfg["batch_size"])])   # [N, 1, S, S]
    k = max(1, round(cfg["pool_window"] * cfg["image_size"] / 256)) | 1   # odd, so the map keeps its size
    image_scores = F.avg_pool2d(maps, k, stride=1, padding=k // 2).flatten(1).max(1).values
    image_labels = test_masks.flatten(1).amax(1) > 0
    pixel_scores, pixel_labels = maps.flatten().numpy(), test_masks.flatten().numpy() > 0.5
    return dict(pixel_auroc=auroc(pixel_scores, pixel_labels), pixel_ap=average_precision(pixel_scores, pixel_labels),
                pixel_f1_max=f1_max(pixel_scores, pixel_labels), image_auroc=auroc(image_scores, image_labels),
                image_ap=average_precision(image_scores, image_labels), image_f1_max=f1_max(image_scores, image_labels))


def build_resnet(num_classes, path=None):
    """torchvision ResNet-34, from scratch or from an ImageNet state dict (its fc head replaced)."""
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{path}: ResNet-34 weights file not found (--resnet)")
    model = torchvision.models.resnet34(weights=None, num_classes=num_classes)
    if path is not None:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")},
                                                    strict=False)   # the new head stays at its fresh init
        if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
            raise ValueError(f"{path}: not a torchvision ResNet-34 state dict (--resnet)")
    return model


def classification_accuracy(anomalies, test, num_classes, steps, cfg, device, g, resnet_path=None):
    """Train a ResNet-34 on a method's anomalies; accuracy over defect types on the held-out real ones.

    An epoch is `steps` batches (sized by the normal training set, as the segmenter's), so every method
    gets the same training budget however many anomalies it made.
    """
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)   # ImageNet statistics
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images, labels = (anomalies[0] - mean) / std, anomalies[2]
    batches = ((images[idx], labels[idx]) for _ in range(cfg["cls_epochs"])
               for idx in _epoch(len(images), steps, cfg["batch_size"], g))
    model = build_resnet(num_classes, resnet_path).to(device)
    model = _fit(model, cfg["cls_lr"], batches, cfg["cls_epochs"] * steps, F.cross_entropy, "classifier", device)
    with torch.no_grad():
        pred = torch.cat([model(((x - mean) / std).to(device)).argmax(1).cpu()
                          for x in test[0].split(cfg["batch_size"])])
    return float((pred == test[1]).double().mean())


# ----------------------------------------------------------------------------------------------
# One row of the table per method, then the script.

_said = set()


def null_because(reason):
    """A metric that cannot be computed is null; its reason is printed once per run."""
    if reason not in _said:
        _said.add(reason)
        print(f"null: {reason}")
    return None


def generation_metrics(anomalies, real, num_defects, cfg, device, inception=None, lpips=None):
    """IS and IC-LPIPS per defect type, averaged over the defect types that have anomalies."""
    images, _, labels = anomalies
    is_rows, ic_rows = [], []
    for d in range(num_defects):
        generated = images[labels == d]
        if len(generated) == 0:
            continue
        if inception is not None:
            probs = inception_probs(inception, generated, cfg["batch_size"])
            is_rows.append(inception_score(probs, splits=min(cfg["is_splits"], len(generated))))
        if lpips is not None:
            centres = real[0][real[2] == d]
            try:
                ic_rows.append(ic_lpips(generated, centres, lambda a, b: lpips(a.to(device), b.to(device)),
                                        cfg["batch_size"]))
            except ValueError:
                null_because("IC-LPIPS skips defect types whose clusters all hold fewer than 2 images")
    is_value = (null_because("IS needs Inception-v3 weights: pass --inception PATH") if inception is None
                else [float(np.mean([m for m, _ in is_rows])), float(np.mean([s for _, s in is_rows]))])
    ic_value = (null_because("IC-LPIPS needs torchvision VGG16 weights: pass --vgg PATH") if lpips is None
                else null_because("IC-LPIPS: no defect type has a cluster of 2 or more images") if not ic_rows
                else float(np.mean(ic_rows)))
    return {"is": is_value, "ic_lpips": ic_value}


def evaluate_method(anomalies, ctx, cfg, device, inception=None, lpips=None, resnet_path=None):
    """The JSON row of one method: generation, segmentation and classification metrics."""
    torch.manual_seed(cfg["seed"])   # the same network initialisation for every method
    g = torch.Generator().manual_seed(cfg["seed"])
    row = {"generation": generation_metrics(anomalies, ctx["real"], len(ctx["defects"]), cfg, device, inception, lpips)}
    segmenter = train_segmenter(anomalies, ctx["normals"], cfg, device, g)
    row["segmentation"] = segmentation_metrics(segmenter, ctx["test_images"], ctx["test_masks"], cfg, device)
    steps = math.ceil(len(ctx["normals"]) / cfg["batch_size"])   # an epoch: as many anomalies as normal images
    row["classification"] = {"accuracy": classification_accuracy(
        anomalies, ctx["test_classes"], len(ctx["defects"]), steps, cfg, device, g, resnet_path)}
    return row


def markdown_table(results, category):
    """The rows as a markdown table: IS raw, IC-LPIPS raw, the rest in percent as in the paper's tables."""
    cols = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "image_auroc", "image_ap", "image_f1_max"]
    lines = [f"## {category}", "", "| method | IS | IC-LPIPS | " + " | ".join(cols) + " | accuracy |",
             "| --- " * (len(cols) + 4) + "|"]
    fmt = lambda v, scale=100, digits=1: "-" if v is None else f"{v * scale:.{digits}f}"
    for name, row in results.items():
        is_value = row["generation"]["is"]
        cells = ["-" if is_value is None else f"{is_value[0]:.2f} ± {is_value[1]:.2f}",
                 fmt(row["generation"]["ic_lpips"], 1, 3)]
        cells += [fmt(row["segmentation"][c]) for c in cols] + [fmt(row["classification"]["accuracy"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Toy-world checks (--toy): does the picture follow the caption, and is the defect type recognisable?


def toy_checks(gen_anomalies, generated, category, cfg, device, steps=1500, judge_root=data.TOY_ROOT / "judge", seeds=5):
    """Caption colour drawn in the mask (data.drawn_colour), and the defect type a judge assigns. The judge trains on
    `seeds` other toy worlds' real anomalies, turned and mirrored; its accuracy on this one's real anomalies is known."""
    hits = [data.drawn_colour(image, mask) == data.caption_colour(a.caption)
            for a, image, mask in zip(gen_anomalies, generated[0], generated[1]) if data.caption_colour(a.caption)]
    colour = sum(hits) / len(hits) if hits else None
    fresh = [a for seed in range(1, seeds + 1) for a in data.load_category(
        data.ensure_toy(category.name, Path(judge_root) / f"seed{seed}", seed=seed)).anomalies]
    train, check = (read_anomalies(a, category.defects, cfg["image_size"]) for a in (fresh, category.anomalies))
    torch.manual_seed(cfg["seed"])
    widths = (3, 32, 64, 96, 128)  # a small CNN: the defect type from the image alone
    judge = nn.Sequential(*[layer for cin, cout in zip(widths, widths[1:]) for layer in (
        nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], len(category.defects))).to(device)
    mirror = lambda x, k: x.flip(3) if k % 8 >= 4 else x  # with k % 4 quarter turns: the square's 8 symmetries
    batches = ((mirror(train[0][idx].rot90(k % 4, (2, 3)), k), train[2][idx]) for k, idx in enumerate(
        _epoch(len(train[0]), steps, cfg["batch_size"], torch.Generator().manual_seed(cfg["seed"]))))
    judge = _fit(judge, 1e-3, batches, steps, F.cross_entropy, "toy judge", device)
    with torch.no_grad():
        accuracy = lambda images, labels: float((judge(images.to(device)).argmax(1).cpu() == labels).double().mean())
        return {"colour_named_is_drawn": colour, "judge_accuracy_on_real": accuracy(check[0], check[2]),
                "defect_type_recognised": accuracy(generated[0], generated[2])}


METHODS = ("axf", "draem", "crop_paste", "oracle")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Evaluate synthesised anomalies (IS, IC-LPIPS, segmentation AUROC/AP/F1-max, "
                    "classification accuracy) next to the DRAEM, crop-paste and oracle baselines.",
        epilog="The mvtec preset sets " + ", ".join(f"{k}={v}" for k, v in EVAL_PRESETS["mvtec"].items()))
    parser.add_argument("--category", required=True, help="category folder name, e.g. bottle")
    parser.add_argument("--generated", required=True, help="sample.py's MVTec-layout folder: the 'axf' row")
    parser.add_argument("--data_root", default="data/mvtec", help="folder holding <category>/ in MVTec layout")
    parser.add_argument("--toy", action="store_true", help="use the built-in toy dataset (made on first use)")
    parser.add_argument("--preset", choices=sorted(EVAL_PRESETS), help="default: toy with --toy, else mvtec")
    parser.add_argument("--out", help="result JSON, with a .md table beside it (default out/evaluate_<category>.json)")
    parser.add_argument("--inception", help="torchvision Inception-v3 state dict file; without it IS is null")
    parser.add_argument("--vgg", help="torchvision VGG16 state dict file (LPIPS backbone); without it IC-LPIPS is null")
    parser.add_argument("--resnet", help="torchvision ResNet-34 state dict for the classifier (default: from scratch)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated rows: axf (--generated), draem "
                        "(Perlin noise), crop_paste (few-shot anomalies pasted), oracle (the few-shot anomalies)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    for key, default in EVAL_CONFIG.items():
        parser.add_argument(f"--{key}", type=type(default), help=f"evaluation config (toy default: {default})")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in EVAL_CONFIG if getattr(args, k) is not None}
    return args, overrides


def main(argv=None):
    args, overrides = parse_args(argv)
    _said.clear()   # each run explains its nulls
    preset = args.preset or ("toy" if args.toy else "mvtec")
    cfg = {**EVAL_CONFIG, **EVAL_PRESETS[preset], "preset": preset, **overrides}
    print("evaluation config:", json.dumps(cfg))
    S = cfg["image_size"]
    if S % 32:
        raise ValueError(f"image_size={S}: the segmenter pools 5 times, so it must be a multiple of 32")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        raise ValueError(f"--methods: unknown {sorted(set(methods) - set(METHODS))}; choose from {','.join(METHODS)}")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()

    # the real data: few-shot anomalies (baselines' material), held-out anomalies + good images (test)
    folder = data.ensure_toy(args.category) if args.toy else Path(args.data_root) / args.category
    category = data.load_category(folder)
    defects = category.defects
    few, held = data.few_shot_split(category.anomalies)
    if not category.test_good or not held:
        raise ValueError(f"{folder}: the test needs good test images and held-out anomalies, found "
                         f"{len(category.test_good)} and {len(held)}")
    normals = torch.stack([data.read_image(p, S) for p in category.train_good])
    real = read_anomalies(few, defects, S)
    test_held = read_anomalies(held, defects, S)
    test_good = torch.stack([data.read_image(p, S) for p in category.test_good])
    ctx = dict(defects=defects, normals=normals, real=real, test_classes=(test_held[0], test_held[2]),
               test_images=torch.cat([test_held[0], test_good]),
               test_masks=torch.cat([test_held[1], torch.zeros(len(test_good), 1, S, S)]))
    print(f"{args.category}: {len(normals)} normal training images, {len(few)} few-shot anomalies, "
          f"test: {len(held)} held-out anomalies + {len(test_good)} good images; defects {defects}")

    gen_anomalies = data.load_category(Path(args.generated)).anomalies
    if not gen_anomalies:
        raise ValueError(f"{args.generated}: no anomalies found under test/<defect>/")
    if {a.defect for a in gen_anomalies} - set(defects):
        raise ValueError(f"{args.generated}: defect types {sorted({a.defect for a in gen_anomalies} - set(defects))} "
                         f"are not in {folder}")
    generated = read_anomalies(gen_anomalies, defects, S)
    counts = {d: n for d in range(len(defects)) if (n := int((generated[2] == d).sum()))}   # baselines match these

    inception = load_inception(args.inception, device) if args.inception else None
    lpips = LPIPS(args.vgg).to(device) if args.vgg else None
    g, results = torch.Generator().manual_seed(cfg["seed"]), {}
    for name in tqdm(methods, desc="methods"):
        anomalies = {"axf": lambda: generated,
                     "draem": lambda: draem_anomalies(normals, counts, g, S),
                     "crop_paste": lambda: crop_paste_anomalies(real, normals, counts, g),
                     "oracle": lambda: oracle_anomalies(real, counts)}[name]()
        results[name] = evaluate_method(anomalies, ctx, cfg, device, inception, lpips, args.resnet)
        tqdm.write(f"{name} ({len(anomalies[0])} anomalies): {json.dumps(results[name])}")

    table = markdown_table(results, args.category)
    if args.toy:
        results["toy_checks"] = toy_checks(gen_anomalies, generated, category, cfg, device)
        table += "\ntoy checks of the generated anomalies: " + json.dumps(results["toy_checks"]) + "\n"
    out = Path(args.out or f"out/evaluate_{args.category}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {time.time() - start:.0f} s")
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
