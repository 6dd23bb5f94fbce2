"""The toy world: procedural bottles, cables and pills in the exact MVTec AD + MVTec Caption layout, so every
code path of the project is the real one, on a CPU, with no download.

Each anomaly is drawn twice, without and with its defect, on the same pose, light and noise, so its
mask is exactly the changed pixels and outside it the image is its normal twin. The caption decides
what is drawn ("The blue cable is replaced by a repeated green cable"), and caption_colour /
drawn_colour check whether a generator drew the colour its caption names.

What this file holds, in reading order:
  TOY_CATEGORIES, TOY_COLOURS, ...   the world's constants
  _draw_bottle, _draw_cable, _draw_pill   one normal object; _toy_defect, _toy_sample add a defect and caption
  make_toy, ensure_toy               write a category folder (data.load_category reads it like MVTec's)
  ensure_toy_clip                    the toy world's pretrained CLIP (toy_clip.py), ready for clip.load
  caption_colour, drawn_colour       did a generator draw the colour its caption names?
  recoloured                         the same caption naming another colour (evaluate.py's control)
Depends on numpy, pillow, torch and files.py.
"""
import fcntl  # Unix; the project runs on Linux (and macOS)
import gzip
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import files

TOY_CATEGORIES = ("bottle", "cable", "pill")
TOY_ROOT = Path(__file__).parent / "data" / "toy"
TOY_CLIP = Path(__file__).parent / "toy_clip.pt.gz"  # a CLIP pretrained on the toy world (toy_clip.py)
TOY_VAE = Path(__file__).parent / "toy_vae.pt.gz"  # a VAE pretrained on the toy world (toy_vae.py)
TOY_COLOURS = {"red": (200, 35, 35), "green": (40, 160, 60), "blue": (40, 70, 200), "gray": (140, 140, 140),
               "black": (15, 15, 15), "yellow": (225, 200, 40), "purple": (130, 50, 165), "copper": (190, 110, 50)}
TOY_DEFECTS = {"bottle": ("broken_large", "broken_small", "contamination"),
               "cable": ("cable_swap", "cut_inner_insulation", "missing_cable"),
               "pill": ("color", "crack")}
TOY_COUNTS = dict(train=200, test_good=20, per_defect=24)  # 24 -> 8 few-shot anomalies per defect type
# pill: fewer anomalies, 18 -> 6 few-shot ones per type, two of each spot colour: the hard case for adapting a
# pretrained backbone (train.py --sd), a category it never saw with only two examples of each colour
PER_DEFECT = {"pill": 18}
CABLE_WIRES = ("green", "blue", "gray")                       # top left, top right, bottom, as in MVTec cable
CONTAMINANTS = ("red", "green", "blue", "yellow", "purple")
SPOTS = ("red", "blue", "yellow")  # the pill's colour defect
WHERE = ("right", "bottom right", "bottom", "bottom left", "left", "top left", "top", "top right")  # y points down


def _blob(draw, cx, cy, r, rng, fill, n=9):
    """An irregular polygon around (cx, cy) of radius about r: chips and stains are not circles."""
    a = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)
    rr = r * rng.uniform(0.7, 1.1, n)
    draw.polygon([(cx + q * np.cos(t), cy + q * np.sin(t)) for q, t in zip(rr, a)], fill=fill)


def _disk(draw, cx, cy, r, fill):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _canvas(s, pose, background):
    """An s x s image of one colour, its drawing context, and the object's centre and radius in px."""
    im = Image.new("RGB", (s, s), background)
    return im, ImageDraw.Draw(im), pose["cx"] * s, pose["cy"] * s, pose["r"] * s


def _draw_bottle(s, pose, d, rng):
    """Top view of a bottle mouth on a light background: dark glass, a lighter lip, the dark inside."""
    im, draw, cx, cy, r = _canvas(s, pose, (232, 228, 218))
    _disk(draw, cx, cy, r, (50, 62, 45))
    _disk(draw, cx, cy, 0.8 * r, (92, 106, 82))
    a = pose["rot"]  # the specular highlight on the lip turns with the bottle
    draw.arc([cx - 0.72 * r, cy - 0.72 * r, cx + 0.72 * r, cy + 0.72 * r], a, a + 70, fill=(170, 180, 160),
             width=max(1, int(0.06 * r)))
    _disk(draw, cx, cy, 0.62 * r, (68, 82, 60))
    _disk(draw, cx, cy, 0.5 * r, (30, 34, 27))
    if d and d["defect"].startswith("broken"):  # a chip bitten out of the rim shows the background
        t = np.deg2rad(d["angle"])
        _blob(draw, cx + r * np.cos(t), cy + r * np.sin(t), d["chip"] * r, rng, (232, 228, 218))
    elif d:  # contamination: a stain of the named colour inside the mouth
        _blob(draw, cx + d["dx"] * r, cy + d["dy"] * r, d["radius"] * r, rng, TOY_COLOURS[d["colour"]])
    return im


def _draw_cable(s, pose, d, rng):
    """Cross-section of a cable: black sheath, beige filler, three insulated wires with copper cores."""
    im, draw, cx, cy, r = _canvas(s, pose, (72, 76, 82))
    _disk(draw, cx, cy, r, (32, 32, 36))
    _disk(draw, cx, cy, 0.88 * r, (205, 195, 172))
    for i, (wire, a) in enumerate(zip(CABLE_WIRES, (-150, -30, 90))):
        t = np.deg2rad(a + pose["rot"])
        wx, wy, wr = cx + 0.44 * r * np.cos(t), cy + 0.44 * r * np.sin(t), 0.33 * r
        hit = d is not None and d["wire"] == i
        if hit and d["defect"] == "missing_cable":
            _disk(draw, wx, wy, wr, TOY_COLOURS["black"])
            continue
        _disk(draw, wx, wy, wr, TOY_COLOURS[d["colour"] if hit and d["defect"] == "cable_swap" else wire])
        if hit and d["defect"] == "cut_inner_insulation":  # a slit through the insulation down to the core
            draw.pieslice([wx - wr, wy - wr, wx + wr, wy + wr], d["angle"], d["angle"] + d["span"],
                          fill=TOY_COLOURS["copper"])
        _disk(draw, wx, wy, 0.5 * wr, TOY_COLOURS["copper"])
    return im


def _draw_pill(s, pose, d, rng):
    """Top view of a white oblong pill on a slate background, a groove across its middle."""
    im, draw, cx, cy, r = _canvas(s, pose, (78, 92, 110))
    t = np.deg2rad(pose["rot"])
    along, across = np.array([np.cos(t), np.sin(t)]), np.array([-np.sin(t), np.cos(t)])
    outline = lambda a, b: [tuple(np.array([cx, cy]) + a * np.cos(u) * along + b * np.sin(u) * across)
                            for u in np.linspace(0, 2 * np.pi, 48, endpoint=False)]
    draw.polygon(outline(r, 0.55 * r), fill=(170, 168, 160))  # the shadowed rim
    draw.polygon(outline(0.94 * r, 0.5 * r), fill=(236, 232, 222))
    ends = [tuple(np.array([cx, cy]) + k * 0.42 * r * across) for k in (-1, 1)]
    draw.line(ends, fill=(196, 192, 182), width=max(1, int(0.05 * r)))
    if d and d["defect"] == "color":  # a spot of the named colour on the pill's face
        spot = np.array([cx, cy]) + d["u"] * 0.6 * r * along + d["v"] * 0.25 * r * across
        _blob(draw, *spot, d["radius"] * r, rng, TOY_COLOURS[d["colour"]])
    elif d:  # a crack: a dark jagged line across the pill, on its left or right half
        x0 = d["side"] * d["offset"] * r
        points = [tuple(np.array([cx, cy]) + (x0 + rng.uniform(-0.06, 0.06) * r) * along + y * across)
                  for y in np.linspace(-0.45 * r, 0.45 * r, 6)]
        draw.line(points, fill=(60, 58, 56), width=max(1, int(0.07 * r)))
    return im


def _toy_defect(defect, i, rng):
    """Defect parameters and caption; the main factor cycles with i so the few-shot third covers it."""
    size = ("small", "large")[rng.integers(2)]
    if defect.startswith("broken"):
        k = i % 8
        big = defect == "broken_large"
        d = dict(angle=45 * k + rng.uniform(-15, 15), chip=rng.uniform(0.24, 0.3) if big else rng.uniform(0.1, 0.13))
        caption = f"A {'large' if big else 'small'} piece of the bottle rim is broken off at the {WHERE[k]}"
    elif defect == "contamination":
        radius = rng.uniform(0.25, 0.3) if size == "large" else rng.uniform(0.13, 0.16)
        t, q = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.45 - radius)
        d = dict(colour=CONTAMINANTS[i % 5], radius=radius, dx=q * np.cos(t), dy=q * np.sin(t))
        caption = f"A {size} {d['colour']} contamination lies inside the bottle"
    elif defect == "cable_swap":  # (wire, colour): 3 wires x 2 other colours
        w, c = divmod(i % 6, 2)
        d = dict(wire=w, colour=[x for x in CABLE_WIRES if x != CABLE_WIRES[w]][c])
        caption = f"The {CABLE_WIRES[w]} cable is replaced by a repeated {d['colour']} cable"
    elif defect == "missing_cable":
        d = dict(wire=i % 3)
        caption = f"One {CABLE_WIRES[i % 3]} cable is missing, replaced by a black hole"
    elif defect == "color":  # the spot's colour cycles, so the 6 few-shot spots show each colour twice
        d = dict(colour=SPOTS[i % 3], radius=rng.uniform(0.16, 0.22), u=rng.uniform(-1, 1), v=rng.uniform(-1, 1))
        caption = f"A {d['colour']} spot is on the pill"
    elif defect == "crack":
        side = (-1, 1)[i % 2]
        d = dict(side=side, offset=rng.uniform(0.3, 0.6))
        caption = f"The pill has a crack on its {'left' if side < 0 else 'right'} half"
    else:
        d = dict(wire=i % 3, angle=rng.uniform(0, 360), span=rng.uniform(60, 100))
        caption = f"The insulation of the {CABLE_WIRES[i % 3]} cable is cut, exposing the copper core"
    return dict(d, defect=defect), caption


def _toy_sample(category, size, rng, defect=None, i=0):
    """One toy image (uint8 [S, S, 3]); for an anomaly also its mask (bool [S, S]), caption and normal twin."""
    pose = dict(cx=0.5 + rng.uniform(-0.05, 0.05), cy=0.5 + rng.uniform(-0.05, 0.05),
                r=rng.uniform(0.38, 0.42), rot=rng.uniform(-10, 10) if category in ("cable", "pill") else rng.uniform(0, 360))
    d, caption = _toy_defect(defect, i, rng) if defect else (None, None)
    draw = {"bottle": _draw_bottle, "cable": _draw_cable, "pill": _draw_pill}[category]
    shape_seed = int(rng.integers(2**31))  # the same irregular polygons in both renders

    def render(dd):  # drawn at 2x and box-filtered down: anti-aliased edges
        im = draw(2 * size, pose, dd, np.random.default_rng(shape_seed)).reduce(2)
        return np.asarray(im, dtype=np.float32)

    # light: overall brightness times a gentle gradient from a random direction, then sensor noise
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    phi = rng.uniform(0, 2 * np.pi)
    light = (rng.uniform(0.92, 1.08) * (1 + 0.06 * (np.cos(phi) * xx + np.sin(phi) * yy)))[..., None]
    noise = rng.normal(0, 2.0, (size, size, 3))
    normal = render(None) * light
    finish = lambda x: np.clip(np.round(x + noise), 0, 255).astype(np.uint8)
    if d is None:
        return finish(normal), None, None, None
    anomaly = render(d) * light
    mask = np.abs(anomaly - normal).max(-1) > 12  # the changed pixels, partial edge pixels included
    if not mask.any():
        raise RuntimeError(f"toy {category}/{defect} #{i}: the defect changed no pixel at size {size}")
    return finish(np.where(mask[..., None], anomaly, normal)), mask, caption, finish(normal)


def make_toy(root, category, size=128, seed=0):
    """Write <root>/<category> in the exact MVTec + MVTec Caption layout; deterministic for (size, seed). An
    existing toy category is replaced, a folder that is not one is refused."""
    if category not in TOY_CATEGORIES:
        raise ValueError(f"--category {category!r}: the toy world has {', '.join(TOY_CATEGORIES)}")
    if size < 32:
        raise ValueError(f"--size {size}: toy images need at least 32 px for a small chip to show")
    with _writing(root, category):
        return _write_toy(Path(root), category, size, seed)


def ensure_toy(category, root=TOY_ROOT, size=128, seed=0):
    """The toy category folder, generated on first use (or when size / seed changed).

    Two processes may ask for it at once (two runs started together on a fresh clone): one generates it, the
    other waits for it (_writing) and then finds it made, so it uses that world and never replaces it under
    the first one's reads."""
    folder = Path(root) / category
    if _toy_matches(folder, category, size, seed):
        return folder
    with _writing(root, category):
        if _toy_matches(folder, category, size, seed):  # made by the process we waited for
            return folder
        return _write_toy(Path(root), category, size, seed)


@contextmanager
def _writing(root, category):
    """Hold <root>/.<category>.lock while a category is written: a second process waits here. The operating
    system releases the lock when its process dies, so a killed run blocks no one."""
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / f".{category}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_toy(root, category, size, seed):
    """make_toy's work, holding the category's lock: every file into a temporary folder beside the category,
    renamed into place when complete, so no one ever sees half a category."""
    folder, tmp, old = root / category, root / f".{category}.tmp{os.getpid()}", root / f".{category}.old{os.getpid()}"
    if folder.exists() and not (folder / "toy.json").is_file():
        raise FileExistsError(f"{folder}: exists and is not a toy category (no toy.json); refusing to overwrite")
    # what a killed run left: with the lock held, no other process is writing these
    for leftover in [*root.glob(f".{category}.tmp*"), *root.glob(f".{category}.old*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    save = lambda arr, path: (path.parent.mkdir(parents=True, exist_ok=True), Image.fromarray(arr).save(path))
    for split, n, k in (("train", TOY_COUNTS["train"], 0), ("test", TOY_COUNTS["test_good"], 1)):
        for i in range(n):
            image = _toy_sample(category, size, np.random.default_rng([seed, k, i]))[0]
            save(image, tmp / split / "good" / f"{i:03d}.png")
    for k, defect in enumerate(TOY_DEFECTS[category], start=2):
        for i in range(PER_DEFECT.get(category, TOY_COUNTS["per_defect"])):
            image, mask, caption, _ = _toy_sample(category, size, np.random.default_rng([seed, k, i]), defect, i)
            save(image, tmp / "test" / defect / f"{i:03d}.png")
            save(mask.astype(np.uint8) * 255, tmp / "ground_truth" / defect / f"{i:03d}_mask.png")
            (tmp / "prompt" / defect).mkdir(parents=True, exist_ok=True)
            (tmp / "prompt" / defect / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    (tmp / "toy.json").write_text(json.dumps(dict(category=category, size=size, seed=seed, version=1)))
    if folder.exists():  # renamed away whole, then deleted: a kill never leaves half an old world under its name
        os.replace(folder, old)
    os.replace(tmp, folder)  # atomic: a killed run never leaves a half-written category behind
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _toy_matches(folder, category, size, seed):
    marker, want = Path(folder) / "toy.json", dict(category=category, size=size, seed=seed, version=1)
    return marker.is_file() and json.loads(marker.read_text()) == want


def unpacked(path, folder, maker):
    """A file shipped gzip-compressed in the repository (`maker` made it), decompressed into `folder` on first
    use -> the plain file's path. Its name holds the gzip's hash, so a changed file is never served from a stale
    copy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {path.name} ships with this repository, or make one with: "
                                f"python {maker} --out {path}")
    blob = path.read_bytes()
    plain = Path(folder) / f"{path.name.split('.')[0]}-{hashlib.sha256(blob).hexdigest()[:12]}.pt"
    if not plain.is_file():
        with files.atomic_write(plain) as tmp:
            Path(tmp).write_bytes(gzip.decompress(blob))
    return plain


def ensure_toy_clip(path=TOY_CLIP, folder=TOY_ROOT.parent / "toy_clip"):
    """The toy world's pretrained CLIP (toy_clip.py made it; train.py --clip toy, the toy preset's): the plain .pt
    that clip.load reads."""
    return unpacked(path, folder, "toy_clip.py")


def read_toy_vae(path=TOY_VAE, folder=TOY_ROOT.parent / "toy_vae"):
    """The toy world's pretrained VAE (toy_vae.py made it; train.py --vae_weights toy, the toy preset's): its state
    dict in fp32."""
    state = files.read_torch(unpacked(path, folder, "toy_vae.py"), advice="make it again with toy_vae.py")
    return {k: v.float() for k, v in state.items()}


def caption_colour(caption):
    """The TOY_COLOURS entry a toy caption says is drawn in the mask: the last colour it names
    ("... replaced by a repeated green cable" -> green, "... exposing the copper core" -> copper),
    black for a missing part, None if it names no colour."""
    words = re.findall(r"[a-z]+", caption.lower().replace("grey", "gray"))
    colours = [w for w in words if w in TOY_COLOURS]
    if "missing" in words and "black" not in colours:
        return "black"
    return colours[-1] if colours else None


# the defect types whose caption names the colour drawn, and the colours each may take
RECOLOURABLE = {"contamination": CONTAMINANTS, "cable_swap": CABLE_WIRES, "color": SPOTS}


def recoloured(caption, defect):
    """The caption with its drawn colour (caption_colour) replaced by each other colour its defect type may take and
    the caption does not already name: "The blue cable is replaced by a repeated green cable" -> "... a repeated
    gray cable". A caption of another defect type has none."""
    drawn, named = caption_colour(caption), set(re.findall(r"[a-z]+", caption.lower()))
    at = caption.rfind(drawn) if drawn else -1
    return [caption[:at] + colour + caption[at + len(drawn):] for colour in RECOLOURABLE.get(defect, ())
            if colour not in named and at >= 0]


def drawn_colour(image, mask):
    """Name of the TOY_COLOURS entry nearest to the median colour of image [3, S, S] inside mask [1, S, S]."""
    inside = mask.reshape(-1) > 0.5
    if not inside.any():
        raise ValueError("drawn_colour: the mask is empty")
    median = image.detach().float().cpu().reshape(3, -1)[:, inside.cpu()].median(dim=1).values * 255   # [3]
    table = torch.tensor(list(TOY_COLOURS.values()), dtype=torch.float32)
    return list(TOY_COLOURS)[int((table - median).norm(dim=1).argmin())]
