"""What the three scripts (train.py, sample.py, evaluate.py) share: the command line and the run.

- the data flags (--category, --toy, --data_root) and the category folder, validated whole before
  anything is written;
- every key of config.py as a `--key value` flag, typed like its default, with its help;
- the device, bf16 autocast, the optimiser, progress bars that also read well in a log file, and files
  (checkpoints, Stable Diffusion files) written atomically.
"""
import argparse
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import data
import toy
from config import CONFIG, KEYS


def add_data_args(parser):
    parser.add_argument("--category", required=True, help="category folder name, e.g. bottle")
    parser.add_argument("--toy", action="store_true", help="use the built-in toy world (generated on first use)")
    parser.add_argument("--data_root", help="folder holding <category>/ in the MVTec AD or LOCO layout")


def parse_value(text, default):
    """A command-line string typed like the CONFIG default it overrides."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        return tuple(int(v) for v in text.split(",") if v.strip())
    return type(default)(text)


def add_config_args(parser, keys=None):
    """A `--key value` flag for each config key (all but preset, or `keys`), with its help from config.KEYS."""
    group = parser.add_argument_group("config (toy preset defaults shown; a preset or checkpoint may change them)")
    for name in keys or [k for k in CONFIG if k != "preset"]:
        key = KEYS[name]
        shown = ",".join(map(str, key.default)) if isinstance(key.default, tuple) else key.default
        group.add_argument(f"--{name}", type=lambda text, d=key.default: parse_value(text, d), default=None,
                           metavar=type(key.default).__name__.upper(),
                           help=f"{key.help} (default: {shown})".replace("%", "%%"))


def config_overrides(args):
    """The CONFIG keys the user gave on the command line."""
    return {k: v for k in CONFIG if k != "preset" and (v := getattr(args, k, None)) is not None}


def category_folder(args):
    """The category folder the flags name, validated whole (data.load_category) before any writing."""
    if args.toy and args.data_root:
        raise ValueError("give either --toy or --data_root, not both")
    if args.toy:
        if args.category not in toy.TOY_CATEGORIES:
            raise ValueError(f"--toy has categories {', '.join(toy.TOY_CATEGORIES)}, not {args.category!r}")
        return toy.ensure_toy(args.category)
    folder = Path(args.data_root or "data/mvtec") / args.category
    data.load_category(folder)  # raises one clear line on a missing folder or bad data
    return folder


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`, renamed onto it when the block ends: a kill mid-write never
    leaves a half-written checkpoint (the rename is atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def save_atomic(obj, path):
    """torch.save through atomic_write."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def uses_bf16(device, enabled=True):
    """Whether autocast computes in bf16 here: on CUDA, and on CPUs whose matrix units (AMX) multiply
    bf16 natively, where the toy VAE's training step runs 2x faster (8x for a bare matmul)."""
    return enabled and (device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_amx_tile_supported()))


def autocast(device, enabled=True):
    """bf16 autocast where uses_bf16 says so, else fp32. The weights, the optimiser and the losses stay
    fp32, so no loss scaling is needed."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(device, enabled) else nullcontext()


def adamw(params, lr, weight_decay=0.01):
    """AdamW as one fused kernel over all the weights: 3x faster than torch's per-tensor loop on a CPU."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def progress(total, desc, initial=0):
    """A tqdm bar; when stderr is not a terminal (a log file), a plain line every 15 s instead of a
    carriage-return update many times a second."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc)
    return tqdm(total=total, initial=initial, desc=desc, file=LogLines(), mininterval=15, ncols=100)


class LogLines:
    """tqdm's status line written as whole lines, for logs."""

    def write(self, text):
        if text.strip():
            sys.stderr.write(text.strip("\r\n") + "\n")

    def flush(self):
        sys.stderr.flush()
