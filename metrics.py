"""The metrics of the evaluation (paper §5), each checked against a reference implementation in tests/.

What this file holds, in reading order:
  auroc, average_precision, f1_max   exact ranking metrics on flat arrays (scikit-learn's definitions)
  au_pro, segmentation_scores        per-region overlap up to 30% FPR (MVTec AD's AU-PRO); all pixel/image scores
  load_inception, inception_features Inception-v3 from the user's file: pool features and p(y|x), once per image
  inception_score, kid, fid          IS (§5.1), KID (Bińkowski et al. 2018) and FID (Heusel et al. 2017)
  LPIPS, ic_lpips                    the LPIPS (VGG) distance and IC-LPIPS, the diversity metric of §5.1
  generation_metrics                 IS, KID, FID, IC-LPIPS per defect type and their means
  protocol_stamp, refuse_leaks       what makes a table citable: the protocol written down, no test image leaked
  bench_rows                         timing of one defect type's generation metrics, for bench.py
evaluate.py re-exports the public names (evaluate.auroc, evaluate.kid, ...). Depends on torch,
torchvision (architectures only: every weight comes from a file the user gives), numpy and pillow.
"""
import hashlib
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import files

HERE = Path(__file__).parent
LPIPS_LIN = HERE / "lpips_vgg_lin.pth"   # official LPIPS v0.1 linear layers (vgg.pth of lpips 0.1.4, BSD-2)

# ----------------------------------------------------------------------------------------------
# Ranking metrics. One descending sort, cumulative sums of positives/negatives, and ties grouped by
# keeping only the last index of each run of equal scores: every distinct score is one threshold,
# exactly as scikit-learn's _binary_clf_curve does it.


def _flat(a):
    return np.asarray(a.detach().cpu() if torch.is_tensor(a) else a).ravel()


def _binary_curve(scores, labels, weights=None):
    """(Weighted) true/false positive sums at each distinct threshold, highest threshold first."""
    scores, labels = _flat(scores), _flat(labels)
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
    w = np.ones(scores.size) if weights is None else _flat(weights)[order]
    tps, fps = np.cumsum(w * labels)[last], np.cumsum(w * ~labels)[last]
    return tps, fps


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
# AU-PRO (Bergmann et al., MVTec AD, IJCV 2021), as AnomalyDiffusion reports it: each connected region of
# the ground truth counts equally, whatever its size. Same sort as above: a pixel of region r adds
# 1/(|r| R) to the mean region overlap when the threshold passes it, a good pixel 1/N_ok to the FPR.


def connected_regions(masks):
    """8-connected components of binary masks [N, H, W] (scipy.ndimage.label with a 3x3 structure, as the
    MVTec AD evaluation code): each pixel takes the largest label in its neighbourhood until nothing changes."""
    m = torch.as_tensor(np.asarray(masks) > 0.5)[:, None]   # [N, 1, H, W]
    labels = torch.where(m, torch.arange(1, m.numel() + 1, dtype=torch.float64).view(m.shape), 0.0)
    while True:
        grown = torch.where(m, F.max_pool2d(labels, 3, stride=1, padding=1), 0.0)
        if torch.equal(grown, labels):
            return labels[:, 0]   # [N, H, W]: 0 outside; one value per region, unique across the images
        labels = grown


def au_pro(maps, masks, limit=0.3):
    """Area under the per-region-overlap curve up to FPR `limit`, divided by `limit` (so 1 is perfect).

    maps: anomaly scores [N, H, W]; masks: binary ground truth [N, H, W] (good images: all zero)."""
    regions = connected_regions(masks).flatten().numpy()
    ids, inverse, sizes = np.unique(regions, return_inverse=True, return_counts=True)
    n_regions = int((ids > 0).sum())
    if n_regions == 0 or ids[0] != 0:
        raise ValueError("au_pro needs anomalous regions and good pixels")
    weight = np.where(regions > 0, 1.0 / (sizes[inverse] * n_regions), 1.0 / sizes[0])
    pro, fpr = _binary_curve(_flat(maps), regions > 0, weight)
    fpr, pro = np.clip(np.r_[0.0, fpr, 1.0], 0, 1), np.clip(np.r_[0.0, pro, 1.0], 0, 1)
    i = np.searchsorted(fpr, limit, side="right")   # fpr[i - 1] <= limit < fpr[i]
    area = np.sum(np.diff(fpr[:i]) * (pro[1:i] + pro[:i - 1]) / 2)
    if i < len(fpr):   # the last trapezoid up to the limit, pro interpolated linearly there
        t = (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        area += (limit - fpr[i - 1]) * (pro[i - 1] + (pro[i - 1] + t * (pro[i] - pro[i - 1]))) / 2
    return float(area / limit)


def segmentation_scores(maps, masks, image_labels, window):
    """Pixel AUROC, AP, F1-max over all test pixels pooled and AU-PRO, of anomaly maps [N, 1, S, S] against
    masks [N, 1, S, S]; image score = max of the map average-pooled over `window` (DRAEM: 21 at 256 px).
    An image's label is given (held-out anomaly or good), not read from a mask that may have lost its pixels."""
    k = window | 1   # odd, so the map keeps its size
    image_scores = F.avg_pool2d(maps, k, stride=1, padding=k // 2).flatten(1).max(1).values
    pixel_scores, pixel_labels = maps.flatten().numpy(), masks.flatten().numpy() > 0.5
    return dict(pixel_auroc=auroc(pixel_scores, pixel_labels), pixel_ap=average_precision(pixel_scores, pixel_labels),
                pixel_f1_max=f1_max(pixel_scores, pixel_labels), pixel_au_pro=au_pro(maps[:, 0], masks[:, 0]),
                image_auroc=auroc(image_scores, image_labels), image_ap=average_precision(image_scores, image_labels),
                image_f1_max=f1_max(image_scores, image_labels))


# ----------------------------------------------------------------------------------------------
# Inception-v3: one pass per image gives the 2048-d pool features (KID, FID) and p(y|x) (IS).


def load_inception(path, device):
    """torchvision's Inception-v3 with the user's weights; sizes (classes, aux head) read from the file.
    path "random": seeded random weights (no download; numbers comparable within one table only)."""
    if str(path) == "random":
        with torch.random.fork_rng(devices=[]):   # the caller's random stream stays untouched
            torch.manual_seed(0)
            model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
            for m in model.modules():   # He init keeps activations near unit scale through the 94 convs
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        return model.eval().to(device)
    path = Path(path)
    sd = files.read_state_dict(path, "Inception-v3", "--inception")
    if "fc.weight" not in sd:
        raise ValueError(f"{path}: not a torchvision Inception-v3 state dict (no fc.weight) (--inception)")
    model = torchvision.models.inception_v3(
        weights=None, num_classes=sd["fc.weight"].shape[0], init_weights=False, transform_input=False,
        aux_logits=any(k.startswith("AuxLogits.") for k in sd))
    load_strictly(model, sd, path, "Inception-v3", "--inception")
    return model.eval().to(device)


def load_strictly(module, sd, path, network, flag):
    """module.load_state_dict(sd), strictly, with a mismatch said in one line (torch's message lists every key)."""
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"{path}: not a torchvision {network} state dict ({flag}): {reason}") from None


@torch.no_grad()
def inception_features(model, images, batch_size=32):
    """(pool features [N, 2048], p(y|x) [N, C]) of images [N, 3, S, S] in [0, 1], in batches."""
    device, pool = next(model.parameters()).device, []
    hook = model.fc.register_forward_hook(lambda module, inputs, output: pool.append(inputs[0].float().cpu()))
    probs = []
    try:
        for x in images.split(batch_size):
            x = F.interpolate(x.to(device).float(), size=(299, 299), mode="bilinear", align_corners=False)
            # torchvision's weights come from TensorFlow, which expects [-1, 1]: this is what its
            # transform_input=True does to ImageNet-normalised input, done here directly
            probs.append(model(2 * x - 1).float().softmax(1).cpu())
    finally:
        hook.remove()
    return torch.cat(pool), torch.cat(probs)


def inception_probs(model, images, batch_size=32):
    """p(y|x) [N, C] of images [N, 3, S, S] in [0, 1]."""
    return inception_features(model, images, batch_size)[1]


def inception_score(probs, splits=10):
    """IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)) of probabilities [N, C]; (mean, std) over splits."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"inception_score needs probs [N, C] with N >= splits={splits}, got {tuple(p.shape)}")
    n = len(p) // splits   # the standard implementation's equal chunks (a remainder is dropped)
    parts = (p / p.sum(1, keepdim=True))[:n * splits].view(splits, n, -1)   # [splits, n, C]
    py = parts.mean(1, keepdim=True).expand_as(parts)   # p(y) of each split
    # xlogy gives 0 log 0 = 0: a one-hot row must not turn the KL into NaN
    scores = (torch.xlogy(parts, parts) - torch.xlogy(parts, py)).sum(2).mean(1).exp()   # [splits]
    return float(scores.mean()), float(scores.std(unbiased=False))   # np.std, as the reference code


def _mmd2_unbiased(x, y):
    """Unbiased MMD² of two equal-size sets with the cubic polynomial kernel k(a, b) = (a·b / d + 1)³."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    kxx, kyy = k(x, x), k(y, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k(x, y).sum() / m ** 2


def kid(real_features, fake_features, subsets=100, subset_size=1000, generator=None):
    """KID: unbiased MMD² over `subsets` random subsets of `subset_size` rows of each set (capped at the
    smaller set), (mean, std) as torchmetrics' KernelInceptionDistance. Features [N, d], computed in float64."""
    real, fake = (torch.as_tensor(f).double().cpu() for f in (real_features, fake_features))
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"kid needs at least 2 features per set, got {len(real)} and {len(fake)}")
    scores = torch.stack([_mmd2_unbiased(real[torch.randperm(len(real), generator=generator)[:size]],
                                         fake[torch.randperm(len(fake), generator=generator)[:size]])
                          for _ in range(subsets)])
    return float(scores.mean()), float(scores.std(unbiased=False))


def fid(real_features, fake_features):
    """FID = |mu_r - mu_f|² + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^½), in float64.

    With centred features X (S = XᵀX / (n - 1)), the eigenvalues of S_r S_f are the squared singular values
    of X_r X_fᵀ / sqrt((n_r - 1)(n_f - 1)), so the last trace is their sum: an [n_r, n_f] SVD instead of the
    eigenvalues of a 2048 x 2048 product (torchmetrics' way, the same number)."""
    real, fake = (torch.as_tensor(f).double().cpu() for f in (real_features, fake_features))
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"fid needs at least 2 features per set, got {len(real)} and {len(fake)}")
    xr, xf = real - real.mean(0), fake - fake.mean(0)
    nr, nf = len(real) - 1, len(fake) - 1
    root_trace = torch.linalg.svdvals(xr @ xf.T).sum() / math.sqrt(nr * nf)
    return float((real.mean(0) - fake.mean(0)).square().sum() + xr.square().sum() / nr + xf.square().sum() / nf
                 - 2 * root_trace)


# ----------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018), VGG variant: features at relu1_2 .. relu5_3, unit-normalised over
# channels, squared difference, a learned non-negative 1x1 layer per level, spatial mean, summed.
# With w >= 0 that is a squared Euclidean distance between embeddings f * sqrt(w / HW): VGG runs once
# per image, and every pair of IC-LPIPS is a subtraction.


class LPIPS(nn.Module):
    """LPIPS distance d(x, y) -> [B] for images in [0, 1]; VGG16 backbone and linear layers from files."""

    slices = (4, 9, 16, 23, 30)   # vgg16.features indices just after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, vgg_path=None, lin_path=LPIPS_LIN):
        super().__init__()
        if vgg_path not in (None, "random"):
            sd = files.read_state_dict(vgg_path, "VGG16", "--vgg")
        # torchvision's vgg16().features (config "D"), without building the 120M-parameter classifier
        with torch.random.fork_rng(devices=[]):   # "random" (or no file): seeded, comparable within one table
            torch.manual_seed(0)
            self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])[:30]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        # the official ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        if vgg_path not in (None, "random"):
            # a full torchvision vgg16 state dict ("features.0.weight", ...) or its features alone
            sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}
            load_strictly(self.features, sd, vgg_path, "VGG16", "--vgg")
        lin = files.read_state_dict(lin_path, "LPIPS", "its linear layers")   # keys lin{k}.model.1.weight
        for k, layer in enumerate(self.lins):
            weight = lin.get(f"lin{k}.model.1.weight")
            if weight is None or weight.shape != layer.weight.shape:
                raise ValueError(f"{lin_path}: not LPIPS's linear layers (lin{k}.model.1.weight: "
                                 f"{None if weight is None else list(weight.shape)}, expected {list(layer.weight.shape)})")
            layer.weight.data.copy_(weight)
            if layer.weight.min() < 0:   # LPIPS training clamps them at 0; the embedding below needs it
                raise ValueError(f"{lin_path}: negative LPIPS weights in lin{k}")
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

    def embed(self, x):
        """[B, D] with d(x, y) = |embed(x) - embed(y)|²."""
        return torch.cat([(f * (lin.weight / (f.shape[2] * f.shape[3])).sqrt()).flatten(1)
                          for lin, f in zip(self.lins, self.levels(x))], 1)


@torch.no_grad()
def ic_lpips(generated, centres, lpips_fn, batch_size=32):
    """Intra-cluster pairwise LPIPS (Ojha et al. 2021, as AnomalyDiffusion computes it, no cap on clusters).

    generated [N, 3, S, S] joins the nearest of centres [M, 3, S, S] (the few-shot real anomalies) by
    LPIPS; the mean pairwise LPIPS within each cluster of >= 2 images, averaged over clusters. An LPIPS
    module embeds each image once (half precision on a GPU); any other distance gets image pairs.
    """
    if isinstance(lpips_fn, LPIPS):
        device = lpips_fn.shift.device
        # an embedding at 256 px holds 8M numbers (the VGG features of five levels): half precision halves their
        # memory, 16 GB for 1,000 images
        store = torch.float16 if device.type == "cuda" else torch.float32
        embed = lambda x: torch.cat([lpips_fn.embed(b.to(device)).to(store) for b in x.split(batch_size)])
        generated, centres = embed(generated), embed(centres)
        lpips_fn = lambda a, b: (a.float() - b.float()).pow(2).sum(1)

    def dist(a, b, ia, ib):   # d(a[ia[k]], b[ib[k]]) for every k, a batch of pairs at a time
        pairs = zip(ia.split(batch_size), ib.split(batch_size))
        return torch.cat([lpips_fn(a[i], b[j]).float().cpu() for i, j in pairs])

    N, M = len(generated), len(centres)
    to_centre = dist(generated, centres, torch.arange(N).repeat_interleave(M), torch.arange(M).repeat(N))
    nearest = to_centre.view(N, M).argmin(1)   # [N]: each generated image's cluster
    cluster_means = []
    for c in range(M):
        members = generated[(nearest == c).to(generated.device)]
        if len(members) < 2:
            continue   # a pair is needed for a distance: singleton clusters are dropped
        i, j = torch.triu_indices(len(members), len(members), offset=1)   # every unordered pair once
        cluster_means.append(dist(members, members, i, j).mean())
    if not cluster_means:
        raise ValueError("no IC-LPIPS cluster holds 2 or more images")
    return float(torch.stack(cluster_means).mean())


# ----------------------------------------------------------------------------------------------
# Generation metrics, per defect type then averaged over the types: Inception runs once per image and
# feeds IS, KID and FID; KID and FID compare with that type's held-out real anomalies.

_said = set()


def null_because(reason):
    """A metric that cannot be computed is null; its reason is printed once per run."""
    if reason not in _said:
        _said.add(reason)
        print(f"null: {reason}")
    return None


def generation_metrics(anomalies, ctx, eval_config, device, inception=None, lpips=None):
    """{"is": [mean, std], "ic_lpips", "kid": [mean, std], "fid", "per_defect": {...}}, means over defect types."""
    images, _, labels = anomalies
    rows = {}
    for d, name in enumerate(ctx["defects"]):
        if not (labels == d).any():
            continue
        generated, row = images[labels == d], rows.setdefault(name, {})
        if inception is not None:
            pool, probs = inception_features(inception, generated, eval_config["batch_size"])
            real = ctx["held_features"][ctx["held"][2] == d]
            row["is"] = list(inception_score(probs, splits=min(eval_config["is_splits"], len(generated))))
            g = torch.Generator().manual_seed(eval_config["seed"])
            row["kid"] = list(kid(real, pool, eval_config["kid_subsets"], 1000, g)) if min(len(real), len(pool)) > 1 else None
            row["fid"] = fid(real, pool) if min(len(real), len(pool)) > 1 else None
        if lpips is not None:
            try:
                row["ic_lpips"] = ic_lpips(generated, ctx["real"][0][ctx["real"][2] == d], lpips, eval_config["batch_size"])
            except ValueError:
                null_because("IC-LPIPS skips defect types whose clusters all hold fewer than 2 images")
    def mean(key):   # over the defect types that have the metric
        values = [r[key] for r in rows.values() if r.get(key) is not None]
        m = np.mean(values, axis=0) if values else None
        return None if m is None else m.tolist() if m.ndim else float(m)

    out = {"is": mean("is"), "ic_lpips": mean("ic_lpips"), "kid": mean("kid"), "fid": mean("fid"), "per_defect": rows}
    if inception is None:
        null_because("IS, KID and FID need Inception-v3 weights: pass --inception PATH (or 'random')")
    if lpips is None:
        null_because("IC-LPIPS needs torchvision VGG16 weights: pass --vgg PATH (or 'random')")
    elif out["ic_lpips"] is None:
        null_because("IC-LPIPS: no defect type has a cluster of 2 or more images")
    return out


# ----------------------------------------------------------------------------------------------
# What makes a table citable: the protocol, stamped into it, and no test image among the generated ones.


def _file_id(path):
    if path in (None, "random"):
        return path and "random (seeded, comparable within one table only)"
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _git_commit():
    run = lambda *a: subprocess.run(["git", "-C", str(HERE), *a], capture_output=True, text=True).stdout.strip()
    try:
        dirty = " (uncommitted changes)" if run("status", "--porcelain") else ""
        return (run("rev-parse", "HEAD") or "unknown") + dirty
    except OSError:
        return "unknown (no git)"


def protocol_stamp(args, eval_config, seeds, ctx, generated):
    """Everything another lab needs to reproduce a table, or to see why theirs differs."""
    per_defect = lambda labels: {name: n for d, name in enumerate(ctx["defects"]) if (n := int((labels == d).sum()))}
    return {
        "split": "per defect type, the first third of the anomalous test images by sorted file name (at least "
                 "one) is few-shot (baselines' material, IC-LPIPS centres); the rest + all good test images are tested",
        "few_shot": per_defect(ctx["real"][2]), "test": {**per_defect(ctx["held"][2]), "good": ctx["n_good"]},
        "generated": per_defect(generated[2]),
        "combined": "real+<method>: the real row's batches draw for draw, the method's anomalies in extra slots",
        "ic_lpips": "centres: all few-shot anomalies of the type; no cap on cluster size",
        "kid": f"{eval_config['kid_subsets']} subsets of min(1000, generated, held-out) per defect type vs its held-out",
        "epochs": {"segmenter": eval_config["seg_epochs"], "classifier": eval_config["cls_epochs"]}, "seeds": seeds,
        "preset": eval_config["preset"], "image_size": eval_config["image_size"],
        "weights": {"inception": _file_id(args.inception), "vgg": _file_id(args.vgg), "resnet": _file_id(args.resnet),
                    "lpips_lin": _file_id(LPIPS_LIN)},
        "git_commit": _git_commit(), "command": "python evaluate.py " + " ".join(args.argv)}


def _pixels_digest(path):
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    return hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()


def refuse_leaks(generated, held_out):
    """A generated image with the same pixels as a held-out real anomaly is a test image in the training set."""
    test = {_pixels_digest(a.image): a.image for a in held_out}
    for a in generated:
        if (twin := test.get(_pixels_digest(a.image))) is not None:
            raise ValueError(f"{a.image}: identical to the held-out real anomaly {twin}; the generated folder "
                             f"leaks the test set")


# ----------------------------------------------------------------------------------------------
# Speed at the paper's scale, for bench.py: one defect type's generation metrics.


def bench_rows(device, n=100, size=256, n_real=14, n_centres=7, inception="random", vgg="random"):
    """Seconds for IS, KID, FID and IC-LPIPS of n generated images of one defect type (MVTec bottle's
    broken_large: 20 real anomalies, 7 few-shot centres, 14 held out), features once per image."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    generated, real = torch.rand(n, 3, size, size, generator=g), torch.rand(n_real, 3, size, size, generator=g)
    net, lpips, rows = load_inception(inception, device), LPIPS(vgg).to(device), []

    def timed(name, fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"preset": "any", "benchmark": f"metrics.{name}, {size} px", "batch": n,
                     "ms": (time.perf_counter() - t0) * 1e3})
        return out

    (pool, probs), (real_pool, _) = timed("inception_features", lambda: (inception_features(net, generated),
                                                                        inception_features(net, real)))
    timed("inception_score + kid + fid", lambda: (inception_score(probs), kid(real_pool, pool, generator=g),
                                                  fid(real_pool, pool)))
    timed("ic_lpips", lambda: ic_lpips(generated, real[:n_centres], lpips))
    return rows


# ----------------------------------------------------------------------------------------------
# Comparing runs: every comparison gives n, the sample std and the paired difference with its 95% interval

# Student's t: the 0.975 quantile for 1..30 degrees of freedom (beyond, t_975's series)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(df):
    """The 0.975 quantile of Student's t with df degrees of freedom: a 95% two-sided interval's half-width in
    standard errors. A table to 30, then the Cornish-Fisher series around the normal's 1.95996."""
    if df < 1:
        raise ValueError(f"t_975 needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_std(values):
    """(n, mean, sample std with ddof=1; None for one value): what a cell of a results table says."""
    values = [float(v) for v in values]
    n, mean = len(values), sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return n, mean, std


def paired_difference(a, b):
    """b - a over paired runs (the same seeds): (n, mean difference, its 95% interval (low, high)); the interval
    is None for one pair. An interval that holds 0 reads "not distinguishable"."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    n, mean, std = mean_std([y - x for x, y in zip(a, b)])
    if std is None:
        return n, mean, None
    half = t_975(n - 1) * std / math.sqrt(n)
    return n, mean, (mean - half, mean + half)
