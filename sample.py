"""sample.py: synthesize anomalies with a trained AnomalyXFusion into one MVTec AD category folder.

    python sample.py --category bottle --toy --n 100
    python sample.py --category bottle --ckpt runs/bottle --n 1000 --defect broken_large
    python sample.py --category cable --toy --defect cable_swap --prompt "The blue cable is replaced by a repeated green cable"
    python sample.py --category pill --toy --ckpt runs/all          # one category of a model of several
    torchrun --standalone --nproc_per_node 4 sample.py --category bottle --n 1000   # the samples split over 4 GPUs

For each defect type (or --defect), --n anomalies are drawn on normal training images (one of the
--similar_normals most like the few-shot source the mask and caption come from), inside
masks (a few-shot real mask of that defect under a small random affine --jitter; Perlin-noise
blobs with --masks perlin; or with --masks learned a new shape between two of the defect's few-shot
masks, mixed by the run's stage-2 mask autoencoder, at the place of the one its caption goes with, under the
same --jitter), steered by a caption (the few-shot caption that goes with the mask, or
--prompt) and the defect's learned texture tokens (or the CLIP features of --reference and
--reference_mask, Eq. (3)). Blended sampling (Eq. (16), axf.py) keeps the image outside the mask: every
pixel that differs from the normal image lies inside the saved mask (checked on every sample).

--out_dir (default samples/<category>) becomes one MVTec AD category and nothing else, readable by
data.load_category, evaluate.py and detector libraries (anomalib's MVTecAD reader) as it is:
    train/good/       the dataset's normal training images (hard links where possible, else copies)
    test/good/        the dataset's good test images (so a detector can be scored on the anomalies)
    test/<defect>/NNN.png   ground_truth/<defect>/NNN_mask.png   prompt/<defect>/NNN.txt
    .axf_samples.json the files sample.py wrote, the category and the data folder they were drawn on
                      (a re-run deletes only those files; it refuses any other non-empty folder, so it never
                      deletes a dataset's own files, and a folder of another category or data folder), and
                      the last run's checkpoint and sampling settings (evaluate.py --toy draws alike)
The preview grid goes beside it: <out_dir>_preview.png (e.g. samples/cable_preview.png), never inside,
since anomalib reads every image file under the category folder as a sample. sample.py overwrites a
file of that name only if it wrote it (a PNG text chunk says so).

Every flag, the checkpoint, the data and the output folder are checked before the first file is
written; a refusal is one line and leaves the folder as it was. One run at a time writes into a
folder (files.run_lock: a second one is refused). A manifest written before it recorded its category
and data folder is taken for this run's when what it lists fits: the same normal images by name, and
only defect types of this category.

Each sample's noise comes from its own generator, seeded by --seed and its place in the plan, and under
torchrun each process draws whole batches of the plan (the ones one process would draw): the folder is
the same, byte for byte, whatever the number of processes.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import axf
import checkpoints
import cli
import data
import files
import toy
from config import KEYS, SAMPLER_KEYS

SAMPLING_KEYS = SAMPLER_KEYS + ("seed", "device")
MANIFEST = ".axf_samples.json"  # not an image: MVTec readers (data.py, anomalib) skip it
# the names sample.py writes into --out_dir, relative to it: the only ones a manifest may list
OWN_NAME = re.compile(r"(train|test)/good/[^/\0]+|test/[^/\0]+/\d+\.png|ground_truth/[^/\0]+/\d+_mask\.png"
                      r"|prompt/[^/\0]+/\d+\.txt")
# what sample.py itself leaves in a folder besides the files it lists: the lock, and a manifest's temporary
# file when a kill stopped its writing (files.atomic_write)
BOOKKEEPING = re.compile(re.escape(files.LOCK) + "|" + re.escape(MANIFEST) + r"\.\d+\.tmp")
PREVIEW_MARK = ("Software", "AnomalyXFusion sample.py preview")  # a PNG text chunk: the previews sample.py wrote


# ----------------------------------------------------------------------------------------------
# What to draw


def plan(category, few_shot, args, size, generator, autoencoder=None):
    """What to draw: (defect, its index within the defect, normal image path, mask, caption) for every sample.
    autoencoder: the stage-2 mask autoencoder, for --masks learned."""
    defects = [args.defect] if args.defect else category.defects
    nearest = data.similar_normals(category, few_shot, args.similar_normals) if args.similar_normals > 0 else None
    jobs = []
    for defect in defects:
        if defect not in category.defects:
            raise ValueError(f"--defect {defect!r} is not a defect type of {category.name}: {', '.join(category.defects)}")
        examples = [a for a in few_shot if a.defect == defect]
        for index in range(args.n):
            source = examples[int(torch.randint(len(examples), (1,), generator=generator))]
            candidates = nearest[source.image] if nearest else range(len(category.train_good))
            normal = category.train_good[candidates[int(torch.randint(len(candidates), (1,), generator=generator))]]
            if args.masks == "perlin":
                mask = data.perlin_mask(size, generator)
            elif args.masks == "learned":  # a shape between the source's and another example's, at the source's place
                others = [a for a in examples if a is not source] or examples
                partner = others[int(torch.randint(len(others), (1,), generator=generator))]
                mixed = data.mixed_mask(autoencoder, data.read_mask(source, size), data.read_mask(partner, size),
                                        generator)
                mask = data.sample_mask(size, generator, real_masks=mixed[None], p_real=1.0, jitter=args.jitter)
            else:  # the source's own mask, jittered: the caption describes what lies under it
                mask = data.sample_mask(size, generator, real_masks=data.read_mask(source, size)[None], p_real=1.0,
                                        jitter=args.jitter)
            jobs.append((defect, index, normal, mask, args.prompt or source.caption))
    return jobs


# ----------------------------------------------------------------------------------------------
# The output folder: one MVTec AD category, and a manifest of what sample.py wrote into it


def sample_files(defect, index):
    """test/<defect>/NNN.png, ground_truth/<defect>/NNN_mask.png, prompt/<defect>/NNN.txt."""
    name = f"{defect}/{index:03d}"
    return f"test/{name}.png", f"ground_truth/{name}_mask.png", f"prompt/{name}.txt"


def own_file_name(name):
    """Whether `name` (a manifest entry) is a name sample.py writes: train/good/<file>, test/good/<file>, or
    sample_files' three; each part a plain name ('..' is not one)."""
    return (isinstance(name, str) and OWN_NAME.fullmatch(name) is not None
            and not {".", ".."} & set(name.split("/")))


def read_manifest(out):
    """The manifest of `out` (a dict, its "written" entries a set), each entry checked to be a name sample.py
    writes and to lie inside `out` (its folders resolved, links included): a manifest that names anything
    else is not sample.py's, and the folder is refused before anything in it is touched."""
    manifest = out / MANIFEST
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
        written = content["written"]
        if not isinstance(written, list):
            raise TypeError(f"'written' is {type(written).__name__}, not a list")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest}: not a manifest sample.py wrote ({type(error).__name__}: {error}); pass a "
                         f"new or empty --out_dir") from None
    root = out.resolve()
    for name in written:
        if not own_file_name(name) or not (out / name).parent.resolve().is_relative_to(root):
            raise ValueError(f"{manifest}: lists {name!r}, which is not a file sample.py writes inside {out}; "
                             f"sample.py deletes nothing it cannot prove its own: pass a new or empty --out_dir")
    return dict(content, written=set(written))


def normal_files(category):
    """The names the category's own normal images get in the output folder: train/good/<file>, test/good/<file>."""
    return {f"{split}/good/{p.name}" for split, paths in (("train", category.train_good), ("test", category.test_good))
            for p in paths}


def check_origin(manifest, out, origin, category):
    """Refuse a folder of samples drawn on another category or data folder: a re-run replaces train/good and
    test/good, and the defect folders of two categories would sit side by side. A manifest older than these
    fields counts as this run's when what it lists fits: the same normal images by name, and only defect
    types of this category."""
    if "category" in manifest:
        drawn = f"samples of {manifest['category']} drawn on {manifest.get('data_folder')}"
        fits = (manifest["category"], manifest.get("data_folder")) == (origin["category"], origin["data_folder"])
    else:
        listed = manifest["written"]
        drawn = "samples of another category or data folder (an older manifest, which did not record them)"
        fits = ({f for f in listed if f.split("/")[1] == "good"} == normal_files(category)
                and {f.split("/")[1] for f in listed} - {"good"} <= set(category.defects))
    if not fits:
        raise ValueError(f"{out} holds {drawn}; this run draws {origin['category']} on {origin['data_folder']}: "
                         f"pass another --out_dir")


def check_output(out, origin, category, planned):
    """The files sample.py wrote into `out` before (its manifest), once `out` is proven a folder this run may fill;
    it writes nothing. Refused: a file; a non-empty folder without a manifest (someone else's); a manifest of
    another category or data folder; a file this run will write (`planned`) that exists and is not listed."""
    if blocking := next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None):
        raise ValueError(f"--out_dir {out}: {blocking} is a file, not a folder; pass a new or empty folder")
    if out.resolve().is_relative_to(category.folder.resolve()):
        raise ValueError(f"--out_dir {out} lies inside the data folder {category.folder}; pass a folder outside it")
    manifest = out / MANIFEST
    others = [p for p in out.iterdir() if not BOOKKEEPING.fullmatch(p.name)] if out.is_dir() else []
    if others and not manifest.is_file():
        raise ValueError(f"{out}: not empty and not written by sample.py (no {MANIFEST}); sample.py never "
                         f"deletes files it did not write: pass a new or empty --out_dir")
    if not manifest.is_file():
        return set()
    content = read_manifest(out)
    check_origin(content, out, origin, category)
    for name in sorted(planned):
        if (out / name).exists() and name not in content["written"]:
            raise ValueError(f"{out / name}: exists and sample.py did not write it; pass a new or empty --out_dir")
    return content["written"]


def fill_output(out, origin, category, planned, defects, checkpoint, sampling):
    """Ready `out` for the samples, holding its lock: check it again (another run may have written since the
    first check), delete the normal images and the samples of `defects` sample.py wrote before (only files
    its manifest lists), write the manifest (with the checkpoint and the `sampling` settings), then put in
    the category's normal images."""
    written = check_output(out, origin, category, planned)
    files.remove_stale_temporaries(out, [MANIFEST])
    replaced = {f for f in written if f.split("/")[1] == "good" or f.split("/")[1] in defects}
    for name in sorted(replaced):
        (out / name).unlink(missing_ok=True)
    # written before any other file, for every process: after a kill it lists every file written, so a
    # re-run can replace them
    write_manifest(out, (written - replaced) | planned, origin, checkpoint, sampling)
    for split, paths in (("train", category.train_good), ("test", category.test_good)):
        for p in paths:  # the category's own normal images: a detector trains and is scored on them
            place(p, out / split / "good" / p.name)


def place(source, target):
    """Put a file into the folder: a hard link where the file system allows, else a copy."""
    if target.exists():  # checked under the lock already (check_output): never overwrite, whatever happened
        raise ValueError(f"{target}: exists and sample.py did not write it; pass a new or empty --out_dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)


def save_png(tensor, path):
    """A [C, H, W] tensor in [0, 1] as an 8-bit PNG (RGB, or L for a one-channel mask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (tensor.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def save_sample(out, defect, index, image, mask, caption):
    """The sample's image, mask and caption (sample_files)."""
    files = sample_files(defect, index)
    save_png(image, out / files[0])
    save_png(mask, out / files[1])
    (out / files[2]).parent.mkdir(parents=True, exist_ok=True)
    (out / files[2]).write_text(caption + "\n", encoding="utf-8")


def write_manifest(out, written, origin, checkpoint, sampling):
    """The manifest, written whole or not at all (files.atomic_write): a kill never leaves half of one. The
    checkpoint and the sampling settings are the last run's: evaluate.py --toy draws its control samples with
    them, so that recall (this folder) and control are drawn alike."""
    content = {"written": sorted(written), **origin, "checkpoint": str(checkpoint), "sampling": sampling}
    with files.atomic_write(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(content, indent=1), encoding="utf-8")


def preview_path(out):
    """<out_dir>_preview.png beside the folder."""
    out = out if out.name not in ("", "..") else Path(os.path.abspath(out))  # "." and ".." name no folder
    return out.parent / f"{out.name}_preview.png"


def check_preview(path):
    """Refuse to overwrite a file at the preview's place that sample.py did not write (no PREVIEW_MARK)."""
    if not path.exists():
        return
    try:
        with Image.open(path) as image:
            ours = image.info.get(PREVIEW_MARK[0]) == PREVIEW_MARK[1]
    except OSError:  # a folder, or not an image
        ours = False
    if not ours:
        raise ValueError(f"{path}: exists and sample.py did not write it (the preview of --out_dir goes there); "
                         f"move it, or pass another --out_dir")


def save_preview(rows, path):
    """data.save_grid's picture, marked as sample.py's (PREVIEW_MARK) and written atomically."""
    grid = data.save_grid(rows, path.with_name(f".{path.name}.{os.getpid()}.png"))  # the suffix names the format
    mark = PngInfo()
    mark.add_text(*PREVIEW_MARK)
    with Image.open(grid) as image, files.atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=mark)
    grid.unlink()
    return path


# ----------------------------------------------------------------------------------------------
# Drawing


def draw(model, category, jobs, config, device, batch_size, textures=None):
    """Sample this process's batches of the jobs; yield (job, normal [3, S, S], generated [3, S, S]) for each one.

    The batches are those one process forms, jobs i .. i + batch_size - 1; with N processes, rank r takes
    batches r, r + N, ... Each sample's noise comes from a generator seeded by --seed and its index i in the
    plan alone. The promise of Eq. (16) and the final composite, checked on every sample: every pixel that
    differs from the normal image lies inside the mask.
    """
    size = config["image_size"]
    starts = range(0, len(jobs), batch_size)[cli.rank()::cli.world_size()]
    bar = cli.progress(sum(len(jobs[i:i + batch_size]) for i in starts), "sampling")
    for start in starts:
        batch = jobs[start:start + batch_size]
        normals = torch.stack([data.read_image(j[2], size) for j in batch]).to(device)
        masks = torch.stack([j[3] for j in batch]).to(device)
        texture_ids = axf.texture_ids(model.texture_rows, category, [j[0] for j in batch]).to(device)
        # seed << 32: seed 1's first sample is not seed 0's second
        generators = [torch.Generator(device).manual_seed((config["seed"] << 32) + i)
                      for i in range(start, start + len(batch))]
        with cli.autocast(device, config["bf16"]):
            images = model.sample(normals, masks, [j[4] for j in batch], texture_ids,
                                  textures=None if textures is None else textures.expand(len(batch), -1, -1),
                                  sampler=config["sampler"], steps=config["sample_steps"],
                                  guidance_scale=config["guidance_scale"], eta=config["eta"], generator=generators)
        for job, normal, image, mask in zip(batch, normals.cpu(), images.float().cpu(), masks.cpu()):
            changed = (image != normal).any(0)
            if (changed & (mask[0] == 0)).any():
                raise RuntimeError(f"{int((changed & (mask[0] == 0)).sum())} changed pixels outside the mask")
            yield job, normal, image
        bar.update(len(batch))
    bar.close()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_data_args(parser)
    parser.add_argument("--ckpt", help="checkpoint file or train.py --out_dir (default: runs/<category>); a model of "
                                       "several categories draws the one --category names")
    parser.add_argument("--sd", help="where the Stable Diffusion file a train.py --sd checkpoint was trained on is now "
                                     "(default: the path it was trained with; a different file is refused)")
    parser.add_argument("--n", type=int, default=100, help="anomalies per defect type (default: 100)")
    parser.add_argument("--defect", help="only this defect type (default: every defect type)")
    parser.add_argument("--prompt", help="one caption for every sample (default: the few-shot captions)")
    parser.add_argument("--masks", choices=("real", "perlin", "learned"), default="real",
                        help="jittered few-shot masks (default), Perlin-noise blobs, or learned: new shapes between "
                             "two few-shot masks of the defect type, mixed by the run's mask autoencoder (mask_ae.pt "
                             "beside the checkpoint)")
    parser.add_argument("--jitter", choices=tuple(data.JITTER), default="small",
                        help="how far a real mask moves: none; small (default: 5 degrees, 1.5%% shift, 5%% scale, "
                             "so it stays on the part its caption names); large (also flips, 20 degrees, 5%% shift, "
                             "15%% scale: for objects that look the same turned or mirrored, like bottle)")
    parser.add_argument("--similar_normals", type=int, default=10, metavar="K",
                        help="draw each anomaly on one of the K normal training images most like its few-shot "
                             "source outside the mask, so the mask lands on the part it marks (default: 10); "
                             "0: on any normal image")
    parser.add_argument("--reference", help="an anomalous image whose masked pixels set the texture (Eq. (3))")
    parser.add_argument("--reference_mask", help="the mask of --reference")
    parser.add_argument("--out_dir", help="output category folder (default: samples/<category>)")
    parser.add_argument("--sample_batch_size", type=int, default=16,
                        help="samples per sampler call (default: 16; train.py's --batch_size is its training batch)")
    cli.add_config_args(parser, SAMPLING_KEYS)
    args = parser.parse_args(argv)
    args.category = cli.category_name(args.category)  # bottle/ (tab completion) is bottle; a path is refused
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if args.sample_batch_size < 1:
        raise ValueError(f"--sample_batch_size must be at least 1, got {args.sample_batch_size}")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty; give a caption, or leave --prompt out for the few-shot captions")
    if args.similar_normals < 0:
        raise ValueError(f"--similar_normals must be 0 (any normal image) or more, got {args.similar_normals}")
    if bool(args.reference) != bool(args.reference_mask):
        raise ValueError("--reference and --reference_mask go together")
    return args


def check_sampling(config):
    """The sampling flags, checked before anything is written (the sampler meets them only after the folder
    is filled): a known sampler, 1 to T DDIM steps, a finite guidance scale, eta in [0, 1]."""
    T = config["num_diffusion_steps"]
    if config["sampler"] not in KEYS["sampler"].choices:
        raise ValueError(f"--sampler {config['sampler']}: choose {' or '.join(KEYS['sampler'].choices)}")
    if not 1 <= config["sample_steps"] <= T:
        raise ValueError(f"--sample_steps {config['sample_steps']}: this checkpoint has {T} diffusion steps "
                         f"(num_diffusion_steps), so 1 to {T}")
    if not math.isfinite(config["guidance_scale"]):
        raise ValueError(f"--guidance_scale {config['guidance_scale']}: a finite number, e.g. 3")
    if not 0 <= config["eta"] <= 1:
        raise ValueError(f"--eta {config['eta']}: 0 (deterministic DDIM) to 1 (like DDPM)")


def load_model(args):
    """The checkpoint (EMA weights), its config with the sampling flags applied, the device (torchrun: this
    process's GPU), and the category to draw on."""
    path = Path(args.ckpt or Path("runs") / args.category)
    path = path / "axf.pt" if path.is_dir() else path  # a train.py --out_dir means its checkpoint
    model, checkpoint = checkpoints.load_checkpoint(path, device="cpu", sd_path=args.sd)
    config = dict(model.config, **cli.config_overrides(args))
    check_sampling(config)
    _, _, device = cli.init_distributed(config["device"])
    if args.category not in model.categories:
        raise ValueError(f"{path} was trained on {', '.join(model.categories)}, not on {args.category}")
    with cli.main_first():  # rank 0 writes the toy world
        given = args.toy or args.data_root
        folder = cli.category_folder(args) if given else Path(checkpoint["data_folders"][args.category])
        category = data.load_category(folder)
    if category.defects != model.categories[args.category]:
        raise ValueError(f"{path} was trained on {args.category}'s defects {model.categories[args.category]}, "
                         f"but {folder} has {category.defects}")
    if args.prompt and not model.config["use_text"]:
        print("note: this checkpoint has use_text False (Table 6): --prompt is only written to prompt/, it steers nothing")
    if args.reference and not model.config["use_mif"]:
        raise ValueError("--reference sets the texture tokens (Eq. (3)), but this checkpoint has use_mif False (Table 6)")
    return model.to(device), config, device, path, category


def mask_autoencoder(path, config):
    """The stage-2 mask autoencoder train.py left beside the checkpoint (mask_ae.pt), for --masks learned."""
    stage2 = path.parent / "mask_ae.pt"
    if not stage2.is_file():
        raise FileNotFoundError(f"--masks learned mixes masks with the stage-2 mask autoencoder, {stage2}: no file "
                                f"there (train.py writes it beside axf.pt)")
    checkpoint = checkpoints.read_checkpoint(stage2)
    if checkpoint["config"]["image_size"] != config["image_size"]:  # another run's: its layers would not fit
        raise ValueError(f"{stage2} is of {checkpoint['config']['image_size']} px masks, {path} of "
                         f"{config['image_size']} px")
    autoencoder = axf.build_mask_autoencoder(checkpoint["config"])
    autoencoder.load_state_dict(checkpoint["model"])
    return autoencoder.eval()


def reference_textures(model, args, config, device):
    """Texture tokens from --reference and its mask (Eq. (3)), or None: each defect's learned ones."""
    if not args.reference:
        return None
    for flag, path in (("--reference", args.reference), ("--reference_mask", args.reference_mask)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no image file there")
    size = config["image_size"]
    try:
        image, mask = data.read_image(args.reference, size), data.read_mask(Path(args.reference_mask), size)
    except OSError as error:  # PIL: not an image; its message names the file
        raise ValueError(f"--reference / --reference_mask: {error}") from None
    features = model.mif.encode_texture(image[None].to(device), mask[None].to(device))
    return axf.unit_tokens(features, config["num_tokens"])


@contextmanager
def writing_into(out, fill):
    """Rank 0 holds the lock of `out` (files.run_lock: one run at a time) while every process writes into it,
    and readies the folder with fill() first. Under torchrun every process stops with rank 0's refusal
    instead of waiting for it."""
    with ExitStack() as held:
        refusal = None
        if cli.is_main():
            try:
                held.enter_context(files.run_lock(out, "sample.py run"))
                fill()
            except ValueError as error:
                refusal = error
        if refusal := cli.gather(refusal)[0]:  # a collective: the others wait here for rank 0's folder
            raise refusal
        yield


def draw_and_save(model, args, category, jobs, config, device, textures, out):
    """Draw this process's samples into `out`; every process's figures for the report: the mean change inside
    each mask, and in the toy world whether the caption's colour was drawn."""
    inside, colours = [], []
    for (defect, index, _, mask, caption), normal, image in draw(model, args.category, jobs, config, device,
                                                                 args.sample_batch_size, textures):
        save_sample(out, defect, index, image, mask, caption)
        inside.append((image - normal)[mask.expand_as(image) > 0].abs().mean().item())
        if toy.caption_colour(caption) and (category.folder / "toy.json").exists():  # the toy world's own check
            colours.append(toy.drawn_colour(image, mask) == toy.caption_colour(caption))
    return (sum(lists, []) for lists in zip(*cli.gather((inside, colours))))


def main(argv=None):
    args = parse_args(argv)
    model, config, device, path, category = load_model(args)
    few_shot, _ = data.few_shot_split(category.anomalies)
    autoencoder = mask_autoencoder(path, config) if args.masks == "learned" else None
    jobs = plan(category, few_shot, args, config["image_size"], torch.Generator().manual_seed(config["seed"]),
                autoencoder)
    textures = reference_textures(model, args, config, device)
    out = Path(args.out_dir or Path("samples") / args.category)
    origin = {"category": args.category, "data_folder": str(category.folder.resolve())}
    planned = normal_files(category) | {name for job in jobs for name in sample_files(job[0], job[1])}
    check_output(out, origin, category, planned)  # every process, before anything is written anywhere
    check_preview(preview_path(out))
    sampling = {key: config[key] for key in SAMPLER_KEYS}
    with writing_into(out, lambda: fill_output(out, origin, category, planned, {job[0] for job in jobs}, path,
                                               sampling)):
        if cli.is_main():
            print(f"sampling {len(jobs)} anomalies with {path} ({config['sampler']}, {config['sample_steps']} steps, "
                  f"guidance {config['guidance_scale']}) into {out}")
        inside, colours = draw_and_save(model, args, category, jobs, config, device, textures, out)
        if cli.is_main():
            report(jobs, inside, colours, out, config["image_size"])
    cli.finish_distributed()


def report(jobs, inside, colours, out, size):
    """The checks' figures, and the preview grid: the first few samples of each defect type, read back."""
    read = lambda path: data.read_image(path, size)
    preview = [[read(normal), mask, read(out / sample_files(defect, index)[0]), caption]
               for defect, index, normal, mask, caption in jobs if index < 4]
    preview = save_preview(preview, preview_path(out))
    print(f"every changed pixel lies inside its saved mask; inside: mean |generated - normal| = "
          f"{sum(inside) / len(inside):.3f} (pixel values in [0, 1])")
    if colours:
        print(f"toy world: the colour the caption names is drawn in {sum(colours)} of {len(colours)} samples "
              f"({100 * sum(colours) / len(colours):.0f}%)")
    counts = {}
    for job in jobs:
        counts[job[0]] = counts.get(job[0], 0) + 1
    print(f"wrote {len(jobs)} anomalies ({', '.join(f'{d}: {n}' for d, n in counts.items())}) "
          f"to {out}; preview: {preview}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, PermissionError, ValueError) as error:
        sys.exit(f"error: {error}")
