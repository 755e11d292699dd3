"""Benchmark and GPU checks of mftcore.kernels.varlen_attention.

GPU part, called by bench/gpu_check.py (plain functions returning dicts):
    gpu_correctness()  errors against the PyTorch reference (bf16/fp16, deterministic or not), bitwise
                       determinism, agreement with torch.nn.attention.varlen.varlen_attn
    gpu_options()      each option (sliding window 256/1024, softcap, return_lse, separate q/k segments) against
                       the plain causal op: ms and cost per kept query-key pair; gates: the window cheaper than
                       causal, the others within 5% per pair
    gpu_benchmarks()   packed rows of 8k and 16k tokens, documents of 256-4096 tokens, head dim 128, bf16,
                       causal, GQA 32/8 heads: forward and backward TFLOP/s of ours, varlen_attn (FA2 in
                       PyTorch), FlexAttention with a document mask (compiled) and SDPA per document, and
                       the issue's gates: fwd >= 0.9x and bwd >= 0.8x varlen_attn, faster than Flex.
TFLOP/s count 4 * sum(L_i^2) * H * D for the forward (halved when causal) and 2.5x that for the backward;
the backward time is (forward + backward) - forward. Medians of triton.testing.do_bench on random data.

    python bench/bench_varlen_attention.py [--device cpu|cuda] [--quick] [--json PATH]
    mftcore bench varlen_attention [--device cpu|cuda] [--quick] [--json PATH]        # the same

CPU part (--device cpu): the reference (SDPA per document) against one SDPA call with a dense
block-diagonal mask on small shapes (2048 tokens, 8/2 heads, head dim 64, one thread): 10 ms vs
290 ms for 28 documents of 16-128 tokens, 93 ms vs 300 ms for 3 of 128-1024.
"""

from __future__ import annotations

import inspect
import random
import sys
import time

import torch

import common
from mftcore.kernels import varlen_attention
from mftcore.kernels.varlen_attention_reference import varlen_attention_reference

# ------------------------------------------------------------------------------- helpers (CPU-tested)


def packed_lengths(total: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Document lengths drawn uniformly from [lo, hi] filling exactly `total` tokens (the last one cut)."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(lo, hi), total - sum(lengths)))
    return lengths


def attention_flops(lengths, heads: int, head_dim: int, causal: bool, mode: str = "fwd") -> float:
    """4 * sum(L^2) * H * D for the forward, halved when causal; the backward counts 2.5x the forward."""
    fwd = 4 * sum(n * n for n in lengths) * heads * head_dim / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def cu_seqlens_of(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def document_ids(lengths, device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def document_mask_mod(doc: torch.Tensor):
    """FlexAttention mask_mod: same document and not in the future."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    return mask_mod


def varlen_attn_kwargs(fn, causal: bool, scale: float, gqa: bool) -> tuple[dict, bool]:
    """Keyword arguments for this torch's varlen_attn (`is_causal` in 2.9, `window_size`/`scale`/
    `enable_gqa` later), and whether k/v heads must be expanded by hand for GQA."""
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = causal
    else:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    if "scale" in params:
        kwargs["scale"] = scale
    if gqa and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs, gqa and "enable_gqa" not in params


def random_inputs(lengths, heads, head_dim, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    T, (hq, hkv) = sum(lengths), heads
    q, k, v = (torch.randn(T, h, head_dim, device=device, dtype=dtype, generator=g) for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(T, hq, head_dim, device=device, dtype=dtype, generator=g)


def forward_backward(fn, q, k, v, do):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def compare_with_reference(lengths, heads, head_dim, dtype, deterministic, causal=True, device="cuda") -> dict:
    """{o, dq, dk, dv: {ours, reference_lowp, scale, ok}}: max errors of ours and of the reference run in
    `dtype`, both against the reference in fp32, whose max magnitude is `scale`. ok: ours is within 3x the
    reference's own low-precision error plus 2 ulps of the scale (P and dS are rounded to `dtype` before
    their matmuls, as in FA2; a masking or indexing bug errs by the order of `scale`)."""
    q, k, v, do = random_inputs(lengths, heads, head_dim, dtype, device)
    cu, max_len = cu_seqlens_of(lengths, device), max(lengths)
    ours = forward_backward(lambda *a: varlen_attention(*a, cu, max_len, causal=causal,
                                                        deterministic=deterministic), q, k, v, do)
    ref = forward_backward(lambda *a: varlen_attention_reference(*a, cu, causal=causal), q, k, v, do)
    exact = forward_backward(lambda *a: varlen_attention_reference(*a, cu, causal=causal),
                             q.float(), k.float(), v.float(), do.float())
    out = {}
    for name, a, r, e in zip(("o", "dq", "dk", "dv"), ours, ref, exact):
        err, base, scale = ((a.float() - e).abs().max().item(), (r.float() - e).abs().max().item(),
                            e.abs().max().item())
        out[name] = {"ours": err, "reference_lowp": base, "scale": scale,
                     "ok": err <= 3 * base + 2 * torch.finfo(dtype).eps * scale}
    return out


# -------------------------------------------------------------------------------------------- GPU

def gpu_correctness() -> dict:
    """Errors against the reference, determinism, and agreement with varlen_attn; `ok` sums them up."""
    lengths = [1, 127, 128, 129, 700, 2048, 3, 300]
    out = {"cases": {}}
    for dtype in (torch.bfloat16, torch.float16):
        for deterministic in (False, True):
            out["cases"][f"{str(dtype)[6:]}_det{int(deterministic)}"] = compare_with_reference(
                lengths, (8, 2), 128, dtype, deterministic)
    q, k, v, do = random_inputs(lengths, (8, 2), 128, torch.bfloat16, "cuda", seed=1)
    cu = cu_seqlens_of(lengths, "cuda")
    runs = [forward_backward(lambda *a: varlen_attention(*a, cu, 2048, deterministic=True), q, k, v, do)
            for _ in range(2)]
    out["deterministic_bitwise"] = all(torch.equal(a, b) for a, b in zip(*runs))
    try:
        from torch.nn.attention.varlen import varlen_attn

        kwargs, expand = varlen_attn_kwargs(varlen_attn, True, 128 ** -0.5, gqa=True)
        kk, vv = (x.repeat_interleave(4, 1) for x in (k, v)) if expand else (k, v)
        theirs = varlen_attn(q, kk, vv, cu, cu, 2048, 2048, **kwargs)
        out["max_diff_vs_varlen_attn"] = (theirs.float() - runs[0][0].float()).abs().max().item()
    except Exception as e:  # noqa: BLE001 - report, do not fail the other checks
        out["max_diff_vs_varlen_attn"] = f"unavailable: {type(e).__name__}: {e}"
    out["ok"] = out["deterministic_bitwise"] and all(
        c["ok"] for case in out["cases"].values() for c in case.values())
    return out


def time_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def backends(lengths, q, k, v, causal=True):
    """name -> callable(q, k, v) for each implementation available on this machine."""
    T, hq, d = q.shape
    group = hq // k.shape[1]
    cu, max_len, scale = cu_seqlens_of(lengths, q.device), max(lengths), d ** -0.5
    out = {"mftcore": lambda q, k, v: varlen_attention(q, k, v, cu, max_len, causal=causal)}
    try:
        from torch.nn.attention.varlen import varlen_attn

        kwargs, expand = varlen_attn_kwargs(varlen_attn, causal, scale, gqa=group > 1)
        rep = (lambda x: x.repeat_interleave(group, 1)) if expand else (lambda x: x)
        out["varlen_attn"] = lambda q, k, v: varlen_attn(q, rep(k), rep(v), cu, cu, max_len, max_len, **kwargs)
    except ImportError:
        pass
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(document_mask_mod(document_ids(lengths, q.device)), None, None, T, T,
                                       device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        out["flex"] = lambda q, k, v: flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], block_mask=block_mask,
                                           enable_gqa=group > 1)[0].transpose(0, 1)
    except ImportError:
        pass
    out["sdpa_per_document"] = lambda q, k, v: varlen_attention_reference(q, k, v, cu, causal=causal)
    return out


def gpu_benchmarks(totals=(8192, 16384), heads=(32, 8), head_dim=128, lengths_range=(256, 4096)) -> dict:
    """Per total: forward and backward of every backend; the first call of ours tunes its block sizes
    (kernels/autotune.py, or reads this GPU's disk cache), and `tuning` says what was chosen and why."""
    from mftcore.kernels import autotune

    results = {"device": torch.cuda.get_device_name(), "heads": list(heads), "head_dim": head_dim,
               "dtype": "bfloat16", "causal": True, "documents": list(lengths_range), "shapes": []}
    autotune.reset()  # the records of this call only
    for total in totals:
        results["shapes"].append(gpu_shape(total, heads, head_dim, lengths_range))
        torch.cuda.empty_cache()  # the shape's inputs are gone with gpu_shape's frame
    results["tuning"] = [{"op": r.op, "key": r.key, "choice": r.choice, "why": r.describe(),
                          "timings_ms": r.timings_ms} for r in autotune.records()]
    return results


def gpu_shape(total, heads, head_dim, lengths_range) -> dict:
    lengths = packed_lengths(total, *lengths_range, seed=total)
    q, k, v, do = random_inputs(lengths, heads, head_dim, torch.bfloat16, "cuda")
    flops = {m: attention_flops(lengths, heads[0], head_dim, True, m) for m in ("fwd", "bwd")}
    row = {"total_tokens": total, "documents": len(lengths), "max_len": max(lengths), "backends": {}}
    for name, fn in backends(lengths, q, k, v).items():
        try:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), do)  # untimed: compiles, and tunes ours
            fwd = time_ms(lambda: fn(q, k, v))
            both = time_ms(lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), do))
            bwd = both - fwd
            row["backends"][name] = {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_tflops": flops["fwd"] / fwd / 1e9,
                                     "bwd_tflops": flops["bwd"] / bwd / 1e9}
        except Exception as e:  # noqa: BLE001 - one missing baseline must not hide the others
            row["backends"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    ours, fa2, flex = (row["backends"].get(n, {}) for n in ("mftcore", "varlen_attn", "flex"))
    if "fwd_ms" in ours and "fwd_ms" in fa2:
        row["fwd_vs_varlen_attn"] = fa2["fwd_ms"] / ours["fwd_ms"]
        row["bwd_vs_varlen_attn"] = fa2["bwd_ms"] / ours["bwd_ms"]
        row["gate_fwd_0.9x"] = row["fwd_vs_varlen_attn"] >= 0.9
        row["gate_bwd_0.8x"] = row["bwd_vs_varlen_attn"] >= 0.8
    if "fwd_ms" in ours and "fwd_ms" in flex:
        row["gate_faster_than_flex"] = ours["fwd_ms"] < flex["fwd_ms"] and ours["bwd_ms"] < flex["bwd_ms"]
    return row


# ------------------------------------------------------------------------------------ options

def option_cases(lengths, device) -> dict:
    """name -> varlen_attention keywords (with the q/k split it needs) for each option measured against the
    plain causal op: sliding windows shorter than the documents, Gemma2's softcap, the lse, and separate
    q/k segments (chunked prefill: the last half of each document's queries against all its keys)."""
    cu, max_len = cu_seqlens_of(lengths, device), max(lengths)
    q_lengths = [n - n // 2 for n in lengths]
    cu_q, q_rows = cu_seqlens_of(q_lengths, device), torch.cat(
        [torch.arange(a + n // 2, a + n, device=device) for a, n in zip(cu.tolist(), lengths)])
    return {
        "causal": dict(cu=cu, max_len=max_len),
        "window_256": dict(cu=cu, max_len=max_len, window_size=(255, 0)),
        "window_1024": dict(cu=cu, max_len=max_len, window_size=(1023, 0)),
        "softcap_50": dict(cu=cu, max_len=max_len, softcap=50.0),
        "return_lse": dict(cu=cu, max_len=max_len, return_lse=True),
        "q_half_of_k": dict(cu=cu_q, max_len=max(q_lengths), cu_seqlens_k=cu, max_seqlen_k=max_len, q_rows=q_rows),
    }


def option_tokens_seen(lengths, name: str) -> int:
    """Query-key pairs an option's mask keeps (the work a block-skipping kernel should scale with)."""
    def window_pairs(n, w):
        return sum(min(i + 1, w) for i in range(n))
    if name.startswith("window_"):
        return sum(window_pairs(n, int(name.split("_")[1])) for n in lengths)
    if name == "q_half_of_k":
        return sum(sum(range(n // 2 + 1, n + 1)) for n in lengths)
    return sum(n * (n + 1) // 2 for n in lengths)


def options_benchmarks(device="cuda", total=16384, heads=(32, 8), head_dim=128, lengths_range=(2048, 8192),
                       dtype=torch.bfloat16, timer=None) -> dict:
    """Forward and backward time of each option (option_cases) and its cost per kept query-key pair
    relative to the plain causal op. Gates (gate_* keys): a window of 256 is cheaper per token than causal
    (the kernel skips blocks outside the window); softcap, lse and q/k segments cost at most 5% more per
    kept pair than plain (more is a defect to note, the issue's rule)."""
    timer = timer or time_ms
    lengths = packed_lengths(total, *lengths_range, seed=total)
    q, k, v, do = random_inputs(lengths, heads, head_dim, dtype, device)
    rows = []
    for name, case in option_cases(lengths, device).items():
        case = dict(case)
        cu, max_len, q_rows = case.pop("cu"), case.pop("max_len"), case.pop("q_rows", None)
        qq, dd = (q, do) if q_rows is None else (q[q_rows], do[q_rows])
        lse = case.get("return_lse", False)

        def fn(qg, kg, vg):
            out = varlen_attention(qg, kg, vg, cu, max_len, causal=True, **case)
            return out[0] if lse else out

        qg, kg, vg = (x.detach().requires_grad_() for x in (qq, k, v))
        torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), dd)  # untimed: compiles and tunes
        fwd = timer(lambda: fn(qq, k, v))
        both = timer(lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), dd))
        rows.append({"option": name, "fwd_ms": fwd, "bwd_ms": both - fwd, "pairs": option_tokens_seen(lengths, name)})
    plain = rows[0]
    for r in rows:
        for mode in ("fwd", "bwd"):
            r[f"{mode}_per_pair_vs_causal"] = (r[f"{mode}_ms"] / r["pairs"]) / (plain[f"{mode}_ms"] / plain["pairs"])
        r["fwd+bwd_vs_causal"] = (r["fwd_ms"] + r["bwd_ms"]) / (plain["fwd_ms"] + plain["bwd_ms"])
    by = {r["option"]: r for r in rows}
    gates = {"gate_window_256_cheaper_than_causal": by["window_256"]["fwd+bwd_vs_causal"] < 1.0}
    for name in ("softcap_50", "return_lse", "q_half_of_k"):
        gates[f"gate_{name}_within_5pct"] = all(by[name][f"{m}_per_pair_vs_causal"] <= 1.05 for m in ("fwd", "bwd"))
    return {"device": device if device == "cpu" else torch.cuda.get_device_name(), "total_tokens": total,
            "documents": len(lengths), "heads": list(heads), "head_dim": head_dim, "dtype": str(dtype)[6:],
            "options": rows, **gates}


def gpu_options(**kwargs) -> dict:
    """bench/gpu_check.py's stage: options_benchmarks on the GPU at 16k tokens of 2k-8k-token documents
    (kwargs: its --dry-run's CPU shapes)."""
    return options_benchmarks(**kwargs)


# -------------------------------------------------------------------------------------------- CPU

def cpu_benchmarks(total=2048, heads=(8, 2), head_dim=64) -> list[dict]:
    """Reference (SDPA per document) vs one SDPA call with a dense [T, T] document mask, CPU fp32."""
    rows = []
    for lo, hi in ((16, 128), (128, 1024)):
        lengths = packed_lengths(total, lo, hi, seed=0)
        q, k, v, _ = random_inputs(lengths, heads, head_dim, torch.float32, "cpu")
        cu, doc = cu_seqlens_of(lengths, "cpu"), document_ids(lengths, "cpu")
        pos = torch.arange(total)
        mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
        group = heads[0] // heads[1]

        def dense():
            kk, vv = (x.repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)

        times = {}
        for name, fn in (("per_document", lambda: varlen_attention_reference(q, k, v, cu)), ("dense_mask", dense)):
            fn()
            start = time.perf_counter()
            for _ in range(5):
                fn()
            times[name + "_ms"] = (time.perf_counter() - start) / 5 * 1e3
        rows.append({"documents": len(lengths), "lengths": f"{lo}-{hi}", **times})
    return rows


# ---------------------------------------------------------------------------------- the script
def run(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {**gpu_benchmarks(totals=(8192,) if quick else (8192, 16384)), **common.machine_record("cuda")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, threaded timings measure the neighbours, not the code
    try:
        return {"threads": 1, "rows": cpu_benchmarks(total=512 if quick else 2048), **common.machine_record("cpu")}
    finally:
        torch.set_num_threads(threads)


def check_gates(result: dict) -> None:
    """None: gates.json has no section for it; on a GPU the rows record the issue's goals (gate_* keys)."""
    return None


def table(result: dict) -> str:
    if "shapes" in result:
        lines = ["varlen attention, bf16, causal, GQA 32/8 heads, head dim 128", common.format_table(result["shapes"]),
                 "chosen block sizes (kernels/autotune.py):"]
        return "\n".join(lines + ([f"  {t['why']}" for t in result.get("tuning", [])] or ["  nothing tuned"]))
    return "\n".join(["varlen attention reference (SDPA per document) vs one SDPA call with a dense mask, CPU fp32, "
                      "one thread", common.format_table(result["rows"])])


def main(argv=None) -> int:
    return common.run_script("varlen_attention", run, table, check_gates, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
