"""Launch configurations chosen by measurement on the device an op meets, cached in memory and on disk.

Every op's launcher asks `choose(op, key, candidates, default, measure)` for a configuration. The key names
the device, the dtype and a shape bucket (and whatever else the kernel's speed depends on); the first call
per key times every candidate with `measure` and keeps the fastest; later calls read the choice from memory,
or from the disk cache that an earlier process left. No candidate changes results beyond the tests'
tolerance (tests/kernels/ run each one against the float64 oracle in the interpreter), and each one
compiles without register spills for sm_90 and sm_80 (the compile tests cover every candidate).

Switches (environment variables, read at each miss):
  MFTCORE_AUTOTUNE=0     the fixed default of every op (no timing, no cache);
  MFTCORE_AUTOTUNE=1     measure, in Triton's interpreter too (tests use it; the timings mean nothing there);
  unset                  measure on CUDA, fixed defaults in the interpreter.
  MFTCORE_CACHE_DIR      the cache's root (default $XDG_CACHE_HOME/mftcore, else ~/.cache/mftcore); choices
                         are files <root>/autotune/<op>/<device>/<key>.json.

Several processes at once: each key is its own file, written under a temporary name and renamed over the
target (POSIX rename is atomic), so a reader sees a whole file or none, and two writers of one key write
the same kind of record (the later rename wins). A file that does not parse, or names a configuration the
current candidate list lacks (older code), is ignored and measured again.

Distributed runs: one rank measures and every rank uses its result. The trainer (mftcore/parallel/tuning.py)
lets rank 0 tune the shapes of the run, broadcasts `snapshot()`, and every rank `install`s it with
`on_miss="nearest"`: a key met later (a shorter padded batch) then takes the choice of the nearest tuned
key of the same kind, identically on every rank, and nothing in an op ever communicates or measures.
kernels/ import nothing of mftcore (other trainers embed them), hence the small atomic write here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

MISS_POLICIES = ("measure", "nearest", "default")


@dataclass
class Record:
    """One tuned key: the choice, and what it was chosen from (printed by `mftcore bench`)."""
    op: str
    key: dict
    choice: dict
    timings_ms: list  # [[candidate as a dict, median ms or None when it failed to run], ...]
    source: str  # "measured", "disk", "shared", "nearest <key>", "default (...)"

    def describe(self) -> str:
        """One line: the choice, why, and the runner-up."""
        timed = sorted((t, c) for c, t in self.timings_ms if t is not None)
        why = self.source
        if timed and self.source in ("measured", "disk", "shared"):
            why += f", fastest of {len(self.timings_ms)}: {timed[0][0]:.3g} ms"
            if len(timed) > 1:
                why += f" (next {timed[1][1]} at {timed[1][0]:.3g} ms)"
        return f"{self.op} {self.key}: {self.choice} ({why})"


_memory: dict = {}  # (op, key items) -> Record
_policy = {"on_miss": "measure"}


def env_mode(device: torch.device, interpreted: bool) -> str:
    """'measure' or 'fixed' from MFTCORE_AUTOTUNE, as the module docstring says. CPU tensors outside the
    interpreter never run Triton (the compile tests only capture their launches): always 'fixed'."""
    if device.type != "cuda" and not interpreted:
        return "fixed"
    value = os.environ.get("MFTCORE_AUTOTUNE", "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return "fixed"
    if value in ("1", "true", "on", "yes"):
        return "measure"
    return "fixed" if interpreted else "measure"


def cache_root() -> str:
    base = os.environ.get("MFTCORE_CACHE_DIR")
    if base:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "mftcore")


def device_label(device: torch.device, interpreted: bool) -> str:
    """The device part of a key: the GPU's name and compute capability, lower case ('nvidia-h200-sm90')."""
    if interpreted or device.type != "cuda":
        return "interpreter" if interpreted else device.type
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) + f"-sm{major}{minor}"


def shape_bucket(n: int, lo: int = 1, hi: int = 1 << 20) -> int:
    """The power of two at or above n, within [lo, hi]: shapes of one bucket share a choice."""
    return max(lo, min(hi, 1 << max(0, int(n) - 1).bit_length()))


def key_name(key: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in key.items()).replace("/", "_")


def cache_path(op: str, key: dict) -> str:
    return os.path.join(cache_root(), "autotune", op, str(key.get("device", "any")), key_name(key) + ".json")


def as_dict(candidate) -> dict:
    return dataclasses.asdict(candidate) if dataclasses.is_dataclass(candidate) else dict(candidate._asdict())


def write_atomic(path: str, record: dict) -> None:
    """The whole file or none: a temporary file in the same directory, renamed over the target."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def read_cached(op: str, key: dict, candidates: Sequence) -> Optional[Record]:
    """The disk record of a key if it is whole, for this key, and names a current candidate."""
    try:
        with open(cache_path(op, key), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("key") != key or raw.get("op") != op:
        return None
    if not any(as_dict(c) == raw.get("choice") for c in candidates):
        return None
    return Record(op, key, raw["choice"], raw.get("timings_ms", []), "disk")


def measure_all(candidates: Sequence, measure: Callable) -> list:
    """[(candidate, ms or None)]: a candidate that cannot run here (too much shared memory for this GPU,
    say) is skipped, not fatal."""
    out = []
    for cand in candidates:
        try:
            ms = float(measure(cand))
        except Exception:  # noqa: BLE001 - triton's OutOfResources and the like: that candidate is out
            ms = None
        out.append((cand, ms if ms is not None and math.isfinite(ms) else None))
    return out


BUCKET_FIELDS = ("N", "T", "C")  # the token-count buckets of a key; every other field must match exactly


def nearest(op: str, key: dict) -> Optional[Record]:
    """The tuned record of `op` whose key differs from `key` only in its bucket fields, closest in log2."""
    best, best_d = None, math.inf
    for (o, _), rec in _memory.items():
        if o != op or rec.key.keys() != key.keys() or rec.source.startswith(("nearest", "default")):
            continue
        d = 0.0
        for k, v in key.items():
            w = rec.key[k]
            if k in BUCKET_FIELDS and v > 0 and w > 0:
                d += abs(math.log2(v) - math.log2(w))
            elif v != w:
                d = math.inf
                break
        if d < best_d:
            best, best_d = rec, d
    return best


def choose(op: str, key: dict, candidates: Sequence, default, measure: Callable, *, mode: str):
    """The configuration for `key` (see the module docstring); `mode` is env_mode(...) of the caller.
    'fixed' returns `default` (and records it once, for reports), whatever was chosen before."""
    mem_key = (op, tuple(key.items()))
    if mode == "fixed":
        _memory.setdefault(mem_key, Record(op, key, as_dict(default), [], "default (tuning off)"))
        return default
    rec = _memory.get(mem_key)
    if rec is None or rec.source.startswith("default (tuning off)"):
        rec = resolve(op, key, candidates, default, measure)
        _memory[mem_key] = rec
    for cand in candidates:
        if as_dict(cand) == rec.choice:
            return cand
    return default


def resolve(op, key, candidates, default, measure) -> Record:
    policy = _policy["on_miss"]
    if policy != "measure":
        near = nearest(op, key) if policy == "nearest" else None
        if near is not None:
            return Record(op, key, near.choice, [], f"nearest {near.key}")
        return Record(op, key, as_dict(default), [], "default (not among the shared choices)")
    cached = read_cached(op, key, candidates)
    if cached is not None:
        return cached
    timings = measure_all(candidates, measure)
    ran = [(ms, i) for i, (_, ms) in enumerate(timings) if ms is not None]
    choice = candidates[min(ran)[1]] if ran else default
    rec = Record(op, key, as_dict(choice), [[as_dict(c), ms] for c, ms in timings], "measured")
    if ran:
        try:
            write_atomic(cache_path(op, key), {"op": op, "key": key, "choice": rec.choice,
                                                "timings_ms": rec.timings_ms, "date": time.strftime("%Y-%m-%d"),
                                                "torch": torch.__version__})
        except OSError:
            pass  # a read-only home: the choice still holds for this process
    return rec


# --------------------------------------------------------------------------- sharing between ranks
def snapshot() -> dict:
    """Every record of this process as plain data, for broadcasting to other ranks."""
    return {f"{op}|{json.dumps(list(k))}": dataclasses.asdict(rec) for (op, k), rec in _memory.items()}


def install(table: dict, on_miss: str = "nearest") -> None:
    """Take another rank's records as this process's own; later misses follow `on_miss`."""
    if on_miss not in MISS_POLICIES:
        raise ValueError(f"on_miss must be one of {MISS_POLICIES}, got {on_miss!r}")
    for rec in table.values():
        r = Record(**rec)
        r.source = "shared" if r.source in ("measured", "disk") else r.source
        _memory[(r.op, tuple(r.key.items()))] = r
    _policy["on_miss"] = on_miss


def records(op: Optional[str] = None) -> list:
    """The records of this process (of one op), in the order they were made."""
    return [rec for (o, _), rec in _memory.items() if op is None or o == op]


def reset() -> None:
    """Forget every in-memory choice and measure on misses again (tests; the disk cache stays)."""
    _memory.clear()
    _policy["on_miss"] = "measure"


def cuda_median_ms(fn: Callable[[], None]) -> float:
    """Median time of fn on the current CUDA stream (triton's do_bench, L2 flushed between calls):
    10 ms of warm-up, 40 ms of repetitions, so a candidate costs well under 0.1 s once compiled."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def counting_timer(fn: Callable[[], None]) -> float:
    """The interpreter's stand-in for cuda_median_ms: one run, its CPU time (MFTCORE_AUTOTUNE=1 in tests)."""
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3
