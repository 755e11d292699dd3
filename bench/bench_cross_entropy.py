"""Benchmark of the fused linear + cross-entropy op against eager PyTorch (and Liger-Kernel where installed).

    python bench/bench_cross_entropy.py [--device cpu|cuda] [--quick] [--json PATH]
    mftcore bench cross_entropy [--device cpu|cuda] [--quick] [--json PATH]      # the same

CPU: peak memory of the chunked CPU path vs the naive logits path (N=8192, H=1024, V=32000, fp32; gate
    "cross_entropy": naive >= 4x chunked), each in a fresh subprocess, and a small forward+backward
    speed comparison (best of 5 wall times).
GPU (bench/gpu_check.py calls these too; plain functions returning dicts):
    gpu_correctness()  bf16/fp16 against an fp32 reference on awkward shapes, every reduction
    gpu_benchmarks()   forward+backward at N=16384, H=4096, V=128256 bf16: median time, effective TFLOP/s
                       (8*N*H*V / time, Liger's and CCE's convention; the goal counts 6*N*H*V), peak
                       memory beyond inputs and gradients, against eager torch and Liger, and with an
                       fp32 head (fp32 grad_W accumulation); the goals checked; which logits path and
                       tiles the tuner chose, every candidate's time, and each path's best plan timed on
                       the whole op.
    gpu_option_benchmarks()  the same shape, one row per loss option (label smoothing, z-loss, softcap,
                       logit scale, all, reduction="none") and its cost over the plain op (> 5% is a defect
                       to note); tests/bench/test_bench_cross_entropy.py measures the same rows on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import common
from mftcore.kernels import autotune
from mftcore.kernels import cross_entropy as ce
from mftcore.kernels import cross_entropy_kernels as cek

GOAL_SHAPE = (16384, 4096, 128256)  # N, H, V (Llama-3 vocabulary)
CPU_MEMORY_SHAPE = (8192, 1024, 32000)
CPU_SPEED_SHAPE = (2048, 512, 8000)
K = 4


# --------------------------------------------------------------------------------- shared helpers
def effective_tflops(n: int, h: int, v: int, ms: float) -> float:
    """8*N*H*V FLOPs (logits, recomputed logits, two gradient GEMMs) per second, in TFLOP/s."""
    return 8 * n * h * v / (ms * 1e-3) / 1e12


def goal_tflops(n: int, h: int, v: int, ms: float) -> float:
    """6*N*H*V FLOPs per second in TFLOP/s: the count issue 15's goal (>= 600 on an H100/H200) is set in
    (forward GEMM and the two gradient GEMMs; the recomputed logits are not counted)."""
    return 6 * n * h * v / (ms * 1e-3) / 1e12


def make_inputs(n, h, v, dtype, device, bias=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(v, generator=g).to(device=device, dtype=dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    tasks = torch.randint(0, K, (n,), generator=g)
    return hidden, weight, b, labels.to(device), tasks.to(device)


def eager_loss(hidden, weight, labels, tasks, bias=None):
    """The eager baseline: logits, F.cross_entropy in fp32, per-task scatter, case3 reduction."""
    logits = F.linear(hidden, weight, bias).float()
    token_ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    valid = labels != -100
    t = torch.where(valid, tasks, 0)
    sums = torch.zeros(K, device=hidden.device).index_add(0, t, token_ce)
    counts = torch.zeros(K, device=hidden.device).index_add(0, t, valid.float())
    present = (counts > 0).float()
    return (sums / counts.clamp(min=1) * present).sum() / present.sum().clamp(min=1)


def ours_loss(hidden, weight, labels, tasks, bias=None):
    return ce.fused_linear_cross_entropy(hidden, weight, labels, tasks, bias=bias, num_tasks=K).loss


# One row per option: the keywords it adds to the plain op (reduction "none" backpropagates a per-token
# upstream gradient, its gradients come from a second pass in the backward).
OPTION_CASES = {
    "plain": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-4},
    "softcap": {"softcap": 30.0},
    "logit_scale": {"logit_scale": 0.0625},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0, "logit_scale": 0.0625},
    "none": {"reduction": "none"},
}


def option_loss(name: str):
    """The fused op with OPTION_CASES[name], as a loss_fn for measure(); "none" weights each token."""
    kw = OPTION_CASES[name]

    def loss(hidden, weight, labels, tasks, bias=None):
        out = ce.fused_linear_cross_entropy(hidden, weight, labels, tasks, bias=bias, num_tasks=K, **kw)
        if kw.get("reduction") == "none":
            return (out.loss * torch.linspace(0.5, 1.5, out.loss.shape[0], device=out.loss.device)).sum()
        return out.loss

    return loss


def liger_loss_fn():
    """Liger-Kernel's fused linear CE (token mean; it has no per-task reduction), or None."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda hidden, weight, labels, tasks, bias=None: module(weight, hidden, labels, bias)


def relative_error(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-12)).item()


# ---------------------------------------------------------------------------------------- GPU
CORRECTNESS_CASES = [  # N, H, V, bias: odd V (GPT-2), a vocabulary smaller than one tile, N=1
    (1531, 1024, 50257, True), (4096, 2048, 32000, False), (1, 64, 100, False), (300, 128, 97, True)]


def gpu_correctness(device="cuda", dtypes=(torch.bfloat16, torch.float16), cases=CORRECTNESS_CASES) -> dict:
    """Our op in 16-bit against the fp32 reference (same 16-bit inputs upcast): loss, per-task sums,
    gradients. Tolerances are for bf16 storage of logits and gradients (8 mantissa bits)."""
    rows, ok = [], True
    # every reduction plain, then each option set (OPTION_CASES) with task_mean
    runs = [(r, {}) for r in ce.REDUCTIONS] + [("task_mean", kw) for name, kw in OPTION_CASES.items()
                                               if name not in ("plain", "none")]
    for (n, h, v, bias), dtype, (reduction, opts) in [(c, d, r) for c in cases for d in dtypes for r in runs]:
        hidden, weight, b, labels, tasks = make_inputs(n, h, v, dtype, device, bias=bias)
        kw = {"token_scale": torch.rand(n, device=device)} if reduction == "sum" else {}
        ins = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
        refs = [t.float().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
        out = ce.fused_linear_cross_entropy(ins[0], ins[1], labels, tasks, bias=ins[2], num_tasks=K,
                                            reduction=reduction, **kw, **opts)
        ref = ce.fused_linear_cross_entropy_reference(refs[0], refs[1], labels, tasks, bias=refs[2], num_tasks=K,
                                                      reduction=reduction, **kw, **opts)
        upstream = torch.rand(n, device=device) + 0.5 if reduction == "none" else None
        out.loss.backward(upstream)
        ref.loss.backward(upstream)
        row = {"shape": [n, h, v], "bias": bias, "dtype": str(dtype).split(".")[-1], "reduction": reduction,
               "options": opts, "loss_err": relative_error(out.loss.detach(), ref.loss.detach()),
               "accuracy_diff": (out.task_correct_count - ref.task_correct_count).abs().sum().item(),
               "task_sum_err": relative_error(out.task_loss_sum, ref.task_loss_sum),
               "count_equal": bool(torch.equal(out.task_token_count, ref.task_token_count))}
        for name, got, want in zip(("grad_hidden", "grad_weight", "grad_bias"), ins, refs):
            if got is not None:
                row[name + "_err"] = relative_error(got.grad, want.grad)
        row["ok"] = (row["loss_err"] < 1e-2 and row["task_sum_err"] < 1e-2 and row["count_equal"]
                     and row["accuracy_diff"] <= max(2, 0.01 * n)  # near ties of the top two in 16 bits
                     and all(row[k] < 3e-2 for k in row if k.startswith("grad_")))
        ok &= row["ok"]
        rows.append(row)
    triton_path = ce.uses_triton(torch.empty(1, device=device), cuda_dtypes=ce.ANY_DTYPE)
    return {"ok": ok, "cases": rows, "triton_path": triton_path, "tuning": tuning_report()}


def do_bench_median(fn, grad_to_none) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=200, rep=1500, grad_to_none=grad_to_none, return_mode="median")


def cuda_peak_extra(fn, inputs, grad_bytes: int) -> int:
    """Peak bytes allocated during fn beyond what was allocated before it and the gradients it leaves."""
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before - grad_bytes


def measure(name, loss_fn, shape, dtype, device, timer, peak, weight_dtype=None):
    """fwd+bwd time (after one untimed call, which tunes) and peak extra memory; weight_dtype: the head's
    dtype when it differs from the hidden states' (fp32 master weights under autocast)."""
    n, h, v = shape
    hidden, weight, _, labels, tasks = make_inputs(n, h, v, dtype, device)
    weight = weight.to(weight_dtype or dtype)
    hidden.requires_grad_()
    weight.requires_grad_()

    def step():
        loss_fn(hidden, weight, labels, tasks).backward()

    step()
    ms = timer(step, [hidden, weight])
    row = {"impl": name, "ms": ms, "effective_tflops": effective_tflops(n, h, v, ms),
           "tflops_6nhv": goal_tflops(n, h, v, ms)}
    if peak is not None:
        grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
        row["peak_extra_bytes"] = peak(step, [hidden, weight], grad_bytes)
    return row


def gpu_benchmarks(device="cuda", shape=GOAL_SHAPE, dtype=torch.bfloat16, timer=do_bench_median,
                   peak=cuda_peak_extra, sweep=True) -> dict:
    """Forward+backward timings and memory at `shape`; the issue's goals checked against them. The first
    call tunes (kernels/autotune.py; or reads this GPU's disk cache, whose record keeps the timings it was
    chosen by); `tuning` says which logits path and tiles were chosen and why, and with sweep each path's
    best plan is also timed on the whole op (fwd+bwd), forced in turn."""
    n, h, v = shape
    autotune.reset()  # the records of this call only (choices come from the disk cache when it has them)
    impls = [("mftcore", ours_loss), ("eager", eager_loss)]
    liger = liger_loss_fn()
    if liger is not None:
        impls.append(("liger", liger))
    rows = [measure(name, fn, shape, dtype, device, timer, peak) for name, fn in impls[:2]]
    rows.append(measure("mftcore fp32 head", ours_loss, shape, dtype, device, timer, peak, weight_dtype=torch.float32))
    for name, fn in impls[2:]:  # a carried Liger that fails on this torch/triton is a result, not a crash
        try:
            rows.append(measure(name, fn, shape, dtype, device, timer, peak))
        except Exception as e:  # noqa: BLE001
            rows.append({"impl": name, "error": f"{type(e).__name__}: {e}"[:300]})
    tuning = tuning_report()
    paths = time_each_path(shape, dtype, device, timer) if sweep else []
    by = {r["impl"]: r for r in rows if "ms" in r}
    result = {"shape": {"N": n, "H": h, "V": v}, "dtype": str(dtype).split(".")[-1], "rows": rows,
              "speedup_vs_eager": by["eager"]["ms"] / by["mftcore"]["ms"], "tuning": tuning, "paths": paths}
    goals = {"tflops(6NHV)>=600": by["mftcore"]["tflops_6nhv"] >= 600}
    if "liger" in by:
        result["speedup_vs_liger"] = by["liger"]["ms"] / by["mftcore"]["ms"]
        goals["1.3x_liger"] = result["speedup_vs_liger"] >= 1.3
    if "peak_extra_bytes" in by["mftcore"]:
        goals["memory<=2NH2"] = by["mftcore"]["peak_extra_bytes"] <= 2 * n * h * 2
    result["goals"] = goals
    return result


def gpu_option_benchmarks(device="cuda", shape=GOAL_SHAPE, dtype=torch.bfloat16, timer=do_bench_median,
                          peak=cuda_peak_extra) -> dict:
    """Forward+backward of the plain op and of each option (OPTION_CASES) at `shape`: time, peak memory and
    the cost over plain (ms / plain ms - 1). Each option tunes its own plan on first use (option_family:
    its candidates are the tiles that compile without spills with its constexprs)."""
    autotune.reset()
    rows = [measure(name, option_loss(name), shape, dtype, device, timer, peak) for name in OPTION_CASES]
    plain = rows[0]["ms"]
    for row in rows:
        row["cost_over_plain"] = row["ms"] / plain - 1
    n, h, v = shape
    return {"shape": {"N": n, "H": h, "V": v}, "dtype": str(dtype).split(".")[-1], "rows": rows,
            "over_5pct": [r["impl"] for r in rows if r["cost_over_plain"] > 0.05], "tuning": tuning_report()}


def tuning_report() -> list:
    """What the tuner chose for each key it met, with every candidate's time (ms for all N rows)."""
    return [{"op": r.op, "key": r.key, "choice": r.choice, "source": r.source, "why": r.describe(),
             "timings_ms": r.timings_ms} for r in autotune.records()]


def time_each_path(shape, dtype, device, timer) -> list:
    """The whole op (fwd+bwd) with each logits path's fastest tuned plan forced: the choice, shown on the
    op rather than on one chunk."""
    best = {}
    for rec in autotune.records("cross_entropy"):
        for cand, ms in rec.timings_ms:
            if ms is not None and rec.key["grad"] and (cand["path"] not in best or ms < best[cand["path"]][1]):
                best[cand["path"]] = (cand, ms)
    rows, original = [], cek.default_plan
    before = os.environ.get("MFTCORE_AUTOTUNE")
    os.environ["MFTCORE_AUTOTUNE"] = "0"
    try:
        for path, (cand, _) in sorted(best.items()):
            cek.default_plan = lambda family, plan=cek.ChunkPlan(**cand): plan
            timed = measure("mftcore", ours_loss, shape, dtype, device, timer, None)
            rows.append({"path": path, "plan": cand, **timed})
    finally:
        cek.default_plan = original
        if before is None:
            os.environ.pop("MFTCORE_AUTOTUNE", None)
        else:
            os.environ["MFTCORE_AUTOTUNE"] = before
    return rows


# ---------------------------------------------------------------------------------------- CPU
PEAK_MEMORY = "peak-memory"  # the first argument of the child process that measures one impl's peak


def peak_memory_in_subprocess(impl: str, shape=CPU_MEMORY_SHAPE) -> dict:
    """Run one forward+backward in a fresh process; its peak RSS (VmHWM) beyond the inputs."""
    n, h, v = shape
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), PEAK_MEMORY, impl, str(n), str(h), str(v)],
                          capture_output=True, text=True, check=True, cwd=common.ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def report_peak_memory(impl: str, n: int, h: int, v: int) -> int:
    """The child of peak_memory_in_subprocess: one forward+backward, its peak RSS as a JSON line."""
    torch.set_num_threads(1)  # identical allocation pattern on any machine; time is not measured here
    hidden, weight, _, labels, tasks = make_inputs(n, h, v, torch.float32, "cpu")
    weight.requires_grad_()
    hidden.requires_grad_()
    loss_fn = ours_loss if impl == "chunked" else eager_loss
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size, to the current one
    base = _rss_bytes("VmRSS")
    loss_fn(hidden, weight, labels, tasks).backward()
    peak = _rss_bytes("VmHWM")
    print(json.dumps({"impl": impl, "shape": [n, h, v], "peak_extra_bytes": peak - base,
                      "grad_bytes": (hidden.numel() + weight.numel()) * 4}))
    return 0


def cpu_speed(shape=CPU_SPEED_SHAPE, repeats=5) -> dict:
    """Best of `repeats` forward+backward wall times each, interleaved: the minimum is the least disturbed."""
    n, h, v = shape
    inputs = {}
    for name in ("mftcore", "eager"):
        hidden, weight, _, labels, tasks = make_inputs(n, h, v, torch.float32, "cpu")
        inputs[name] = (hidden.requires_grad_(), weight.requires_grad_(), labels, tasks)

    def step(name, fn):
        hidden, weight, labels, tasks = inputs[name]
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels, tasks).backward()

    t = common.time_interleaved({"mftcore": lambda: step("mftcore", ours_loss),
                                 "eager": lambda: step("eager", eager_loss)}, repeats)
    return {f"{name}_best_ms": best * 1e3 for name, best in t.best.items()}


def cpu_results(quick: bool) -> dict:
    memory_shape = (1024, 128, 8000) if quick else CPU_MEMORY_SHAPE
    speed_shape = (512, 128, 2000) if quick else CPU_SPEED_SHAPE
    peaks = {impl: peak_memory_in_subprocess(impl, memory_shape) for impl in ("naive", "chunked")}
    speed = cpu_speed(speed_shape)
    rows = [{"impl": impl, "peak_extra_mb": peaks[key]["peak_extra_bytes"] / 2 ** 20,
             "fwd+bwd_best_ms": speed[f"{impl}_best_ms"]} for impl, key in (("mftcore", "chunked"), ("eager", "naive"))]
    return {"dtype": "float32", "memory_shape": list(memory_shape), "speed_shape": list(speed_shape),
            "peak_memory": peaks, "speed": speed, "rows": rows,
            "naive_over_chunked_peak_memory": peaks["naive"]["peak_extra_bytes"] / peaks["chunked"]["peak_extra_bytes"]}


# ---------------------------------------------------------------------------------- the script
def run(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {**gpu_benchmarks(sweep=not quick), **common.machine_record("cuda")}
    return {**cpu_results(quick), **common.machine_record("cpu")}


def check_gates(result: dict) -> list | None:
    """The CPU path's peak-memory gate; none on a GPU, whose goals (TFLOP/s, vs Liger) are recorded only."""
    if "naive_over_chunked_peak_memory" not in result:
        return None
    return common.gate_failures("cross_entropy", result)


def table(result: dict) -> str:
    if "naive_over_chunked_peak_memory" not in result:
        shape = result["shape"]
        lines = [f"fused linear cross-entropy fwd+bwd, N={shape['N']} H={shape['H']} V={shape['V']} {result['dtype']}",
                 common.format_table(result["rows"]), f"goals: {result['goals']}",
                 "chosen (kernels/autotune.py; times per candidate for all N rows of one call):"]
        lines += [f"  {t['why']}" for t in result.get("tuning", [])] or ["  nothing tuned"]
        if result.get("paths"):
            lines += ["each logits path's best plan on the whole op:",
                      common.format_table([{k: r[k] for k in ("path", "ms", "effective_tflops")}
                                           for r in result["paths"]])]
        return "\n".join(lines)
    return "\n".join([f"fused linear cross-entropy on CPU, fp32: peak memory at N,H,V={tuple(result['memory_shape'])} "
                      f"(fresh process each), speed at {tuple(result['speed_shape'])}",
                      common.format_table(result["rows"]),
                      f"naive / chunked peak memory: {result['naive_over_chunked_peak_memory']:.1f}x",
                      "logits path: the chunked PyTorch path (CPU tensors); the two Triton paths and their tuning "
                      "run on CUDA (mftcore bench cross_entropy --device cuda)"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PEAK_MEMORY]:
        return report_peak_memory(argv[1], *map(int, argv[2:5]))
    return common.run_script("cross_entropy", run, table, check_gates, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
