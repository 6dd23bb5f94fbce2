"""The toy world's checks of a generator (evaluate.py --toy): does the picture follow its caption, and does the
conditioning control what is drawn or only recall the examples it was trained on?

  recall    the generated folder's own anomalies. sample.py draws on the few-shot (mask, caption) pairs again, so
            this measures how well the model redraws its examples.
  control   new pairings, sampled here from the generator's checkpoint (control_jobs):
              (a) swapped colour: each few-shot mask with captions that name another colour of its defect type
                  ("... a repeated gray cable" where its example had green);
              (b) new masks: each few-shot caption on a Perlin blob placed where its example's mask was, a shape
                  no example had.
            A model that only recalls its examples scores well on recall and badly here.
Each measures the colour the caption names, drawn inside the mask (toy.drawn_colour), and the defect type a judge
assigns: a small CNN trained on five other toy worlds' real anomalies (train_judge), kept in data/toy/judge/.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import cli
import data
import files
import toy
from axf import texture_ids
from config import SAMPLER_KEYS
from metrics import connected_regions

JUDGE_WIDTHS = (3, 32, 64, 96, 128)  # a small CNN: the defect type from the image alone


def toy_checks(gen_anomalies, generated, category, eval_config, device, checkpoint=None, sampling=None,
               **judge_options):
    """Recall on the generated anomalies (their images, masks, defect indices: `generated`), the judge's accuracy on
    the category's real anomalies, and control from `checkpoint` (None: not measured, with the reason), drawn with
    the generated anomalies' `sampling` settings (config.SAMPLER_KEYS; None: the checkpoint's own).
    judge_options: train_judge's steps, judge_root, worlds."""
    judge = train_judge(category, eval_config, device, **judge_options)
    real = data.read_anomalies(category.anomalies, category.defects, eval_config["image_size"])
    results = {**scores(judge, generated, [a.caption for a in gen_anomalies], device),
               "judge_accuracy_on_real": accuracy(judge, real[0], real[2], device)}
    if checkpoint is None:
        print("toy checks: control not measured (no generator checkpoint: give --ckpt, or a folder sample.py wrote)")
        results["control"] = None
        return results
    model, _ = checkpoints.load_checkpoint(checkpoint, device=device)
    size = model.config["image_size"]  # drawn at the generator's size, judged at the evaluation's
    jobs = control_jobs(category, size, torch.Generator().manual_seed(eval_config["seed"]))
    results["control"] = {}
    for kind in ("swapped_colour", "new_masks"):
        chosen = [job for job in jobs if job["kind"] == kind]
        images = draw(model, category, chosen, eval_config["seed"], device, sampling)
        masks = torch.stack([j["mask"] for j in chosen])
        if size != eval_config["image_size"]:
            images = F.interpolate(images, eval_config["image_size"], mode="bilinear", antialias=True).clamp(0, 1)
            masks = F.interpolate(masks, eval_config["image_size"], mode="nearest")
        defects, captions = torch.tensor([j["defect_index"] for j in chosen]), [j["caption"] for j in chosen]
        results["control"][kind] = {**scores(judge, (images, masks, defects), captions, device), "n": len(chosen)}
    both = list(results["control"].values())  # pooled over (a) and (b), weighted by their sample counts
    for key in ("colour_named_is_drawn", "defect_type_recognised"):
        counted = [(part[key], part["n_" + key]) for part in both if part[key] is not None]
        n = sum(k for _, k in counted)
        results["control"][key] = sum(v * k for v, k in counted) / n if n else None
    return results


def scores(judge, anomalies, captions, device):
    """The share of the anomalies (images, masks, defect indices) whose mask shows the colour their caption names
    (of those whose caption names one), and the share whose defect type the judge names."""
    images, masks, defects = anomalies
    hits = [toy.drawn_colour(image, mask) == toy.caption_colour(caption)
            for caption, image, mask in zip(captions, images, masks) if toy.caption_colour(caption)]
    return {"colour_named_is_drawn": sum(hits) / len(hits) if hits else None, "n_colour_named_is_drawn": len(hits),
            "defect_type_recognised": accuracy(judge, images, defects, device),
            "n_defect_type_recognised": len(images)}


@torch.no_grad()
def accuracy(judge, images, labels, device):
    return float((judge(images.to(device)).argmax(1).cpu() == labels).double().mean())


# ----------------------------------------------------------------------------------------------
# Control: new pairings of the few-shot masks and captions, drawn from the checkpoint


def control_jobs(category, size, generator):
    """What to draw for control, on the normal image most like each few-shot example outside its mask
    (data.similar_normals): (a) its mask with each of toy.recoloured's captions; (b) its caption on a Perlin blob
    (data.perlin_mask) of about its mask's area, moved to its mask's centre."""
    few_shot, _ = data.few_shot_split(category.anomalies)
    nearest = data.similar_normals(category, few_shot, 1)
    jobs = []
    for anomaly in few_shot:
        mask = data.read_mask(anomaly, size)
        base = dict(defect=anomaly.defect, defect_index=category.defects.index(anomaly.defect),
                    normal=category.train_good[nearest[anomaly.image][0]])
        jobs += [dict(base, kind="swapped_colour", mask=mask, caption=caption)
                 for caption in toy.recoloured(anomaly.caption, anomaly.defect)]
        jobs.append(dict(base, kind="new_masks", mask=blob_like(mask, generator), caption=anomaly.caption))
    return jobs


def blob_like(mask, generator):
    """A Perlin blob [1, S, S] (the largest region of data.perlin_mask's, of at most twice the mask's area), moved so
    that its centre is the mask's; what the move pushes past the border is cut, never wrapped round."""
    blob = data.perlin_mask(mask.shape[-1], generator, max_area=min(0.5, 2 * mask.mean().item()))
    regions = connected_regions(blob)[0]
    blob = (regions == regions[regions > 0].mode().values).float()[None]  # the label most pixels hold
    (y, x), (by, bx) = data.mask_centre(mask), data.mask_centre(blob)
    return data.shifted(blob, y - by, x - bx)


@torch.no_grad()
def draw(model, category, jobs, seed, device, sampling=None, batch_size=16):
    """Sample the jobs with `sampling`'s settings where it has them, else the checkpoint's own; every sample's
    noise from its own seed."""
    config, size, images = model.config, model.config["image_size"], []
    settings = {key: config[key] for key in SAMPLER_KEYS}
    settings |= {key: value for key, value in (sampling or {}).items() if key in settings}
    model = model.to(device)
    bar = cli.progress(len(jobs), f"control samples ({settings['sampler']}, {settings['sample_steps']} steps, "
                                  f"guidance {settings['guidance_scale']})")
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        normals = torch.stack([data.read_image(j["normal"], size) for j in batch]).to(device)
        masks = torch.stack([j["mask"] for j in batch]).to(device)
        ids = texture_ids(model.texture_rows, category.name, [j["defect"] for j in batch]).to(device)
        generators = [torch.Generator(device).manual_seed((seed << 32) + i)
                      for i in range(start, start + len(batch))]
        with cli.autocast(device, config["bf16"]):
            drawn = model.sample(normals, masks, [j["caption"] for j in batch], ids, sampler=settings["sampler"],
                                 steps=settings["sample_steps"], guidance_scale=settings["guidance_scale"],
                                 eta=settings["eta"], generator=generators)
        images.append(drawn.float().cpu())
        bar.update(len(batch))
    bar.close()
    return torch.cat(images)


# ----------------------------------------------------------------------------------------------
# The judge


def train_judge(category, eval_config, device, steps=1500, judge_root=toy.TOY_ROOT / "judge", worlds=5):
    """A small CNN that names an image's defect type, trained on `worlds` other toy worlds' real anomalies, turned
    and mirrored. It depends on none of the generated images, so it is trained once per setting and kept."""
    S, B, seed = eval_config["image_size"], eval_config["batch_size"], eval_config["seed"]
    torch.manual_seed(seed)
    judge = nn.Sequential(*[layer for cin, cout in zip(JUDGE_WIDTHS, JUDGE_WIDTHS[1:]) for layer in (
        nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(JUDGE_WIDTHS[-1], len(category.defects))).to(device)
    kept = Path(judge_root) / f"judge_{category.name}_{S}px_{steps}steps_batch{B}_seed{seed}_{worlds}worlds.pt"
    if kept.exists():  # written here before; read as any weights file, so that a damaged one is said in one line
        try:
            judge.load_state_dict(files.read_state_dict(kept, "toy judge", "delete it to train the judge again"))
        except RuntimeError:  # torch lists every key; the file is another judge's
            raise ValueError(f"{kept}: not this judge's weights; delete it to train the judge again") from None
        return judge.eval()
    fresh = [a for world in range(1, worlds + 1) for a in data.load_category(
        toy.ensure_toy(category.name, Path(judge_root) / f"seed{world}", seed=world)).anomalies]
    images, _, labels = data.read_anomalies(fresh, category.defects, S)
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(images), generator=generator) for _ in range(-(-steps * B // len(images)))])
    optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
    judge.train()
    bar = cli.progress(steps, "toy judge")
    for k, idx in enumerate(order[:steps * B].view(steps, B)):
        x = images[idx].rot90(k % 4, (2, 3))  # with a mirror every other 4 steps: the square's 8 symmetries
        x = x.flip(3) if k % 8 >= 4 else x
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = judge(x.to(device))
        loss = F.cross_entropy(out.float(), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
    bar.close()
    recalibrate_batchnorm(judge, images, B, device)
    files.save_atomic(judge.state_dict(), kept)
    return judge.eval()


@torch.no_grad()
def recalibrate_batchnorm(model, images, batch_size, device):
    """BatchNorm's running statistics recomputed as the plain average over the un-augmented images ("precise BN").
    The judge trains on batches turned and mirrored as a whole, so the running statistics it keeps are those of
    turned objects; an elongated one (the toy pill) upright then meets statistics it was never normalised with,
    and in eval mode the judge called every real pill anomaly one type, while in train mode (batch statistics) it
    told them apart (measured: docs/results.md)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for batch in images.split(batch_size):
        model(batch.to(device))
    return model.eval()
