"""kernels/autotune.py: choices by measurement, the in-memory and disk caches, the switches, sharing."""

import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

import pytest
import torch

from mftcore.kernels import autotune
from tests.helpers.paths import ROOT


class Cfg(NamedTuple):
    block: int
    warps: int


CANDIDATES = [Cfg(64, 4), Cfg(128, 4), Cfg(128, 8)]
KEY = {"device": "fake-gpu-sm90", "dtype": "bfloat16", "H": 4096, "N": 8192}


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("MFTCORE_CACHE_DIR", str(tmp_path / "cache"))
    autotune.reset()
    yield
    autotune.reset()


def timer(times, calls):
    def measure(cfg):
        calls.append(cfg)
        if times[cfg] is None:
            raise RuntimeError("out of resources")  # what triton raises for too much shared memory
        return times[cfg]
    return measure


def test_measures_every_candidate_once_and_keeps_the_fastest():
    calls = []
    measure = timer({CANDIDATES[0]: 3.0, CANDIDATES[1]: 1.5, CANDIDATES[2]: 2.0}, calls)
    for _ in range(3):
        assert autotune.choose("op", KEY, CANDIDATES, CANDIDATES[0], measure, mode="measure") == CANDIDATES[1]
    assert calls == CANDIDATES  # the first call measured; the others read memory
    (rec,) = autotune.records("op")
    assert rec.source == "measured" and "fastest of 3: 1.5 ms" in rec.describe() and "next" in rec.describe()


def test_the_disk_cache_serves_a_fresh_process(tmp_path):
    autotune.choose("op", KEY, CANDIDATES, CANDIDATES[0], timer({c: float(c.block) - c.warps for c in CANDIDATES},
                                                                  []), mode="measure")
    path = autotune.cache_path("op", KEY)
    assert path.startswith(str(tmp_path / "cache" / "autotune" / "op" / "fake-gpu-sm90"))
    saved = json.load(open(path))
    assert saved["choice"] == {"block": 64, "warps": 4} and len(saved["timings_ms"]) == 3
    code = ("import json, sys\nfrom typing import NamedTuple\nfrom mftcore.kernels import autotune\n"
            "class Cfg(NamedTuple):\n    block: int\n    warps: int\n"
            "cands = [Cfg(64, 4), Cfg(128, 4), Cfg(128, 8)]\n"
            "def never(c): raise AssertionError('measured again')\n"
            f"print(autotune.choose('op', {KEY!r}, cands, cands[2], never, mode='measure'))\n"
            "print(autotune.records()[0].source)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["Cfg(block=64,", "warps=4)", "disk"]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"op": "op", "key": KEY, "choice": {"block": 32,
                                                                                                 "warps": 2}})])
def test_a_corrupt_or_stale_cache_file_is_measured_again(content):
    path = autotune.cache_path("op", KEY)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(content)  # a half-written file (never made by us) or a choice older code had
    calls = []
    got = autotune.choose("op", KEY, CANDIDATES, CANDIDATES[0], timer({c: 1.0 + i for i, c in enumerate(CANDIDATES)},
                                                                      calls), mode="measure")
    assert got == CANDIDATES[0] and calls == CANDIDATES
    assert json.load(open(path))["choice"] == {"block": 64, "warps": 4}


def test_failing_candidates_are_skipped_and_all_failing_gives_the_default_uncached():
    calls = []
    got = autotune.choose("op", KEY, CANDIDATES, CANDIDATES[0], timer({CANDIDATES[0]: None, CANDIDATES[1]: None,
                                                                       CANDIDATES[2]: 5.0}, calls), mode="measure")
    assert got == CANDIDATES[2]
    other = dict(KEY, N=16)
    got = autotune.choose("op", other, CANDIDATES, CANDIDATES[1], timer(dict.fromkeys(CANDIDATES), []),
                          mode="measure")
    assert got == CANDIDATES[1] and not os.path.exists(autotune.cache_path("op", other))


def test_fixed_mode_never_measures_and_follows_the_switch(monkeypatch):
    def never(cfg):
        raise AssertionError("measured with tuning off")

    assert autotune.choose("op", KEY, CANDIDATES, CANDIDATES[2], never, mode="fixed") == CANDIDATES[2]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("MFTCORE_AUTOTUNE", raising=False)
    assert autotune.env_mode(cuda, False) == "measure" and autotune.env_mode(cpu, True) == "fixed"
    assert autotune.env_mode(cpu, False) == "fixed"  # CPU tensors never run Triton outside the interpreter
    monkeypatch.setenv("MFTCORE_AUTOTUNE", "0")
    assert autotune.env_mode(cuda, False) == "fixed"
    monkeypatch.setenv("MFTCORE_AUTOTUNE", "1")
    assert autotune.env_mode(cpu, True) == "measure" and autotune.env_mode(cpu, False) == "fixed"


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MFTCORE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_root() == str(tmp_path / "xdg" / "mftcore")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_root() == str(tmp_path / "home" / ".cache" / "mftcore")


def test_installed_choices_answer_near_keys_without_measuring():
    autotune.choose("op", KEY, CANDIDATES, CANDIDATES[0], timer({CANDIDATES[0]: 2.0, CANDIDATES[1]: 1.0,
                                                                 CANDIDATES[2]: 3.0}, []), mode="measure")
    big = dict(KEY, N=65536)
    autotune.choose("op", big, CANDIDATES, CANDIDATES[0], timer({CANDIDATES[0]: 2.0, CANDIDATES[1]: 3.0,
                                                                 CANDIDATES[2]: 1.0}, []), mode="measure")
    table = json.loads(json.dumps(autotune.snapshot()))  # what broadcast_object carries
    autotune.reset()
    autotune.install(table, on_miss="nearest")

    def never(cfg):
        raise AssertionError("measured on a rank that installed shared choices")

    assert autotune.choose("op", dict(KEY, N=4096), CANDIDATES, CANDIDATES[0], never, mode="measure") == CANDIDATES[1]
    assert autotune.choose("op", dict(KEY, N=32768), CANDIDATES, CANDIDATES[0], never, mode="measure") == CANDIDATES[2]
    assert autotune.choose("op", dict(KEY, H=2048), CANDIDATES, CANDIDATES[0], never, mode="measure") == CANDIDATES[0]
    other_dtype = dict(KEY, dtype="float16")
    assert autotune.choose("op", other_dtype, CANDIDATES, CANDIDATES[0], never, mode="measure") == CANDIDATES[0]
    sources = {tuple(r.key.items()): r.source for r in autotune.records("op")}
    assert sources[tuple(KEY.items())] == "shared"
    assert sources[tuple(other_dtype.items())].startswith("default")
    with pytest.raises(ValueError, match="on_miss"):
        autotune.install({}, on_miss="guess")


def test_concurrent_writers_never_leave_a_partial_file(tmp_path):
    """Four processes rewrite one key's file as fast as they can while this one reads it: every read
    parses, and no temporary file is left."""
    path = str(tmp_path / "cache" / "autotune" / "op" / "dev" / "k.json")
    code = ("import sys\nfrom mftcore.kernels import autotune\n"
            "rec = {'op': 'op', 'choice': {'block': int(sys.argv[2])}, 'pad': 'x' * 200000}\n"
            "for _ in range(60):\n    autotune.write_atomic(sys.argv[1], rec)\n")
    writers = [subprocess.Popen([sys.executable, "-c", code, path, str(i)], cwd=ROOT) for i in range(4)]
    reads = 0
    while any(w.poll() is None for w in writers):
        try:
            with open(path) as f:
                assert json.load(f)["choice"]["block"] in range(4)
            reads += 1
        except FileNotFoundError:
            time.sleep(0.001)
    assert all(w.returncode == 0 for w in writers)
    assert reads > 0 and os.listdir(os.path.dirname(path)) == ["k.json"]


def test_shape_buckets():
    assert [autotune.shape_bucket(n, 256, 4096) for n in (1, 256, 257, 1000, 5000)] == [256, 256, 512, 1024, 4096]
