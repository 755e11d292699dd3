"""Every GPU check and benchmark in one call of under 8 minutes; the results in one JSON file.

On a GPU machine with the image's own packages (torch 2.11, triton 3.6, transformers 5.17, pybind11,
cmake, setuptools; no network), from the repository root, with the image's python3:

    python3 -m pip install --no-build-isolation --no-deps -e . &&
        PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --results-dir "$OUT"

The install builds mftcore._packing in place with the image's compiler and registers the checkout (with
kernels/ as mftcore.kernels) without touching torch or triton and without the network (checked offline
on the CPU machine: PIP_NO_INDEX=1, a fresh venv over the system's packages, 8 s). Then, in order, each
stage timed and recorded as ok / failed / error / timeout / skipped (with the reason):
  environment   versions, the device, the C++ extension, the optional packages found (liger-kernel,
                flash-attn, ...: a missing one only drops its rows from the benchmarks)
  pytest_gpu    `pytest -m gpu tests` in a subprocess: every GPU-marked test, counted from its JUnit XML
  CHECKS        each bench module's gpu_correctness() and gpu_benchmarks(), and the end-to-end train
                step (bench_train_step.gpu_benchmarks); a module this build lacks is skipped
The file is <results-dir>/<device>/gpu_check.json, e.g. nvidia-h200/gpu_check.json (the device as
bench/common.py's device_slug names it), rewritten after every stage, so a run cut short still leaves
what it measured; commit it as bench/results/<device>/gpu_check.json, beside the files the benchmark
scripts write there (<bench>.json). A stage that would pass the time budget (--budget-s, 450 s: 8 minutes less
the install and the start-up) is skipped, one that runs past what is left is stopped. Exit code 1 if a
stage failed, errored or timed out.

A package the image lacks can travel as a wheel (the device tool's notes). liger-kernel 0.8.5 (pure
Python, needs only torch and triton; its import path checked on the CPU) gives bench_cross_entropy its
Liger row: here `echo /.whl/ >> .git/info/exclude; pip download --no-deps --only-binary=:all:
--python-version 3.12 -d .whl liger-kernel==0.8.5`, and on the GPU (carry .whl) put
`python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export
PYTHONPATH=/tmp/site;` before the command above. A carried package that fails there is an error row of
its benchmark, not a crash.

--dry-run runs the same plumbing on the CPU with tiny shapes (tests/bench/test_bench.py does, in CI); its
file is <results-dir>/<cpu>/gpu_check_dry_run.json. This script has never run on a GPU: the session that
wrote it had none.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.append(ROOT)  # mftcore's pure-Python modules even before the install (the environment stage says so)

import common  # noqa: E402 - bench/common.py, this script's neighbour (after the line above: it imports mftcore)

BUILD_COMMAND = "python3 -m pip install --no-build-isolation --no-deps -e ."
OPTIONAL = {"liger_kernel": "bench_cross_entropy's liger row", "flash_attn": "nothing measured here needs it",
            "bitsandbytes": "GPU tests of QLoRA, if any", "deepspeed": "GPU tests of ZeRO, if any"}


@dataclass
class Check:
    """One call of a bench module's function, with its time on an H100/H200 as estimated for the budget
    (the CPU smoke run's arguments, for --dry-run, are in dry_run_kwargs)."""
    module: str
    function: str
    estimate_s: float


def cpu_timer(fn, grad_to_none) -> float:
    """A wall-clock stand-in for triton's do_bench in --dry-run (one call, milliseconds)."""
    for t in grad_to_none:
        t.grad = None
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def dry_run_kwargs() -> dict:
    import torch

    tiny_llama = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                  "vocab_size": 97}
    return {
        ("bench_cross_entropy", "gpu_correctness"): {"device": "cpu", "cases": [(33, 48, 77, True)]},
        ("bench_cross_entropy", "gpu_benchmarks"): {"device": "cpu", "shape": (64, 32, 100), "dtype": torch.float32,
                                                    "timer": cpu_timer, "peak": None, "sweep": False},
        ("bench_cross_entropy", "gpu_option_benchmarks"): {"device": "cpu", "shape": (64, 32, 100),
                                                           "dtype": torch.float32, "timer": cpu_timer, "peak": None},
        ("bench_varlen_attention", "gpu_options"): {"device": "cpu", "total": 256, "heads": (2, 1), "head_dim": 16,
                                                    "lengths_range": (32, 128), "dtype": torch.float32,
                                                    "timer": lambda fn: cpu_timer(fn, ())},
        ("bench_train_step", "gpu_benchmarks"): {"device": "cpu", "model_config": tiny_llama, "n_samples": 12,
                                                 "seq_length": 128, "batch_size": 2, "dtype": torch.float32,
                                                 "warmup_steps": 1},
    }


# In order.
CHECKS = [
    Check("bench_cross_entropy", "gpu_correctness", 40),
    Check("bench_cross_entropy", "gpu_benchmarks", 90),  # + tuning on a cold cache: ~18 candidates to compile
    Check("bench_cross_entropy", "gpu_option_benchmarks", 60),  # 7 rows; each option family tunes its own plan
    Check("bench_train_step", "gpu_benchmarks", 120),
    Check("bench_varlen_attention", "gpu_correctness", 40),
    Check("bench_varlen_attention", "gpu_benchmarks", 90),
    Check("bench_varlen_attention", "gpu_options", 60),  # 6 options x fwd/bwd at 16k tokens
]


class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise StageTimeout in this (main) thread after `seconds`: a stage cannot outlive the budget."""
    def expire(signum, frame):
        raise StageTimeout(f"stopped after {seconds:.0f} s, the time left in the budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def environment(dry_run: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "dry_run": dry_run}
    for name in ("triton", "transformers", "numpy"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - recorded, and the stages that need it fail on their own
            env[name] = f"missing: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                    "memory_gb": round(props.total_memory / 2 ** 30, 1)})
    try:
        import mftcore._packing  # noqa: F401
        env["extension"] = "mftcore._packing imported"
    except Exception as e:  # noqa: BLE001
        env["extension"] = f"missing ({type(e).__name__}: {e}); build it in place first: {BUILD_COMMAND}"
    env["optional"] = {name: "installed" if importlib.util.find_spec(name) else f"missing: skips {what}"
                       for name, what in OPTIONAL.items()}
    return env


def junit_summary(path: str) -> dict:
    """Counts and the failing tests of a pytest JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def run_pytest(targets: list, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *targets]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise StageTimeout(f"pytest -m gpu ran past {timeout_s:.0f} s") from None
        result = {"command": "pytest -m gpu " + " ".join(targets), "exit_code": proc.returncode,
                  "tail": (proc.stdout + proc.stderr)[-1500:]}
        if os.path.isfile(xml):
            result.update(junit_summary(xml))
    if proc.returncode == 5:
        result["note"] = "no GPU-marked tests collected"
    result["ok"] = proc.returncode in (0, 5)
    return result


class Run:
    """The stages run so far, the budget, and the results file rewritten after each stage."""

    def __init__(self, path: str, budget_s: float, dry_run: bool):
        self.path, self.budget_s, self.t0 = path, budget_s, time.perf_counter()
        self.record = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": dry_run, "budget_s": budget_s,
                       "stages": []}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def stage(self, name: str, estimate_s: float, fn, skip_reason: str | None = None) -> dict:
        entry = {"stage": name}
        if skip_reason is None and self.left() < estimate_s:
            skip_reason = f"time budget: {self.left():.0f} s left, about {estimate_s:.0f} s needed"
        if skip_reason is not None:
            entry.update(status="skipped", reason=skip_reason)
        else:
            start = time.perf_counter()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                with deadline(self.left()):
                    result = fn()
                entry.update(status="failed" if result.get("ok") is False else "ok", result=result)
            except StageTimeout as e:
                entry.update(status="timeout", error=str(e))
            except Exception as e:  # noqa: BLE001 - one broken stage must not hide the others
                entry.update(status="error", error=f"{type(e).__name__}: {e}"[:1000],
                             traceback=traceback.format_exc()[-3000:])
            entry["seconds"] = round(time.perf_counter() - start, 2)
            free_device_memory()
        print(f"[gpu_check] {name}: {entry['status']} {entry.get('reason') or entry.get('error') or ''}"[:300],
              flush=True)
        self.record["stages"].append(entry)
        self.record["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.save()
        return entry

    def save(self) -> None:
        common.write_result(self.path, self.record)


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def results_path(results_dir: str, dry_run: bool) -> str:
    """<results-dir>/<device>/gpu_check.json; a dry run's under the CPU's name, as gpu_check_dry_run.json."""
    if dry_run:
        return common.results_path("gpu_check_dry_run", common.device_slug("cpu"), results_dir)
    return common.results_path("gpu_check", common.device_slug("cuda"), results_dir)


def call_check(check: Check, dry_run: bool):
    def call() -> dict:  # imported inside the stage: a module that fails to import is that stage's error
        kwargs = dry_run_kwargs().get((check.module, check.function), {}) if dry_run else {}
        return as_record(getattr(importlib.import_module(check.module), check.function)(**kwargs))
    return call


def as_record(result) -> dict:
    return result if isinstance(result, dict) else {"result": result}


def skip_reason(check: Check, dry_run: bool) -> str | None:
    if not os.path.isfile(os.path.join(BENCH, check.module + ".py")):
        return f"not in this build: bench/{check.module}.py is missing"
    if dry_run and (check.module, check.function) not in dry_run_kwargs():
        return "--dry-run: no CPU variant of this check"
    return None


def summary_lines(record: dict) -> list:
    lines = [f"{'stage':<44}{'status':<10}{'seconds':>9}  note"]
    for s in record["stages"]:
        note = s.get("reason") or s.get("error") or ""
        res = s.get("result") or {}
        if "speedup" in res:
            note = f"packed/padded {res['speedup']:.2f}x tokens/s"
        elif "speedup_vs_eager" in res:
            note = f"{res['speedup_vs_eager']:.2f}x eager"
        elif "passed" in res:
            note = f"{res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped"
        lines.append(f"{s['stage']:<44}{s['status']:<10}{s.get('seconds', 0):>9.1f}  {note[:120]}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default=common.RESULTS, help="where <device>/gpu_check.json goes")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting stages after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the plumbing, not the numbers")
    parser.add_argument("--pytest-args", nargs="*", default=["tests"], help="what pytest -m gpu collects")
    parser.add_argument("--pytest-timeout-s", type=float, default=180.0)
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --dry-run for the CPU smoke run)", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # the shared CI CPU: a second thread mostly waits for a core
    try:
        return run_all(args)
    finally:
        torch.set_num_threads(threads)


def run_all(args) -> int:
    run = Run(results_path(args.results_dir, args.dry_run), args.budget_s, args.dry_run)
    env = run.stage("environment", 0, lambda: environment(args.dry_run))
    run.record["device"] = (env.get("result") or {}).get("device", "cpu (dry run)")
    run.stage("pytest_gpu", min(60, args.pytest_timeout_s),
              lambda: run_pytest(args.pytest_args, min(args.pytest_timeout_s, max(run.left(), 1))))
    for check in CHECKS:
        run.stage(f"{check.module}.{check.function}", check.estimate_s if not args.dry_run else 0,
                  call_check(check, args.dry_run), skip_reason(check, args.dry_run))
    print("\n".join(summary_lines(run.record)))
    print(f"[gpu_check] results: {run.path}")
    bad = [s["stage"] for s in run.record["stages"] if s["status"] in ("failed", "error", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
