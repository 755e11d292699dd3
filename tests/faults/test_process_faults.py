"""kill -9 at seeded random moments, SIGINT/SIGTERM, a second run on a locked output_dir, full disks: the
cases that need processes of their own. One runner process (tests/faults/runner.py, in a private mount
namespace for its tmpfs mounts) runs them all, two at a time, and this module asserts case by case on
what it reports: exit codes, one error line and no traceback, nothing temporary left, earlier
checkpoints intact, and after a resume (or once space is freed) the reference run's weights, bitwise,
and its metrics."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT


def kill_cases(n: int = 16, seed: int = 14) -> list:
    """Where a SIGKILL lands: the n-th call of a site (a step, a backward, a torch.save or safetensors
    write, an atomic rename, a tokenized chunk, a metrics append; half-written for the writes that can
    tear) or a moment of CPU time; every fourth case kills the resumed run once more."""
    rng = random.Random(seed)
    sites = [("step", ["before"]), ("backward", ["before"]), ("save", ["before", "half"]),
             ("safetensors", ["before"]), ("rename", ["before"]), ("chunk", ["before"]),
             ("append", ["before", "half"]), ("cpu", ["before"])]
    cases = []
    for i in range(n):
        site, hows = sites[i % len(sites)]
        first = [site, round(rng.uniform(0.02, 0.98), 3), rng.choice(hows)]
        second = None
        if i % 4 == 3:
            s2, h2 = sites[rng.randrange(len(sites))]
            second = [s2, round(rng.uniform(0.02, 0.98), 3), rng.choice(h2)]
        cases.append({"id": f"kill-{i:02d}-{site}", "kind": "kill", "first": first, "second": second})
    return cases


KILL_CASES = kill_cases()

# (case, exit code, what the one error line says, the checkpoint the stop saved or None)
SIGNAL_CASES = [
    ({"id": "ctrl-c-tokenizing", "signal": "SIGINT", "site": "pool-get", "at": 1, "command": "prepare"},
     130, "interrupted (Ctrl-C)", None),
    ({"id": "sigterm-tokenizing", "signal": "SIGTERM", "site": "pool-get", "at": 1, "command": "prepare"},
     143, "stopped by SIGTERM", None),
    ({"id": "sigterm-tokenizing-in-train", "signal": "SIGTERM", "site": "pool-get", "at": 1}, 143,
     "stopped by SIGTERM", None),
    ({"id": "ctrl-c-at-step-3", "signal": "SIGINT", "site": "step", "at": 3}, 130,
     "stopped by SIGINT after step 3", "checkpoint-3"),
    ({"id": "sigterm-at-step-5", "signal": "SIGTERM", "site": "step", "at": 5}, 143,
     "stopped by SIGTERM after step 5", "checkpoint-5"),
    ({"id": "ctrl-c-twice", "signal": "SIGINT", "site": "step", "at": 5, "again_at": ["backward", 1]}, 130,
     "interrupted (Ctrl-C)", None),
    ({"id": "sigterm-in-a-checkpoint-write", "signal": "SIGTERM", "site": "save", "at": 2}, 143,
     "stopped by SIGTERM after step", None),
    ({"id": "ctrl-c-exporting", "signal": "SIGINT", "site": "tokenizer-save", "at": 1, "command": "export"}, 130,
     "interrupted (Ctrl-C)", None),
]

# (case, what the one error line names)
DISK_CASES = [
    ({"id": "disk-full-at-a-checkpoint", "site": "save-checkpoint", "at": 2, "leave": 65536}, "checkpoint-"),
    ({"id": "disk-full-at-the-first-checkpoint", "site": "save-checkpoint", "at": 1, "leave": 65536},
     "checkpoint-2"),
    ({"id": "disk-full-at-a-metrics-append", "site": "append", "at": 3, "leave": 0}, "metrics.jsonl"),
    ({"id": "disk-full-at-final", "site": "save-final", "at": 1, "leave": 65536}, "final"),
    ({"id": "disk-full-building-the-cache", "site": "build-cache", "at": 1, "leave": 16384, "on_disk": "cache"},
     "cache"),
    ({"id": "disk-full-in-prepare", "site": "build-cache", "at": 1, "leave": 16384, "on_disk": "cache",
      "command": "prepare"}, "cache"),
    ({"id": "disk-full-exporting", "site": "model-dir", "at": 1, "leave": 65536, "command": "export"}, "exported"),
]

LOCK_CASE = {"id": "second-run-on-a-locked-output-dir", "kind": "lock"}


def all_cases() -> list:
    return (KILL_CASES + [{**c, "kind": "signal"} for c, *_ in SIGNAL_CASES]
            + [{**c, "kind": "disk"} for c, _ in DISK_CASES] + [LOCK_CASE])


def namespace_command() -> list:
    """A private mount namespace for the disk cases' tmpfs mounts (root: a mount namespace; otherwise a
    user namespace that maps us to root inside)."""
    if shutil.which("unshare") is None:
        raise RuntimeError("the disk cases need util-linux's unshare (a private mount namespace for tmpfs)")
    if os.geteuid() == 0:
        return ["unshare", "--mount", "--propagation", "private"]
    return ["unshare", "--user", "--map-root-user", "--mount"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("process-faults")
    cases = work / "cases.json"
    cases.write_text(json.dumps(all_cases()))
    out = work / "results.json"
    proc = subprocess.run([*namespace_command(), sys.executable, "-m", "tests.faults.runner", str(work), str(cases),
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    found = json.loads(out.read_text())
    assert found["calibration"]["rc"] == 0, found["calibration"]["err"]
    return found


def result_of(results, case_id: str) -> dict:
    r = results[case_id]
    assert "harness_error" not in r, r.get("traceback")
    return r


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("mftcore: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_the_kill_moments_cover_every_site():
    sites = {c["first"][0] for c in KILL_CASES}
    assert sites == {"step", "backward", "save", "safetensors", "rename", "chunk", "append", "cpu"}
    assert {c["first"][2] for c in KILL_CASES if c["first"][0] in ("save", "append")} == {"before", "half"}
    assert sum(c["second"] is not None for c in KILL_CASES) == len(KILL_CASES) // 4


@pytest.mark.parametrize("case", KILL_CASES, ids=[c["id"] for c in KILL_CASES])
def test_kill_9_then_resume_ends_bitwise_equal(results, case):
    r = result_of(results, case["id"])
    assert r["killed_rc"][0] == -9, f"the kill did not happen: {r['killed_err'][0]}"
    assert all("Traceback" not in e for e in r["killed_err"])
    assert r["rc"] == 0, r["err"]
    assert "Traceback" not in r["err"]
    assert r["same_weights"], "final weights differ from the uninterrupted run"
    assert r["same_metrics"], "metrics.jsonl differs from the uninterrupted run"
    assert r["leftovers"] == []


@pytest.mark.parametrize("case,rc,says,saved", SIGNAL_CASES, ids=[c[0]["id"] for c in SIGNAL_CASES])
def test_a_signal_stops_cleanly_in_one_line(results, case, rc, says, saved):
    r = result_of(results, case["id"])
    assert r["rc"] == rc, r["err"]
    assert says in one_error_line(r["err"])
    assert r["leftovers"] == [], "a write was left half-done"
    if saved:
        assert saved in r["files"]
    if case.get("command") == "export":
        assert not r["exported_exists"]
    else:
        assert r["rerun_rc"] == 0, r["rerun_err"]
    if "same_weights" in r:
        assert r["same_weights"], "the resumed run differs from the uninterrupted one"


@pytest.mark.parametrize("case,named", DISK_CASES, ids=[c[0]["id"] for c in DISK_CASES])
def test_a_full_disk_is_one_line_and_resumable(results, case, named):
    r = result_of(results, case["id"])
    assert r["rc"] == 2, r["err"]
    line = one_error_line(r["err"])
    assert named in line and "no space left on device" in line and "free" in line, line
    assert r["leftovers"] == [], "the failed write left its temporary"
    assert all(problem is None for problem in r["checkpoints"].values()), r["checkpoints"]
    assert r.get("metrics_whole_lines", True), "metrics.jsonl ends in half a record"
    assert r["rerun_rc"] == 0, r["rerun_err"]
    assert r["rerun_leftovers"] == []
    if "same_weights" in r:
        assert r["same_weights"] and r["same_metrics"], "the run resumed after freeing space differs"


def test_a_second_run_on_a_locked_output_dir_is_one_line(results):
    r = result_of(results, LOCK_CASE["id"])
    assert r["rc"] == 2
    line = one_error_line(r["err"])
    assert "output_dir" in line and f"in use by another run (pid {r['holder_pid']}" in line, line
    assert r["holder_rc"] == 0, r["holder_err"]
    assert r["same_weights"]
