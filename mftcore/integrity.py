"""Is a file whole, and safe to read? Checks that run before anything is loaded from a checkpoint (or a
model directory), so that a damaged or hostile one is one line naming the file, never a traceback
from deep inside torch or safetensors, and never code run by an unpickler.

  safetensors  the 8-byte header length, the JSON header (strict reader), and the file size equal to
               header + the last tensor's end: a truncated or zero-filled file is caught here
  torch .pt    a zip archive with one data.pkl (torch.save's format): the central directory sits at
               the end, so a truncated file has none; its pickle may hold only what
               torch.load(weights_only=True) rebuilds (`refused_globals`), or the extra names an
               engine allows (DeepSpeed's own classes)
  pickle       DCP's .metadata is a plain pickle that torch.distributed.checkpoint unpickles with no
               restriction: `load_restricted` reads it with an unpickler that builds only the
               checkpoint metadata classes, so a tampered file is refused before DCP sees it
  JSON         through mftcore.io.read_json (strict)
"""

from __future__ import annotations

import io as _io
import os
import pickle
import zipfile

from mftcore.errors import MftcoreError
from mftcore.io import JsonProblem, parse_json, read_json_object

MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own limit (100 MB)


class CheckpointError(MftcoreError):
    """A checkpoint (or model file) that is damaged, incomplete or refused; the message names it."""


def safetensors_problem(path: str) -> str | None:
    """Why `path` is not a whole safetensors file, or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(MAX_SAFETENSORS_HEADER, size - 8):
                return (f"{os.path.basename(path)}: not a whole safetensors file ({size} bytes; truncated or "
                        "overwritten)")
            header = parse_json(f.read(n), max_depth=8)
    except OSError as e:
        return f"{os.path.basename(path)}: cannot read: {e.strerror}"
    except JsonProblem:
        return f"{os.path.basename(path)}: the safetensors header is not valid JSON (damaged)"
    if not isinstance(header, dict):
        return f"{os.path.basename(path)}: the safetensors header is not a JSON object (damaged)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return f"{os.path.basename(path)}: the safetensors header lacks tensor offsets (damaged)"
    if 8 + n + end != size:
        return (f"{os.path.basename(path)}: {size} bytes, but its header describes {8 + n + end} "
                f"({'truncated' if size < 8 + n + end else 'extra bytes'})")
    return None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def weights_problem(directory: str) -> str | None:
    """The HF weights of a checkpoint or model directory: one safetensors file, or an index and its shards."""
    for stem in ("adapter_model", "model"):
        single = os.path.join(directory, f"{stem}.safetensors")
        if os.path.isfile(single):
            return safetensors_problem(single)
        index = single + ".index.json"
        if os.path.isfile(index):
            try:
                shards = sorted(set(read_json_object(index, error=CheckpointError)["weight_map"].values()))
            except (CheckpointError, KeyError, AttributeError, TypeError) as e:
                return f"{os.path.basename(index)}: not a weight index ({str(e) or 'no weight_map'})"
            for shard in shards:
                path = os.path.join(directory, str(shard))
                if os.path.dirname(os.path.normpath(str(shard))) or not os.path.isfile(path):
                    return f"{shard} (listed in {os.path.basename(index)}) is missing"
                problem = safetensors_problem(path)
                if problem:
                    return problem
            return None
    return "no model weights (model.safetensors or adapter_model.safetensors) in it"


def irregular_file(directory: str) -> str | None:
    """The first entry of a model or tokenizer directory that is neither a regular file nor a directory
    (a FIFO would block transformers' reader forever, a device never end; a broken link is named too)."""
    import stat

    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        return f"cannot list it ({e.strerror})"
    for name in names:
        try:
            mode = os.stat(os.path.join(directory, name)).st_mode
        except OSError:
            if os.path.islink(os.path.join(directory, name)):
                return f"{name} is a broken symbolic link"
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return f"{name} is not a regular file"
    return None


def torch_archive(path: str) -> tuple[zipfile.ZipFile | None, str | None]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        size = os.path.getsize(path) if os.path.exists(path) else 0
        return None, f"{os.path.basename(path)}: not a whole torch.save file ({size} bytes; truncated or overwritten)"
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist()):
        archive.close()
        return None, f"{os.path.basename(path)}: a zip archive without torch's data.pkl (not a torch.save file)"
    return archive, None


def torch_file_problem(path: str, allowed: tuple = ()) -> str | None:
    """Why `path` is not a whole torch.save archive that weights_only loading accepts (plus `allowed`
    "module.name" prefixes), or None."""
    archive, problem = torch_archive(path)
    if problem:
        return problem
    archive.close()
    refused = refused_globals(path, allowed)
    if refused:
        return (f"{os.path.basename(path)}: refused: its pickle names {', '.join(refused[:3])}, which "
                "torch.load(weights_only=True) does not rebuild (unpickling it could run code)")
    return None


def refused_globals(path: str, allowed: tuple = ()) -> list:
    """The globals of a torch.save archive's pickle that weights_only loading refuses, minus `allowed`
    (prefixes of "module.name"). torch lists them without unpickling anything."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an archive torch cannot read at all
        return ["(an unreadable pickle)"]
    return [n for n in names if not n.startswith(allowed)]


def load_torch_file(path: str, **kwargs):
    """torch.load(weights_only=True), its refusals and read errors as one CheckpointError line."""
    import torch

    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): it holds pickled objects "
                              f"that could run code ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read ({first[:200]}); the file is damaged") from None


# --- pickles that are not torch archives: DCP's .metadata ------------------------------------------

RESTRICTED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                      "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
RESTRICTED_NAMES = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                    ("pathlib", "PureWindowsPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                    ("builtins", "slice"), ("builtins", "complex")}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds checkpoint-metadata dataclasses, torch dtypes, sizes and layouts, and nothing else."""

    def find_class(self, module: str, name: str):
        if module in RESTRICTED_MODULES and not name.startswith("__"):
            return super().find_class(module, name)
        if (module, name) in RESTRICTED_NAMES:
            return super().find_class(module, name)
        if module == "torch" and not name.startswith("_"):
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_restricted(path: str):
    """The pickle at `path` through RestrictedUnpickler; a refusal or damage is a CheckpointError line."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(_io.BufferedReader(f)).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: {e} (unpickling it could run code)") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}); the file is damaged") from None


def dcp_problem(directory: str) -> str | None:
    """A torch.distributed.checkpoint directory: metadata readable by the restricted unpickler, and every
    shard it names present and long enough for the bytes it records there."""
    meta_path = os.path.join(directory, ".metadata")
    if not os.path.isfile(meta_path):
        return f"{os.path.basename(directory)}/.metadata is missing"
    try:
        meta = load_restricted(meta_path)
    except CheckpointError as e:
        return str(e).replace(os.path.dirname(directory) + os.sep, "")
    ends = {}
    for info in getattr(meta, "storage_data", {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.split("/"):
            return f"{os.path.basename(directory)}/.metadata names a shard outside the checkpoint: {rel!r}"
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(ends.items()):
        shard = os.path.join(directory, rel)
        if not os.path.isfile(shard):
            return f"{os.path.basename(directory)}/{rel} is missing"
        if os.path.getsize(shard) < end:
            return (f"{os.path.basename(directory)}/{rel}: {os.path.getsize(shard)} bytes, its metadata needs {end} "
                    "(truncated)")
    return None


def json_problem(path: str) -> str | None:
    from mftcore.io import read_json

    try:
        read_json(path, error=CheckpointError)
    except CheckpointError as e:
        return str(e).replace(os.path.dirname(path) + os.sep, "")
    return None
