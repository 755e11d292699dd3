"""What every fault case asserts, and the pieces the cases build on.

A case runs the real CLI entry point (`mftcore.cli.main`, the function behind `mftcore ...`) with
hostile input and asserts the README's promise: the exit code, exactly one error line that names the
key or file:line, no traceback anywhere in the output, and nothing lost (no temporary left behind,
inputs and earlier checkpoints untouched, bitwise-equal weights after a resume). In-process cases use
pytest's fd capture, so output from C extensions and from threads is seen too; the cases that need
their own processes (signals, kill -9, full disks) run in tests/faults/runner.py and are checked here
by `check_outcome` from what it reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from dataclasses import dataclass

from tests.helpers.paths import DATA, TINY_MODEL, TOKENIZER


@dataclass
class Outcome:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list:
        return [line for line in self.err.splitlines() if line.startswith("mftcore: error:")]


def base_config(tmp_path, **updates) -> dict:
    """A valid tiny training config (the suite's tiny Llama on the sample data), output under tmp_path."""
    cfg = {"data_paths": DATA, "output_dir": str(tmp_path / "out"), "tokenizer_path": TOKENIZER,
           "model_config": TINY_MODEL, "seq_length": 256, "data_split": "95,5,0", "per_device_train_batch_size": 8,
           "learning_rate": 3e-3, "min_lr": 3e-4, "num_warmup_steps": 1, "log_interval": 1, "evaluation_steps": 0,
           "checkpointing_steps": 2, "max_train_steps": 2, "cache_dir": str(tmp_path / "cache")}
    cfg.update(updates)
    return cfg


def write_json(path, value) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)
    return str(path)


class Hung(BaseException):
    """A case that did not finish: a BaseException, so that no handler of the code under test takes it
    for an error of its own."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: a case that blocks (a FIFO read, a lost lock) raises Hung after `seconds`
    of wall time. Only a failsafe: far beyond what a case takes on a loaded machine (seconds), so that
    load alone cannot trigger it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise Hung(f"the case did not finish within {seconds} s (it hangs)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(capfd, argv: list, timeout: float = 900) -> Outcome:
    """`mftcore ARGV` in this process; its exit code and everything it wrote to fds 1 and 2."""
    from transformers.utils import logging as hf_logging

    from mftcore.cli import main

    # transformers binds its log handler to the sys.stderr of the first case that logged, a capture
    # stream pytest has closed since: bind it to this case's, as a fresh process would.
    hf_logging._reset_library_root_logger()
    hf_logging._configure_library_root_logger()
    capfd.readouterr()
    with deadline(timeout):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    out, err = capfd.readouterr()
    return Outcome(rc, out, err)


def check_refused(outcome: Outcome, *names: str, rc: int = 2) -> str:
    """The promise for bad input: exit code `rc`, one error line naming every one of `names`, no
    traceback. Returns the error line."""
    assert "Traceback" not in outcome.err + outcome.out, outcome.err[-3000:]
    lines = outcome.error_lines
    assert outcome.rc == rc, f"exit code {outcome.rc}, expected {rc}; stderr: {outcome.err[-2000:]}"
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    line = lines[0]
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    assert "\n" not in line
    return line


def check_succeeded(outcome: Outcome) -> None:
    assert "Traceback" not in outcome.err + outcome.out, outcome.err[-3000:]
    assert outcome.rc == 0, outcome.err[-3000:]
    assert not outcome.error_lines


def leftovers(*dirs) -> list:
    """Temporary files or directories of an unfinished write anywhere below `dirs`."""
    found = []
    for d in dirs:
        for root, names, files in os.walk(d):
            found += [os.path.join(root, n) for n in names + files if n.startswith((".tmp-", ".old-", ".del-"))]
    return found


def snapshot(path) -> dict:
    """{relative path: bytes} of every file below `path`: to show that an input was not touched."""
    out = {}
    for root, _, files in os.walk(path):
        for n in files:
            full = os.path.join(root, n)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def restamp(ckpt) -> None:
    """Rewrite a checkpoint's manifest to its files' current sizes: a meddler who edits a file and fixes
    the manifest too, so that the checks behind the manifest's must catch the edit."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    files = {}
    for root, _, names in os.walk(ckpt):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), ckpt)
            if rel != "manifest.json":
                files[rel] = os.path.getsize(os.path.join(root, n))
    manifest["files"] = files
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


class Payload:
    """A pickle that creates `Payload.marker` when it is unpickled: what code execution would look like."""

    marker = None

    def __reduce__(self):
        return (open, (str(Payload.marker), "w"))
