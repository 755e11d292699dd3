"""Where a command may write: outputs that would destroy an input or a training run are refused before
anything is read or written, and one training run at a time holds an output_dir.

`check_output` (export OUT, merge --out, generate --output, bench --json) refuses, in one line:
  - an empty path, or one whose existing part is a file where a directory is needed (or the reverse);
  - an output that is, or contains, one of the command's inputs (exporting a checkpoint over its own
    run's output_dir, merging over the adapter's run);
  - an output that exists and lies inside an input, or is, contains or lies inside a training run's
    directory (output_dir: checkpoints, metrics.jsonl, the lock), where replacing it loses a run's files;
  - an existing directory that holds files mftcore did not write there (replacing a directory removes
    everything in it): only an empty one, or an earlier result of the same kind, is replaced.
A fresh path (nothing there yet) is always allowed unless it would contain an input, which it cannot.

`check_train_paths` does the same for `mftcore train`: output_dir (whose metrics.jsonl would be read
as training data inside a task directory), tb_dir and cache_dir. `RunLock` is an flock on
output_dir/.mftcore.lock: a second run on the same output_dir is one line naming the holder, and the
kernel drops the lock when the holder dies, even by SIGKILL, so a stale lock never blocks a resume.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import sys
import time

from mftcore.errors import ConfigError
from mftcore.io import CONFIG_FILE, LOCK_FILE, METRICS_FILE, STATE_FILE, make_parent, write_guard

RUN_MARKERS = (METRICS_FILE, LOCK_FILE, STATE_FILE)
CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")
MAX_SCAN = 2000  # entries looked at when asking whether a directory holds a run somewhere below it


def real(path: str) -> str:
    return os.path.realpath(os.path.abspath(str(path)))  # no ~ expansion: the writers do not expand it either


def inside(child: str, parent: str) -> bool:
    """Whether real path `child` is `parent` or lies below it."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def is_run_dir(path: str) -> bool:
    """A training run's output_dir, or one of its checkpoints."""
    if not os.path.isdir(path):
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(n in RUN_MARKERS for n in names) or any(
        CHECKPOINT_NAME.match(n) and os.path.isdir(os.path.join(path, n)) for n in names)


def enclosing_run(path: str) -> str | None:
    """The nearest directory at or above `path` that is a run's directory."""
    p = real(path)
    while True:
        if is_run_dir(p):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def run_below(path: str) -> str | None:
    """A run directory somewhere below `path` (a bounded look: MAX_SCAN entries)."""
    seen = 0
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            seen += 1
            if is_run_dir(os.path.join(root, d)):
                return os.path.join(root, d)
        if seen > MAX_SCAN:
            return None
    return None


def nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def check_output(path, flag: str, inputs: dict | None = None, *, file: bool = False, replaceable=None) -> None:
    """Refuse `path` as an output of a command (module docstring). inputs: {description: path} of what
    the command reads; replaceable(path) -> bool: an existing directory this command may replace."""
    if path is None or not str(path).strip():
        raise ConfigError(f"{flag}: an empty path; give the {'file' if file else 'directory'} to write")
    path = str(path)
    base = nearest_existing(path)
    if base != os.path.abspath(path) and not os.path.isdir(base):
        raise ConfigError(f"{flag}: {path}: {base} is a file, not a directory")
    exists = os.path.lexists(path)
    if exists and file and os.path.isdir(path):
        raise ConfigError(f"{flag}: {path} is a directory; expected a file name")
    if exists and not file and not os.path.isdir(path):
        raise ConfigError(f"{flag}: {path} exists and is not a directory")
    out = real(path)
    for what, source in (inputs or {}).items():
        if source is None or not str(source).strip():
            continue
        src = real(source)
        if inside(src, out):
            same = "is" if src == out else "contains"
            raise ConfigError(f"{flag}: {path} {same} the {what} {source}: writing it would destroy that input; "
                              "choose a new path")
        if exists and inside(out, src):
            raise ConfigError(f"{flag}: {path} exists inside the {what} {source}: writing it would replace part "
                              "of that input; choose a new path")
    if not exists:
        return
    run = enclosing_run(out) if not file else enclosing_run(os.path.dirname(out))
    if run is not None:
        where = "is" if run == out else "lies inside"
        raise ConfigError(f"{flag}: {path} {where} the training run directory {run}: writing it could destroy "
                          "the run's checkpoints or logs; choose a new path")
    if file:
        return
    below = run_below(out)
    if below is not None:
        raise ConfigError(f"{flag}: {path} contains the training run directory {below}: replacing it would destroy "
                          "that run; choose a new path")
    if os.listdir(out) and not (replaceable or (lambda p: False))(out):
        raise ConfigError(f"{flag}: {path} exists and holds files mftcore did not write (replacing it would remove "
                          "them); choose a new path or empty it first")


def is_model_dir(path: str) -> bool:
    """An HF model or adapter directory that mftcore wrote (export, merge, final/): safe to replace."""
    names = set(os.listdir(path))
    return CONFIG_FILE in names and bool(names & {"config.json", "adapter_config.json"})


def check_train_paths(cfg) -> None:
    """output_dir / tb_dir / cache_dir of a training run against its inputs (module docstring)."""
    for key in ("output_dir", "tb_dir", "cache_dir"):
        value = getattr(cfg, key)
        if value is None:
            continue
        base = nearest_existing(value)
        if os.path.lexists(value) and not os.path.isdir(value):
            raise ConfigError(f"{key}: {value} exists and is not a directory")
        if base != os.path.abspath(value) and not os.path.isdir(base):
            raise ConfigError(f"{key}: {value}: {base} is a file, not a directory")
    out = real(cfg.output_dir)
    for path in cfg.data_paths or []:
        if inside(out, real(path)):
            raise ConfigError(f"output_dir: {cfg.output_dir} lies inside the data path {path}: its metrics.jsonl "
                              "would be read as training data; choose a directory outside the data")
    for key in ("pretrained_model_path", "tokenizer_path"):
        value = getattr(cfg, key)
        if value and real(value) == out:
            raise ConfigError(f"output_dir: {cfg.output_dir} is the {key}; choose a directory of its own")


class RunLock:
    """An exclusive flock on output_dir/.mftcore.lock for the life of a run (module docstring)."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.output_dir, self.enabled, self.fd = output_dir, enabled, None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        path = os.path.join(self.output_dir, LOCK_FILE)
        make_parent(path)
        with write_guard(self.output_dir):
            os.makedirs(self.output_dir, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"output_dir: {self.output_dir} is in use by another run ({holder}); wait for it "
                                  "to finish or choose another output_dir") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without locks (some NFS)
                print(f"mftcore: note: {self.output_dir}: the filesystem does not lock files; nothing stops a "
                      "second run on this output_dir", file=sys.stderr)
                return self
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # the file stays: deleting it would race with the next run's open
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
