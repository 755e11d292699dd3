"""Files: the one way mftcore writes them (whole or not at all) and reads JSON objects, and their names.

Every writer goes through `atomic_dir` (a directory) or `atomic_write_text` (a file): the content is
written under a temporary name beside the target and renamed over it once complete, so a reader (or a
run resumed after a SIGKILL) never sees half of one. Temporary names start with ".tmp-", so that
`remove_leftovers` can clear what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid

from mftcore.errors import ConfigError

CONFIG_FILE = "mftcore_config.json"  # the training config, saved in checkpoints, final/ and merged models
STATE_FILE = "trainer_state.json"  # a checkpoint's step, engine and loop state
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step
TEMP_PREFIXES = (".tmp-", ".old-", ".del-")  # in-flight writes, replacements and deletes


def temp_sibling(path: str, prefix: str = ".tmp-") -> str:
    """A fresh name in path's directory for a file or directory that will replace (or remove) `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.join(parent, f"{prefix}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary sibling directory; on success it replaces `path`, on error it is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_sibling(path)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = temp_sibling(path, ".old-")
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` (UTF-8) under a temporary name, then rename it over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, value, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent, default=str) + "\n")


def remove_dir(path: str) -> None:
    """Rename out of the way first, so that a kill mid-delete leaves no half directory under `path`."""
    doomed = temp_sibling(path, ".del-")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(directory: str) -> None:
    """The temporary files and directories of writes or deletes that a killed process did not finish."""
    for prefix in TEMP_PREFIXES:
        for path in glob.glob(os.path.join(directory, prefix + "*")):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)


def read_json_object(path: str, missing: str | None = None) -> dict:
    """A JSON object from a file; one-line ConfigErrors: `missing` (or "path: file not found") if absent,
    path:line if it is not valid JSON, and a note when it holds something other than an object."""
    if not os.path.isfile(path):
        raise ConfigError(missing or f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return raw
