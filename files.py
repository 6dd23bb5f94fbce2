"""Files: weights read without trusting them, results written without losing any.

    read_torch           a torch.save file, unpickled weights-only: tensors and plain containers, never code
    read_state_dict      read_torch of a file that must hold a state dict (the metrics' networks)
    read_torchscript     the state dict of a TorchScript archive (OpenAI's CLIP files)
    read_safetensors     the safetensors format (Hugging Face's), read by hand and memory-mapped
    write_safetensors    its inverse
    atomic_write         a temporary file renamed onto the target: a kill never leaves half a file
    save_atomic          torch.save through atomic_write
    remove_stale_temporaries   what atomic_write left behind when a run was killed mid-write
    run_lock             one run at a time in an output folder

Every script reads and writes weights through these (train.py, sample.py and evaluate.py their checkpoints,
sd.py Stable Diffusion files, clip.py CLIP's, metrics.py the metrics' networks). A file is not trusted to be what
it says: the readers refuse, in one line naming the file, a pipe or device where a file belongs
(refuse_special_file) and anything that claims more memory than the file holds (check_zip,
refuse_inflating_pickles, check_tensors, safetensors_entries), before a network is built from it. Depends on
nothing of the project.
"""
import fcntl  # Unix; the project runs on Linux (and macOS)
import gzip
import io
import json
import math
import os
import pickletools
import re
import stat
import warnings
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
    with `advice`. Nothing the file claims without holding it gets built (check_zip, refuse_inflating_pickles,
    check_tensors)."""
    refuse_special_file(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: an empty file (0 bytes; an interrupted download or copy?)")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped and not zipfile.is_zipfile(path):  # the zip's central directory, at the very end, is missing
        raise ValueError(f"{path}: truncated PyTorch checkpoint (incomplete download?)")
    if zipped:
        check_zip(path, "PyTorch checkpoint")
    refuse_inflating_pickles(path, zipped, advice)
    try:
        with torch.serialization.safe_globals(list(allowed)):  # for this load only
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)  # mmap: no second copy
    except Exception as e:  # one plain line, not torch's paragraph (with terminal colour codes) on weights_only
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split("WeightsUnpickler error:")[-1]
        refused = re.search(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)|but got <class '([\w.]+)'>", text)
        if refused:
            raise ValueError(f"{path}: pickles {next(filter(None, refused.groups()))}, which a weights-only load does "
                             f"not run; {advice}") from None
        reason = next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]
        what = "PyTorch checkpoint" if zipped else "PyTorch file in the legacy (non-zip) format"
        raise ValueError(f"{path}: unreadable {what} ({type(e).__name__}: {reason})") from None
    check_tensors(obj, path)
    return obj


def read_state_dict(path, network, flag):
    """A state dict file (given by `flag`, e.g. --inception) -> {name: tensor}, by read_torch; anything else, or no
    file, is one line naming it."""
    refuse_special_file(path, f"{network} weights")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: {network} weights file not found ({flag})")
    state = read_torch(path, advice=f"a weights file holds only tensors: save the {network}'s state_dict() with "
                                    f"torch.save")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: not a state dict of {network} ({flag}): a dict of tensors expected")
    return state


def read_torchscript(path):
    """The state dict of a TorchScript archive (OpenAI's CLIP releases), checked as read_torch checks its files.
    torch.jit.load compiles the archive's TorchScript code and runs the __setstate__ methods it defines (which could
    build tensors of any size): an archive with any, or with C++ classes (torch.classes, which have their own), is
    refused unread. OpenAI's archives hold plain modules."""
    refuse_special_file(path)
    check_zip(path, "TorchScript archive")
    with zipfile.ZipFile(path) as archive:
        for entry in archive.infolist():  # code/*.py, its debug copies and the pickles; not the tensors (data/)
            if "/data/" not in entry.filename and entry.filename.endswith((".py", ".pkl")):
                text = archive.read(entry)
                if b"__setstate__" in text or b"torch.classes" in text:
                    raise ValueError(f"{path}: a TorchScript archive whose code runs when it loads (__setstate__ or "
                                     f"torch.classes in {shown(entry.filename)}); save its state_dict() with "
                                     f"torch.save and pass that file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            state = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # torch.jit's C++ errors are paragraphs; one line of it
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:200]
        raise ValueError(f"{path}: unreadable TorchScript archive ({type(e).__name__}: {reason})") from None
    check_tensors(state, path)
    return state


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}, memory-mapped: tensors view the file's pages, nothing is copied.
    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets},
    "__metadata__": {...}}, then raw little-endian tensors; offsets count from the end of the header."""
    refuse_special_file(path)
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
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past what the parser follows
            raise ValueError(f"{path}: corrupted safetensors file (its header is not JSON)") from None
    entries = safetensors_entries(header, path, size - 8 - n)
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: a writable buffer for torch, the file stays read-only
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if end == begin:  # frombuffer refuses zero bytes
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=8 + n + begin)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def safetensors_entries(header, path, data_size):
    """A safetensors header (parsed JSON) -> {name: (dtype, shape, begin, end)}, every field checked: a dtype this
    reader knows, a shape of whole numbers >= 0, offsets begin <= end within the data's `data_size` bytes and
    matching the shape, no two tensors on the same bytes (each would become a network's weights of its own).
    __metadata__ is not read."""
    def corrupted(what):
        return ValueError(f"{path}: corrupted safetensors file ({what})")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensor = f"tensor {shown(name)}"
        if not isinstance(info, dict):
            raise corrupted(f"{tensor}'s entry is not a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise corrupted(f"{tensor} has no dtype name")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: {tensor} has dtype {shown(dtype)}, which this reader does not handle")
        if not isinstance(shape, list) or not all(whole(d) for d in shape):
            raise corrupted(f"{tensor}'s shape is not a list of whole numbers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(o) for o in offsets) or offsets[0] > offsets[1]:
            raise corrupted(f"{tensor}'s data_offsets are not two whole numbers begin <= end")
        begin, end = offsets
        if end > data_size:
            raise ValueError(f"{path}: truncated safetensors file ({data_size} bytes of data, {tensor} ends at {end}; "
                             f"incomplete download?)")
        if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
            raise corrupted(f"{tensor}'s size does not match its shape")
        entries[name] = (SAFETENSORS_DTYPES[dtype], shape, begin, end)
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise corrupted(f"tensors {shown(first)} and {shown(second)} share bytes")
    return entries


def whole(value):
    """A whole number >= 0 (JSON's true and false are not)."""
    return type(value) is int and value >= 0


def shown(name, limit=200):
    """A name from a file, fit for a one-line message: quoted if it holds odd characters, cut if long."""
    text = name if isinstance(name, str) and name.isprintable() else repr(name)
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------------
# What a weights file may not do: be something other than a file, or claim more than it holds


def refuse_special_file(path, what="a weights file"):
    """Refuse a pipe, a device or a socket where a file (or folder) is expected, in one line: reading one can
    block for ever (a named pipe without a writer) or never end (/dev/zero), and a pipe cannot be read twice.
    Follows links: `--sd <(cat file)` gives /dev/fd/N, a link to a pipe. A missing path is the caller's to name."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    kinds = {stat.S_ISFIFO: "a pipe", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket"}
    kind = next((name for test, name in kinds.items() if test(mode)), None)
    if kind:
        raise ValueError(f"{path}: {kind}, not a file ({what} expected): save it to a file first")


def check_zip(path, what):
    """A zip archive as torch.save and torch.jit.save write it: every entry inside the file, and unpacked not much
    bigger than the file (torch.jit.save compresses its code; a compressed entry could inflate a thousandfold, and
    torch's reader would unpack it in memory)."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except Exception:  # BadZipFile, or a field zipfile chokes on: the central directory at the end is missing or bad
        raise ValueError(f"{path}: truncated or corrupted {what} (incomplete download?)") from None
    for entry in entries:
        if entry.header_offset + entry.compress_size > size:
            raise ValueError(f"{path}: truncated or corrupted {what} (entry {shown(entry.filename)} ends past the "
                             f"file; incomplete download?)")
    unpacked = sum(entry.file_size for entry in entries)
    if unpacked > 2 * size + MAX_UNPACKED_EXTRA:
        raise ValueError(f"{path}: a {what} whose entries unpack to {unpacked:,} bytes from {size:,} (compressed "
                         f"entries that inflate in memory); not a weights file")


MAX_UNPACKED_EXTRA = 2 ** 24  # 16 MiB: what compressed entries (TorchScript's code) may add to a zip's size


# what the weights-only unpickler allows that builds any amount of memory from a few bytes of pickle
INFLATING = {"bytearray": "bytearray(n) makes n bytes",
             "_rebuild_device_tensor_from_cpu_tensor": "its dtype conversion copies a view out to its full shape"}


def refuse_inflating_pickles(path, zipped, advice):
    """Scan the file's pickles (a zip's data.pkl; the legacy format's leading pickles) for the INFLATING globals,
    without unpickling anything: torch.load would build them before any tensor could be checked. Neither is in
    a weights file torch.save writes."""
    if zipped:
        with zipfile.ZipFile(path) as archive:  # every data.pkl: a forged archive may hold two
            found = [inflating_global(io.BytesIO(archive.read(entry))) for entry in archive.infolist()
                     if entry.filename.endswith("data.pkl")]
    else:
        with open(path, "rb") as f:  # magic number, protocol, system info, the object, its storage keys
            found = [inflating_global(f) for _ in range(5)]
    name = next(filter(None, found), None)
    if name:
        raise ValueError(f"{path}: pickles {name}, which a weights file does not hold "
                         f"({INFLATING[name.rpartition('.')[2]]}); {advice}")


def inflating_global(stream):
    """The first INFLATING global the pickle at `stream` names ("module.name"), read opcode by opcode without
    executing any; None if it names none, or stops parsing (torch.load, which reads the same opcodes, fails there
    too, before it gets further)."""
    try:
        for _, arg, _ in pickletools.genops(stream):
            # GLOBAL's "module name" (builtins, or __builtin__ as protocol 2 writes it), or a string STACK_GLOBAL takes
            named = re.fullmatch(r"(?:[\w.]+ )?(\w+)", arg) if isinstance(arg, str) else None
            if named and named[1] in INFLATING:
                return arg.replace(" ", ".")
    except Exception:  # ValueError, EOFError, MemoryError, ...: not a pickle from here on
        pass
    return None


MAX_DEPTH = 64  # containers in a weights file nest a few levels deep; a cycle nests without end
MAX_REPEATED = 1_000_000  # items reached more than once through containers a pickle repeats (by reference)
MAX_CLAIMED = 4  # all tensors together may claim this many times the bytes the file stores (tied weights)


def check_tensors(obj, path):
    """Refuse, in one line naming the file, what an unpickled file claims without holding it:
    - a tensor whose shape needs more bytes than its storage holds (a stride-0 view of one number can claim any
      shape; the networks built from its shape would be that big, and filled by copying it);
    - a tensor without data of its own (meta, sparse, nested);
    - tensors that all view the same few bytes (together more than MAX_CLAIMED times what the file stores);
    - containers nested deeper than MAX_DEPTH (or holding themselves), or repeating one another by reference into
      MAX_REPEATED more items than they store (each walk over them, or a message printing them, would explode)."""
    unfolded = {}  # id(container) -> (items, claimed bytes) it unfolds to: each container is walked once
    stored = {}  # storage address -> the bytes it holds
    distinct = 0  # the items walked, each container's once

    def walk(node, where, depth):
        nonlocal distinct
        if isinstance(node, torch.Tensor):
            claimed = check_tensor(node, where or "(the whole file)", path)
            stored[node.untyped_storage().data_ptr()] = node.untyped_storage().nbytes()
            return 1, claimed
        if not isinstance(node, (dict, list, tuple, set, frozenset)):
            return 1, 0
        if id(node) in unfolded:
            return unfolded[id(node)]
        if depth > MAX_DEPTH:
            raise ValueError(f"{path}: containers nested more than {MAX_DEPTH} deep (at {shown(where)}); "
                             f"not a weights file")
        items, claimed = 1, 0
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            # a key is named by its type unless a plain name or index: printing a nested one could explode
            label = str(key) if isinstance(key, (str, int)) else f"({type(key).__name__})"
            label = f"{where}.{label}" if where else label
            if isinstance(key, (tuple, frozenset)):  # a key can nest containers too
                n, c = walk(key, label, depth + 1)
                items, claimed, distinct = items + n, claimed + c, distinct + 1
            n, c = walk(value, label, depth + 1)
            items, claimed, distinct = items + n, claimed + c, distinct + 1
        unfolded[id(node)] = items, claimed
        return items, claimed

    items, claimed = walk(obj, "", 0)
    if items - distinct > MAX_REPEATED:
        raise ValueError(f"{path}: containers that repeat one another into {items:,} items (it stores "
                         f"{distinct:,}); not a weights file")
    held = sum(stored.values())
    if claimed > MAX_CLAIMED * held + 2 ** 20:
        raise ValueError(f"{path}: its tensors claim {claimed:,} bytes but it stores {held:,} (views of the same "
                         f"numbers over and over); not a weights file")


def check_tensor(tensor, where, path):
    """One tensor of check_tensors -> the bytes its shape claims; raises unless it holds them."""
    if tensor.layout != torch.strided or tensor.is_nested:
        raise ValueError(f"{path}: tensor {shown(where)} is {'nested' if tensor.is_nested else tensor.layout}; a "
                         f"weights file holds dense tensors")
    if tensor.device.type != "cpu":
        raise ValueError(f"{path}: tensor {shown(where)} has no data (a {tensor.device.type} tensor); a weights file "
                         f"holds numbers")
    claimed = tensor.numel() * tensor.element_size()
    held = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
    if claimed > held:
        raise ValueError(f"{path}: tensor {shown(where)} claims shape {list(tensor.shape)} ({claimed:,} bytes) but "
                         f"holds {max(held, 0):,} bytes (a view repeating its numbers); not a weights file")
    return claimed


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


def save_gzipped(obj, path):
    """torch.save, gzip-compressed (level 9, no date in the header: the same object writes the same bytes), through
    atomic_write: how the toy world's pretrained CLIP and VAE ship in the repository."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0))
    return Path(path)


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
    killed run leaves no stale lock. The empty file stays: deleting it would let a process that opened it just
    before and a later one lock two different files."""
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
            f.truncate(0)
