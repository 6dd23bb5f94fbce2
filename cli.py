"""What the three scripts (train.py, sample.py, evaluate.py) share: the command line and the run.

- the data flags (--category, --toy, --data_root) and the category folders, validated whole before
  anything is written;
- every key of config.py as a `--key value` flag, typed like its default, with its help;
- the device, bf16 autocast, progress bars that also read well in a log file;
- several processes (torchrun): the process group, which process writes, gathering values (train.py wraps its
  models in DDP itself).
"""
import argparse
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import toy
from config import CONFIG, KEYS, PRESETS, allowed_text, default_preset


def add_data_args(parser, several=False):
    parser.add_argument("--category", required=True, help="category folder name, e.g. bottle" + (
        "; several: bottle,cable,pill; all: every category under --data_root (or of --toy)" if several else ""))
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


def value_parser(default):
    """parse_value for one key, named after the type argparse names in its message ("invalid int value: 'x'")."""
    parse = lambda text: parse_value(text, default)
    parse.__name__ = type(default).__name__
    return parse


def add_config_args(parser, keys=None, defaults=CONFIG, title="config (the toy preset's defaults)"):
    """A `--key value` flag for each config key (or `keys`), with its help, allowed values (config.KEYS;
    config.resolve checks them) and its value in `defaults` (a resolved preset: what the run would take)."""
    group = parser.add_argument_group(title)
    for name in keys or list(KEYS):
        key, default = KEYS[name], defaults[name]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        allowed = f" [allowed: {allowed_text(name)}]" if allowed_text(name) and not key.choices else ""
        group.add_argument(f"--{name}", type=value_parser(key.default), default=None,
                           metavar=type(key.default).__name__.upper(),
                           help=f"{key.help} (default: {shown}){allowed}".replace("%", "%%"))


def chosen_preset(argv):
    """The preset a command line will run (--preset, else config.default_preset of --toy and --sd), read before
    the whole command line is: --help then shows that preset's defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--preset", "--sd"):
        parser.add_argument(flag)
    parser.add_argument("--toy", action="store_true")
    known, _ = parser.parse_known_args(argv)
    return known.preset if known.preset in PRESETS else default_preset(known.toy, known.sd)


def config_overrides(args):
    """The CONFIG keys the user gave on the command line."""
    return {k: v for k in KEYS if (v := getattr(args, k, None)) is not None}


def category_names(args):
    """--category's names, sorted: one; several, comma-separated; or all: every toy category with --toy, else
    every folder under --data_root with a train/good/ (an MVTec category)."""
    names = sorted({category_name(name) for name in args.category.split(",") if name.strip()})
    if not names:
        raise ValueError(f"--category {args.category!r} names no category; give one (e.g. bottle), several "
                         f"separated by commas (bottle,cable), or all")
    if "all" in names and len(names) > 1:
        raise ValueError(f"--category {args.category}: all stands alone (every category); or list the names "
                         f"without it")
    if names != ["all"]:
        return names
    if args.toy:
        return list(toy.TOY_CATEGORIES)
    root = data_root(args)
    names = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir()) if root.is_dir() else []
    if not names:
        raise FileNotFoundError(f"{root}: --category all found no category folder (<name>/train/good/) here")
    return names


def category_name(text):
    """One --category name as the folder name it is. A trailing slash, which a shell's tab completion adds to a
    folder's name, is dropped. A path is refused: --data_root says where the categories are, and the name
    becomes part of runs/<name> and of the checkpoint, where a path would put them elsewhere."""
    name = text.strip().rstrip("/")
    if name in ("", ".", ".."):
        raise ValueError(f"--category {text}: give a category's folder name, e.g. bottle")
    if "/" in name or os.sep in name:
        folder = Path(name)
        raise ValueError(f"--category {text}: give the category's folder name ({folder.name}) and the folder that "
                         f"holds it as --data_root ({folder.parent})")
    return name


def data_root(args):
    """The folder --data_root names (default data/mvtec): a file there is the user's slip."""
    root = Path(args.data_root or "data/mvtec")
    if root.exists() and not root.is_dir():
        raise ValueError(f"--data_root {root} is a file; give the folder that holds the category folders")
    return root


def category_folder(args, name=None):
    """The category folder the flags name (or `name`'s), validated whole (data.load_category) before any writing."""
    name = category_name(name or args.category)
    if args.toy and args.data_root:
        raise ValueError("give either --toy or --data_root, not both")
    if args.toy:
        if name not in toy.TOY_CATEGORIES:
            raise ValueError(f"--toy has categories {', '.join(toy.TOY_CATEGORIES)}, not {name!r}")
        return toy.ensure_toy(name)
    root = data_root(args)
    folder = root / name
    if not folder.exists() and (root / "train" / "good").is_dir():
        raise FileNotFoundError(f"--data_root {root} is a category folder itself; give the folder that holds it: "
                                f"--data_root {root.parent} --category {root.name}")
    data.load_category(folder)  # raises one clear line on a missing folder or bad data
    return folder


def pick_device(name):
    """--device as a torch.device: auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists two dozen device types this project does not run on
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: give auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s), cuda:0 and up")
    return device


def uses_bf16(device, enabled=True):
    """Whether autocast computes in bf16 here: on CUDA, and on CPUs that multiply bf16 natively (Intel's AMX
    units, AVX512-BF16 of Intel Cooper Lake and AMD Zen 4 and newer), where the toy stages run faster
    (measured: docs/speed.md)."""
    native = device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return enabled and (device.type == "cuda" or native)


def autocast(device, enabled=True):
    """bf16 autocast where uses_bf16 says so, else fp32. The weights, the optimiser and the losses stay
    fp32, so no loss scaling is needed."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(device, enabled) else nullcontext()


def progress(total, desc, initial=0):
    """A tqdm bar (on rank 0 only); when stderr is not a terminal (a log file), a plain line every 15 s
    instead of a carriage-return update many times a second."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, disable=not is_main())
    return tqdm(total=total, initial=initial, desc=desc, file=LogLines(), mininterval=15, ncols=100,
                disable=not is_main())


class LogLines:
    """tqdm's status line written as whole lines, for logs."""

    def write(self, text):
        if text.strip():
            sys.stderr.write(text.strip("\r\n") + "\n")

    def flush(self):
        sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node N train.py ...` starts N copies of the script, one per
# GPU (or N on a CPU), and sets RANK, WORLD_SIZE and LOCAL_RANK. Here: the process group, and which process
# writes; how train.py shares a batch and wraps its models in DDP is train.py's (share, data_parallel), how
# sample.py splits its batches is sample.py's (draw).


def init_distributed(device_name="auto"):
    """(rank, world_size, device): under torchrun, join the process group (NCCL on CUDA, gloo on a CPU) on the
    GPU LOCAL_RANK names; without it, (0, 1, the device) and no process group. Only rank 0 prints."""
    device = pick_device(device_name)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR
    if dist.get_rank() != 0:  # the others would repeat each line N times
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank(), dist.get_world_size(), device


def is_main():
    """Whether this process writes checkpoints, previews and logs: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    """How many processes share the work: 1 without torchrun."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first():
    """Run the block on rank 0 first, then on the others: what it writes (the toy world) is there for them."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def gather(value):
    """[value of rank 0, of rank 1, ...]: any picklable value from every process, in every process."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def finish_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()
