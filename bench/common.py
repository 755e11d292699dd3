"""What every benchmark script shares: device names, tables, gates, CPU-time timing, results files, main().

A script (bench/bench_<name>.py) exposes `run(device, quick) -> dict`, `table(result) -> str`,
`check_gates(result) -> list | None` and `main()`, which is `run_script` here. It imports this file as
its neighbour: `python bench/bench_<name>.py` puts bench/ first on sys.path, and the tests put it there.

Results: RESULTS/<device>/<name>.json, <device> being `device_slug` of what ran the measurement
("cpu-amd-epyc-2cores", "nvidia-h200"). Gates (gates.json) are minimum ratios of ours over a baseline
measured in the same run, never absolute times: the machines are shared, so only a ratio of two
measurements under the same load means anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

from mftcore.io import atomic_write_json

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
GATES = os.path.join(BENCH, "gates.json")

# Wall time is what a user waits for (`mftcore bench`). CPU time of the measuring thread (or of the
# process, when the work runs on threads of its own, as the tokenizer's batch encoding does) leaves out
# the time the scheduler gave to other jobs: what CI's gate tests read (issue 14).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time, "process": time.process_time}


# ------------------------------------------------------------------------------------------ devices
def slug(text: str) -> str:
    """Lower case, runs of anything but letters and digits as one '-': safe as a file or directory name."""
    return "-".join(p for p in "".join(c if c.isalnum() else "-" for c in text.lower()).split("-") if p)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def device_slug(device: str = "cpu") -> str:
    """The results directory of a device: 'nvidia-h200' for CUDA, 'cpu-amd-epyc-2cores' for this CPU."""
    if str(device).startswith("cuda"):
        import torch

        return slug(torch.cuda.get_device_name(torch.device(device)))
    return f"cpu-{slug(cpu_model())}-{os.cpu_count()}cores"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees one, else 'cpu'; ValueError for 'cuda' without a device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    return device


def machine_record(device: str) -> dict:
    """Who measured, and how busy the machine was: speed numbers on a shared machine move with its load.
    "device" is the slug that names the results directory; merge this record last into a result."""
    import torch

    name = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else cpu_model()
    return {"device": device_slug(device), "device_name": name, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "load_average_1min": os.getloadavg()[0]}


# ------------------------------------------------------------------------------------------- tables
def flatten(record: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested results as table columns."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def format_table(rows: list, columns: list | None = None) -> str:
    """Rows of (nested) dicts as aligned text columns; floats to 4 significant digits, lists left out."""
    rows = [flatten(r) for r in rows]
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns and not isinstance(r[k], (list, tuple))]

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- gates
def load_gates(path: str = GATES) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def gate_failures(section: str, measured: dict, gates: dict | None = None, floor: str = "min") -> list:
    """One line per gate of `section` that `measured` misses (NaN misses), naming the measured ratio.
    floor "ci_min": the CI test's floor where a gate has one (else its min; gates.json says why)."""
    gates = load_gates() if gates is None else gates
    failed = []
    for key, gate in gates[section].items():
        if key.startswith("_"):
            continue
        value, minimum = measured[key], gate.get(floor, gate["min"])
        if not value >= minimum:
            failed.append(f"gate {section}.{key}: measured {value:.4g} < minimum {minimum:g} ({gate['what']})")
    return failed


# ------------------------------------------------------------------------------------------- timing
@dataclass
class Timings:
    best: dict  # name -> the fastest call, seconds
    runs: dict  # name -> every call, seconds, in order
    outputs: dict  # name -> what its last call returned


def time_interleaved(calls: dict, rounds: int, clock="wall", back_to_back: dict | None = None, until=None,
                     max_rounds: int | None = None) -> Timings:
    """`rounds` rounds of every call in turn, `back_to_back[name]` calls in a row (default 1); the fastest
    call of each counts. Interleaved, a change of load falls on every side alike; the fastest call is
    the least disturbed one. `clock`: a name of CLOCKS, or a function returning seconds.

    With `until` (a test of the fastest times so far), rounds go on past `rounds`, up to `max_rounds`,
    while it fails: load only ever adds time, so more calls can only bring each side's fastest down
    towards its cost on an idle machine, never below it."""
    tick = CLOCKS[clock] if isinstance(clock, str) else clock
    runs, outputs = {name: [] for name in calls}, {}

    def fastest() -> dict:
        return {name: min(r) for name, r in runs.items()}

    done = 0
    while done < rounds or (until is not None and done < (max_rounds or rounds) and not until(fastest())):
        for name, fn in calls.items():
            for _ in range((back_to_back or {}).get(name, 1)):
                start = tick()
                outputs[name] = fn()
                runs[name].append(tick() - start)
        done += 1
    return Timings(fastest(), runs, outputs)


# ------------------------------------------------------------------------------------ results, main
def results_path(name: str, device: str, results_dir: str = RESULTS) -> str:
    """RESULTS/<device>/<name>.json, e.g. bench/results/cpu-amd-epyc-2cores/packing.json."""
    return os.path.join(results_dir, device, f"{name}.json")


def write_result(path: str, record: dict) -> None:
    atomic_write_json(path, record)  # whole or not at all: a killed run leaves the previous file


def parse_args(name: str, doc: str | None, argv=None):
    parser = argparse.ArgumentParser(prog=f"bench_{name}.py", description=(doc or "").split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when torch sees one")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: a smoke run in seconds, not the numbers (no gates, nothing written "
                             "unless --json)")
    parser.add_argument("--json", metavar="PATH", help="write the results here (default: "
                        "RESULTS_DIR/<device>/" + name + ".json, without --quick)")
    parser.add_argument("--results-dir", default=RESULTS, help="default: bench/results")
    return parser.parse_args(argv)


def run_script(name: str, run, table, check_gates, argv=None, doc: str | None = None) -> int:
    """A benchmark script's main(): measure, print the table, check the gates unless --quick, write the
    results. Exit code 1 when a gate failed, 2 for a device that is not there."""
    args = parse_args(name, doc, argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"bench {name}: error: {e}", file=sys.stderr)
        return 2
    print(f"bench {name}: measuring on {device}{' (quick sizes)' if args.quick else ''}...", file=sys.stderr,
          flush=True)
    result = run(device, args.quick)
    print(table(result))
    failed = None if args.quick else check_gates(result)
    if args.quick:  # small sizes measure the plumbing, not the ratios the gates were set against
        print("gates: not checked with --quick")
    elif failed is None:
        print("gates: none for this benchmark on " + device)
    else:
        result["gates_failed"] = failed
        print("gates: " + ("all pass" if not failed else "FAILED: " + "; ".join(failed)))
    path = args.json or (None if args.quick else results_path(name, result["device"], args.results_dir))
    if path:
        write_result(path, result)
        print(f"bench {name}: results in {path}", file=sys.stderr)
    return 1 if failed else 0
