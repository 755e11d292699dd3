"""`mftcore bench NAME`: run one benchmark of bench/ and print its table; the gates of bench/gates.json.

The benchmarks live in the checkout's bench/ directory, one script per kernel or stage, next to the
results they produced (bench/results/). bench/ is not an installed package: this module finds it next
to the installed `mftcore` package, which is where it is for the editable install of a checkout
(`pip install -e .`, as the README says), or at $MFTCORE_BENCH_DIR. A wheel install has no bench/, and
the command says so in one line.

Gates are minimum ratios (faster, smaller, fuller than a baseline measured in the same run), never
absolute times: the machines are shared, so only a ratio of two runs under the same load means anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys

from mftcore.errors import MftcoreError

BENCHMARKS = ("cross_entropy", "varlen_attention", "packing", "train_step")
MODULES = {name: f"bench_{name}" for name in BENCHMARKS}


def bench_dir() -> str:
    """The checkout's bench/ (or $MFTCORE_BENCH_DIR); a one-line error when there is none."""
    path = os.environ.get("MFTCORE_BENCH_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if not os.path.isfile(os.path.join(path, "gates.json")):
        raise MftcoreError(f"bench: {path}: no benchmarks here; `mftcore bench` runs from a checkout "
                           "(pip install -e .) or with MFTCORE_BENCH_DIR set to its bench/ directory")
    return path


def load_bench_module(name: str, directory: str | None = None):
    """Import bench/<name>.py by path (bench/ is no package); None when this build lacks the file."""
    path = os.path.join(directory or bench_dir(), name + ".py")
    if not os.path.isfile(path):
        return None
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def load_gates(directory: str | None = None) -> dict:
    with open(os.path.join(directory or bench_dir(), "gates.json"), encoding="utf-8") as f:
        return json.load(f)


def gate_failures(section: str, measured: dict, gates: dict | None = None) -> list:
    """One line per gate of `section` that `measured` misses, naming the gate and the measured ratio."""
    gates = load_gates() if gates is None else gates
    failed = []
    for key, gate in gates[section].items():
        if key.startswith("_"):
            continue
        value = measured[key]
        if not value >= gate["min"]:
            failed.append(f"gate {section}.{key}: measured {value:.4g} < minimum {gate['min']:g} ({gate['what']})")
    return failed


def run_benchmark(name: str, device: str = "auto", quick: bool = False, out: str | None = None) -> int:
    """Run bench/bench_<name>.py's measurements on `device`, print the table; 1 if a gate failed."""
    import torch

    directory = bench_dir()
    module = load_bench_module(MODULES[name], directory)
    if module is None:
        raise MftcoreError(f"bench {name}: not available in this build: its benchmark {MODULES[name]}.py (and the "
                           f"code it measures) is not in {directory}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MftcoreError("bench --device cuda: torch sees no CUDA device here")
    print(f"mftcore bench {name}: measuring on {device}{' (quick sizes)' if quick else ''}...", file=sys.stderr,
          flush=True)
    result, lines = RUNNERS[name](module, device, quick)
    print("\n".join(lines))
    failed = result.get("gates_failed") or []
    if quick:  # small sizes measure the plumbing, not the ratios the gates were set against
        result.pop("gates_failed", None)
        print("gates: not checked with --quick")
    elif "gates_failed" in result:
        print("gates: " + ("all pass" if not failed else "FAILED: " + "; ".join(failed)))
    else:
        print("gates: none for this benchmark")
    if out:
        write_json(out, result)
    return 1 if failed and not quick else 0


def run_cross_entropy(module, device: str, quick: bool) -> tuple:
    if device == "cuda":
        result = module.gpu_benchmarks(sweep=not quick)
        return result, [f"fused linear cross-entropy fwd+bwd, {result['shape']} {result['dtype']}",
                        format_table(result["rows"]), f"goals: {result['goals']}"]
    memory_shape = (1024, 128, 8000) if quick else module.CPU_MEMORY_SHAPE
    speed_shape = (512, 128, 2000) if quick else module.CPU_SPEED_SHAPE
    peaks = {impl: module.peak_memory_in_subprocess(impl, memory_shape)["peak_extra_bytes"]
             for impl in ("naive", "chunked")}
    speed = module.cpu_speed(speed_shape)
    rows = [{"impl": impl, "peak_extra_mb": peaks[key] / 2 ** 20, "fwd+bwd_best_ms": speed[f"{impl}_best_ms"]}
            for impl, key in (("mftcore", "chunked"), ("eager", "naive"))]
    ratio = peaks["naive"] / peaks["chunked"]
    result = {"device": device_slug("cpu"), "memory_shape": list(memory_shape), "speed_shape": list(speed_shape),
              "rows": rows, "naive_over_chunked_peak_memory": ratio,
              "gates_failed": gate_failures("cross_entropy", {"naive_over_chunked_peak_memory": ratio})}
    return result, [f"fused linear cross-entropy on CPU, fp32: peak memory at N,H,V={memory_shape} (fresh process "
                    f"each), speed at {speed_shape}", format_table(rows),
                    f"naive / chunked peak memory: {ratio:.1f}x"]


def run_packing(module, device: str, quick: bool) -> tuple:
    import contextlib
    import io

    record = module.packing_results(100_000 if quick else 1_000_000, copies=4 if quick else 40,
                                    loop_copies=2 if quick else 10, repeats=2 if quick else 5)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        module.print_table(record["packing"], record["prepare"], record["prepare_vs_plain_loop"])
    return record, [text.getvalue().rstrip()]


def run_varlen_attention(module, device: str, quick: bool) -> tuple:
    if device == "cuda":
        result = module.gpu_benchmarks()
        return result, ["varlen attention, bf16, causal", format_table(result["shapes"])]
    rows = module.cpu_benchmarks()
    return {"device": device_slug("cpu"), "rows": rows}, ["varlen attention reference on CPU", format_table(rows)]


def run_train_step(module, device: str, quick: bool) -> tuple:
    if device == "cuda":
        result = module.gpu_benchmarks(n_samples=64 if quick else 256)
        title = f"train step, {result['model']['num_hidden_layers']}-layer Llama, bf16, seq_length 4096"
    else:
        result = module.cpu_results(repeats=1 if quick else 3, max_samples=64 if quick else None)
        title = "train step, the tiny model of configs/tiny.json on the sample data, CPU fp32, one thread"
    return result, [title, format_table(module.table_rows(result)),
                    f"packed_fused / padded_eager: {result['speedup']:.2f}x trained tokens/s"]


RUNNERS = {"cross_entropy": run_cross_entropy, "varlen_attention": run_varlen_attention, "packing": run_packing,
           "train_step": run_train_step}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def slug(text: str) -> str:
    """Lower case, runs of anything but letters and digits as one '-': safe as a file name."""
    return "-".join(p for p in "".join(c if c.isalnum() else "-" for c in text.lower()).split("-") if p)


def device_slug(device: str = "cpu") -> str:
    """The results-file stem of a device: 'nvidia-h200' for CUDA, 'cpu-amd-epyc-2cores' for this CPU."""
    import torch

    if str(device).startswith("cuda"):
        return slug(torch.cuda.get_device_name(torch.device(device)))
    return f"cpu-{slug(cpu_model())}-{os.cpu_count()}cores"


def write_json(path: str, record) -> None:
    """Write under a temporary name, then rename: a reader never sees half a results file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


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
    """Rows of flat dicts as aligned text columns (floats to 4 significant digits)."""
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
