"""Files: weights read without trusting them, results written without losing any.

    read_torch           a torch.save file, unpickled weights-only: tensors and plain containers, never code
    read_safetensors     the safetensors format (Hugging Face's), read by hand and memory-mapped
    write_safetensors    its inverse
    atomic_write         a temporary file renamed onto the target: a kill never leaves half a file
    save_atomic          torch.save through atomic_write
    remove_stale_temporaries   what atomic_write left behind when a run was killed mid-write
    run_lock             one run at a time in an output folder

Every script reads and writes weights through these (train.py, sample.py and evaluate.py their checkpoints,
sd.py Stable Diffusion files). Depends on nothing of the project.
"""
import fcntl  # Unix; the project runs on Linux (and macOS)
import json
import math
import os
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

LOCK = ".axf_lock"  # run_lock's file in an output folder
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_torch(path, allowed=(), advice="use the .safetensors release of this model"):
    """A torch.save file (a zip archive, or before torch 1.6 a bare pickle) -> its object, unpickled weights-only:
    tensors, plain containers and the `allowed` globals; anything else (it could run code) is refused by name,
    with `advice`."""
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped and not zipfile.is_zipfile(path):  # the zip's central directory, at the very end, is missing
        raise ValueError(f"{path}: truncated PyTorch checkpoint (incomplete download?)")
    try:
        with torch.serialization.safe_globals(list(allowed)):  # for this load only
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)  # mmap: no second copy
    except Exception as e:  # one plain line, not torch's paragraph (with terminal colour codes) on weights_only
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split("WeightsUnpickler error:")[-1]
        refused = re.search(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)|but got <class '([\w.]+)'>", text)
        if refused:
            raise ValueError(f"{path}: pickles {next(filter(None, refused.groups()))}, which a weights-only load does "
                             f"not run; {advice}") from None
        reason = next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]
        what = "PyTorch checkpoint" if zipped else "PyTorch file in the legacy (non-zip) format"
        raise ValueError(f"{path}: unreadable {what} ({type(e).__name__}: {reason})") from None


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}, memory-mapped: tensors view the file's pages, nothing is copied.
    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets},
    "__metadata__": {...}}, then raw little-endian tensors; offsets count from the end of the header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        start = f.read(1)
        if size < 10 or start != b"{" or n > 100_000_000:  # 100 MB: the reference reader's header cap
            raise ValueError(f"{path}: neither a safetensors file nor a PyTorch checkpoint")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (its header alone needs {8 + n} bytes; incomplete download?)")
        try:
            header = json.loads(start + f.read(n - 1))
            header.pop("__metadata__", None)
            entries = {name: (info["dtype"], [int(d) for d in info["shape"]], int(info["data_offsets"][0]),
                              int(info["data_offsets"][1])) for name, info in header.items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path}: corrupted safetensors file (its header is not the expected JSON)") from None
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: a writable buffer for torch, the file stays read-only
    tensors = {}
    for name, (dtype_name, shape, begin, end) in entries.items():
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype_name}, which this reader does not handle")
        if 8 + n + end > size:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, tensor {name} ends at {8 + n + end}; incomplete download?)")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: corrupted safetensors file (tensor {name}'s size does not match its shape)")
        if end == begin:  # frombuffer refuses zero bytes
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=8 + n + begin)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def write_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file (the layout read_safetensors reads), written atomically (temp file
    + rename). Data starts 8-byte aligned, as the reference writer does; metadata is a {str: str} dict."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return os.fspath(path)


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`, renamed onto it when the block ends: a kill mid-write never
    leaves a half-written checkpoint (the rename is atomic on one file system). The temporary name holds the
    process id, so two processes writing the same file never write into one temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    yield tmp
    os.replace(tmp, path)


def save_atomic(obj, path):
    """torch.save through atomic_write."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def remove_stale_temporaries(folder, names):
    """Delete the temporary files atomic_write leaves beside `names` (files in `folder`) when a kill stops a write:
    <name>.<pid>.tmp, as large as the checkpoint. Call it holding run_lock, so no other process is writing them."""
    for name in names:
        for tmp in Path(folder).glob(f"{glob_escape(name)}.*.tmp"):
            if tmp.name[len(name) + 1:-4].isdigit() and tmp.is_file():
                tmp.unlink()


def glob_escape(name):
    return re.sub(r"([*?[])", r"[\1]", name)


@contextmanager
def run_lock(folder, what="run"):
    """Hold an exclusive lock on `folder` (the file .axf_lock in it) while the block runs; a second process that
    asks for it is refused in one line. The operating system releases the lock when its process dies, so a
    killed run leaves no stale lock; the file itself is deleted on the way out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ValueError(f"{folder}: another {what} ({holder}) is writing here; wait for it to end, or pass "
                             f"another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
