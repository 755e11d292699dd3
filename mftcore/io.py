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
import socket
import uuid

from mftcore.errors import ConfigError

CONFIG_FILE = "mftcore_config.json"  # the training config, saved in checkpoints, final/ and merged models
STATE_FILE = "trainer_state.json"  # a checkpoint's step, engine and loop state
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step
TEMP_PREFIXES = (".tmp-", ".old-", ".del-")  # in-flight writes, replacements and deletes
OWNER_FILE = "owner"  # in an owned temporary directory: "host pid" of its writer


def temp_sibling(path: str, prefix: str = ".tmp-") -> str:
    """A fresh name in path's directory for a file or directory that will replace (or remove) `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.join(parent, f"{prefix}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_dir(path: str, *, replace: bool = True, owned: bool = False):
    """Yield a temporary sibling directory; on success it becomes `path`, on error it is removed.

    replace=False: the first writer wins: when `path` appeared meanwhile (another process finished the
    same content first), ours is dropped, and a reader of the existing one is never disturbed.
    owned=True: the temporary directory names its writer (host and pid) until it is renamed, so that
    `remove_abandoned` can tell a killed writer's from a live one's in a directory that runs share."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_sibling(path)
    os.makedirs(tmp)
    try:
        if owned:
            with open(os.path.join(tmp, OWNER_FILE), "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        if owned:
            os.remove(os.path.join(tmp, OWNER_FILE))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace:
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(path):
                raise
        return
    old = None
    if os.path.exists(path):
        old = temp_sibling(path, ".old-")
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def remove_abandoned(directory: str) -> None:
    """Owned temporary directories whose writer died (SIGKILL, power loss) on this host; a live writer's,
    or another host's on a shared file system, are left alone."""
    host = socket.gethostname()
    for tmp in glob.glob(os.path.join(directory, ".tmp-*")):
        try:
            with open(os.path.join(tmp, OWNER_FILE)) as f:
                owner_host, pid = f.read().split()
        except (OSError, ValueError):
            continue  # just created, not owned, or not a directory: leave it
        if owner_host == host and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


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
