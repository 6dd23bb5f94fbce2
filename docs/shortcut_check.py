"""Does a segmenter trained on generated anomalies learn the paste instead of the defect?

sample.py decodes the whole image through the VAE and pastes its masked pixels onto the normal image: inside
the mask there is VAE-decoded texture and at its edge a seam, which real defects lack. A segmenter that learnt
those would fire on a normal image with a patch of its own VAE reconstruction pasted in (no defect at all).
This script trains evaluate.py's segmenter (its toy preset, as evaluate.py --toy does) on each method's anomalies
and scores it on the good test images, each once as it is and once with such a patch under a few-shot mask
(jittered as sample.py jitters it):

  patch pixel AUROC   the map inside the pasted patches against everywhere else on the pasted images;
                      0.5: the segmenter cannot see the patch
  paste image AUROC   image scores of the pasted images against the same images clean
  real pixel AP       the held-out real anomalies, as evaluate.py reports it (for scale)

    python docs/shortcut_check.py --category bottle --run runs/mask_channel/bottle/off-s0 \\
        --generated samples/mask_channel/bottle-off-s0/bottle --seeds 0,1,2

Prints a markdown table: per method, mean ± sample std over the seeds, and the paired difference from `real`.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402
import data  # noqa: E402
import evaluate as E  # noqa: E402
import toy  # noqa: E402
from metrics import auroc, mean_std, paired_difference  # noqa: E402


@torch.no_grad()
def pasted_good_images(model, good, few_shot_masks, generator, batch_size=16):
    """Each good image with the pixels under a jittered few-shot mask replaced by its own VAE reconstruction
    (decoded from the posterior mean, as sample.py decodes): (images, masks)."""
    size = good.shape[-1]
    masks = torch.stack([data.sample_mask(size, generator, real_masks=few_shot_masks[int(torch.randint(
        len(few_shot_masks), (1,), generator=generator))][None], p_real=1.0, jitter="small") for _ in good])
    reconstructions = torch.cat([((model.vae.decode_latents(model.encode_images(x)).float() + 1) / 2).clamp(0, 1)
                                 for x in good.split(batch_size)])
    return good * (1 - masks) + reconstructions * masks, masks


@torch.no_grad()
def scores(segmenter, pasted, patch_masks, clean, eval_config, device):
    """Patch pixel AUROC, paste image AUROC (metrics.segmentation_scores' image score) of one segmenter."""
    pasted_scores = E.segmentation_metrics(segmenter, (torch.cat([pasted, clean]), torch.cat(
        [patch_masks, torch.zeros_like(patch_masks)]), torch.cat([torch.ones(len(pasted)), torch.zeros(len(clean))])),
        eval_config, device)
    maps = torch.cat([segmenter(x.to(device)).float().softmax(1)[:, 1:].cpu() for x in pasted.split(16)])
    patch = auroc(maps.flatten().numpy(), patch_masks.flatten().numpy() > 0.5)
    return {"patch pixel AUROC": patch, "paste image AUROC": pasted_scores["image_auroc"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", required=True, help="a toy category: bottle, cable, pill")
    parser.add_argument("--run", required=True, help="train.py's --out_dir of the generator (its VAE makes the patches)")
    parser.add_argument("--generated", required=True, help="sample.py's folder of that run's anomalies")
    parser.add_argument("--methods", default="axf,crop_paste,real", help="evaluate.py's rows to train on")
    parser.add_argument("--seeds", default="0,1,2", help="the segmenters' seeds")
    args = parser.parse_args(argv)
    device, methods = torch.device("cpu"), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    category = data.load_category(toy.ensure_toy(args.category))
    eval_config = E.resolve_eval_config("toy")
    ctx = E.real_data(category, eval_config)
    generated = data.read_anomalies(data.load_generated(args.generated), ctx["defects"], eval_config["image_size"])
    sets = E.anomaly_sets(methods, generated, ctx, eval_config)
    model, _ = checkpoints.load_checkpoint(Path(args.run) / "axf.pt")
    good = ctx["test"][0][ctx["test"][2] == 0]
    pasted, patch_masks = pasted_good_images(model, good, ctx["real"][1], torch.Generator().manual_seed(0))

    results = {}   # method -> {metric: [value per seed]}
    for name in methods:
        (anomalies, extra), rows = sets[name], {}
        for seed in seeds:
            torch.manual_seed(seed)
            g, g_extra = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 2 ** 32)
            segmenter = E.train_segmenter(anomalies, ctx["normals"], eval_config, device, g, extra, g_extra)
            found = scores(segmenter, pasted, patch_masks, good, eval_config, device)
            found["real pixel AP"] = E.segmentation_metrics(segmenter, ctx["test"], eval_config, device)["pixel_ap"]
            for metric, value in found.items():
                rows.setdefault(metric, []).append(100 * value)
        results[name] = rows

    metrics = list(results[methods[0]])
    print(f"{args.category}, {len(good)} good test images pasted with VAE patches; seeds {seeds}\n")
    print("| trained on | " + " | ".join(metrics) + " |\n" + "| --- " * (len(metrics) + 1) + "|")
    for name in methods:
        cells = []
        for metric in metrics:
            n, mean, std = mean_std(results[name][metric])
            cell = f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "") + f" (n={n})"
            if name != "real" and "real" in results:
                _, diff, interval = paired_difference(results["real"][metric], results[name][metric])
                cell += f"; vs real {diff:+.1f}" + (f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else "")
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
