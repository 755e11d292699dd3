"""The Triton varlen attention kernels, run on CPU by Triton's interpreter.

Not collected by the main suite (the file name does not start with test_): tests/kernels/test_varlen_attention.py
runs it in a subprocess with TRITON_INTERPRET=1, which must be set before triton is imported.
Tolerances: fp32 against a float64 oracle to 2e-5; fp16 to 5e-3 (fp16 rounds P before P @ V, as on a GPU).

The interpreter's tl.dot runs numpy's generic matmul loop (~15 ms for 128x64x64), so most cases run the
kernels with small blocks (SMALL) and document lengths that cross them; the cases marked "GPU blocks"
keep the launcher's own block sizes. The kernel code is the same either way: blocks are constexprs.
"""

import copy
import os
import sys

import pytest
import torch

from mftcore.data.batch import Batch
from mftcore.kernels import varlen_attention  # noqa: F401 - imports the module below
from mftcore.kernels.dispatch import TENSOR_CORE_DTYPES, uses_triton
from mftcore.kernels.varlen_attention_reference import varlen_attention_reference

va = sys.modules["mftcore.kernels.varlen_attention"]

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run with TRITON_INTERPRET=1 (tests/kernels/test_varlen_attention.py does)")

SMALL = {"FWD_CONFIGS": va.BlockConfig(32, 16, 4, 1), "DKDV_CONFIGS": va.BlockConfig(16, 32, 4, 1),
         "DQ_CONFIGS": va.BlockConfig(32, 16, 4, 1)}


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    """Small blocks unless the test's parameter names "GPU blocks"."""
    if "GPU blocks" not in request.node.name:
        for table, cfg in SMALL.items():
            monkeypatch.setattr(va, table, {d: [cfg] for d in getattr(va, table)})


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=5e-3, rtol=5e-3)}


def make_inputs(lengths, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, torch.randn(T, hq, d, generator=g).to(dtype)


def run(q, k, v, cu, max_seqlen, do, return_lse=False, **kwargs):
    """Output and (dq, dk, dv) of the Triton path (and the lse last, when asked)."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    assert uses_triton(q, cuda_dtypes=TENSOR_CORE_DTYPES)
    out = va.varlen_attention(q, k, v, cu, max_seqlen, return_lse=return_lse, **kwargs)
    o = out[0] if return_lse else out
    return (o, *torch.autograd.grad(o, (q, k, v), do)) + ((out[1],) if return_lse else ())


def oracle(q, k, v, cu, do, causal=True, return_lse=False, **options):
    """The reference in float64 (per-document SDPA, or its explicit form for the options)."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    out = varlen_attention_reference(q, k, v, cu, causal=causal, return_lse=return_lse, **options)
    o = out[0] if return_lse else out
    return (o, *torch.autograd.grad(o, (q, k, v), do.double())) + ((out[1],) if return_lse else ())


CASES = {  # name: (document lengths, Hq, Hkv, head dim, causal, dtype, deterministic)
    "one document, causal": ([75], 2, 2, 64, True, torch.float32, False),
    "one document, not causal": ([75], 2, 2, 64, False, torch.float32, True),
    "many tiny documents, GQA": ([1, 2, 3, 1, 5, 4, 1, 7, 2, 1, 9], 4, 2, 32, True, torch.float32, False),
    "length-1 documents, MQA, fp16": ([1, 1, 1, 1, 1], 4, 1, 32, True, torch.float16, True),
    "block edges, GQA, fp16": ([15, 16, 17, 32, 33, 1], 4, 2, 64, True, torch.float16, False),
    "block edges, not causal, head dim 80": ([15, 17, 33, 2], 2, 1, 80, False, torch.float32, False),
    "padded rows, head dim 128": ([35, 29, 64, 50, 14], 2, 2, 128, True, torch.float32, True),
    "GPU blocks, block edges, GQA": ([63, 64, 65, 129, 1], 2, 1, 64, True, torch.float32, False),
    "GPU blocks, long document, fp16": ([300, 1], 2, 1, 64, True, torch.float16, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_output_and_gradients_match_reference(name):
    lengths, hq, hkv, d, causal, dtype, det = CASES[name]
    q, k, v, cu, do = make_inputs(lengths, hq, hkv, d, dtype)
    got = run(q, k, v, cu, max(lengths), do, causal=causal, deterministic=det)
    want = oracle(q, k, v, cu, do, causal)
    for label, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, label
        torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=lambda m: f"{name}: {label}: {m}")


def make_qk_inputs(q_lengths, k_lengths, hq, hkv, d, dtype, seed=0):
    """Separate query and key segments: q [sum q_lengths], k/v [sum k_lengths], both cu_seqlens, dO."""
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(sum(q_lengths), hq, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(sum(k_lengths), hkv, d, generator=g).to(dtype) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
                  for n in (q_lengths, k_lengths))
    return q, k, v, cu_q, cu_k, do


F32, F16 = torch.float32, torch.float16
OPTION_CASES = {  # name: (query lengths, key lengths or None = the same, Hq, Hkv, D, dtype, deterministic, options)
    "window shorter than documents, causal, GQA": ([40, 7, 33], None, 4, 2, 32, F32, False, dict(window_size=(5, -1))),
    "window longer than documents, deterministic": ([20, 9], None, 2, 2, 16, F32, True, dict(window_size=(50, 7))),
    "window of 0 (the diagonal only)": ([19, 1], None, 2, 1, 16, F32, False, dict(window_size=(0, 0))),
    "two-sided window, not causal": ([40, 17], None, 2, 1, 32, F32, False, dict(causal=False, window_size=(6, 3))),
    "left window, right unbounded, not causal, fp16": ([30, 3], None, 2, 2, 16, F16, True,
                                                       dict(causal=False, window_size=(4, -1))),
    "right window only, not causal": ([30, 11], None, 2, 2, 16, F32, False, dict(causal=False, window_size=(-1, 2))),
    "softcap, causal, GQA": ([40, 1, 23], None, 4, 2, 32, F32, False, dict(softcap=2.0)),
    "softcap, not causal, fp16, deterministic": ([17, 30], None, 2, 1, 32, F16, True, dict(causal=False, softcap=5.0)),
    "q != k: fewer q, 0 q, more q than k, causal bottom-right": ([5, 0, 40, 9, 1], [30, 7, 20, 9, 17], 4, 2, 32,
                                                                 F32, False, {}),
    "q != k, not causal, a segment without keys, deterministic": ([5, 0, 40, 9], [30, 7, 20, 0], 2, 1, 16, F32, True,
                                                                  dict(causal=False)),
    "q != k, window and softcap, MQA, fp16": ([8, 33, 3], [40, 20, 3], 4, 1, 32, F16, False,
                                              dict(window_size=(7, -1), softcap=3.0)),
    "q != k, every option, head dim 80, deterministic": ([12, 35], [30, 35], 2, 2, 80, F32, True,
                                                         dict(causal=False, window_size=(9, 2), softcap=4.0)),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_options_match_reference(name):
    """Each option with causal / not, GQA, q != k segments (0 queries, fewer or more queries than keys),
    windows shorter and longer than the documents: o, dq, dk, dv and the lse against float64."""
    q_lengths, k_lengths, hq, hkv, d, dtype, det, options = OPTION_CASES[name]
    q, k, v, cu_q, cu_k, do = make_qk_inputs(q_lengths, k_lengths or q_lengths, hq, hkv, d, dtype)
    if k_lengths:
        options = dict(options, cu_seqlens_k=cu_k, max_seqlen_k=max(k_lengths))
    got = run(q, k, v, cu_q, max(q_lengths), do, return_lse=True, deterministic=det, **options)
    want = oracle(q, k, v, cu_q, do, max_seqlen=max(q_lengths), return_lse=True, **options)
    for label, a, b in zip(("o", "dq", "dk", "dv", "lse"), got, want):
        assert a.shape == b.shape and a.dtype == (torch.float32 if label == "lse" else dtype), label
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype], msg=lambda m: f"{name}: {label}: {m}")
    assert got[-1].shape == (q.shape[0], hq) and got[0].isfinite().all()


def test_keys_outside_every_window_are_never_loaded():
    """NaN in keys and values that no query's window reaches: a block that was loaded and only masked would
    still spread NaN (0 * NaN in P @ V and in dS K), so finite, exact results mean those blocks are skipped,
    in the forward, dK/dV and dQ. 8 queries at the end of 64 keys see keys 51-63 (window 4); keys 0-31 are
    whole key blocks of every kernel (16 keys in the forward and dQ, 32 in dK/dV). (Masked keys inside a
    visited block are not poisoned: their NaN would reach their own dK rows, legitimately computed.)"""
    q, k, v, cu_q, cu_k, do = make_qk_inputs([8, 8], [64, 8], 2, 1, 32, torch.float32, seed=8)
    options = dict(cu_seqlens_k=cu_k, max_seqlen_k=64, window_size=(4, -1))
    want = oracle(q, k, v, cu_q, do, max_seqlen=8, **options)
    assert SMALL["FWD_CONFIGS"].block_n == SMALL["DQ_CONFIGS"].block_n == 16 and SMALL["DKDV_CONFIGS"].block_n == 32
    k[:32], v[:32] = float("nan"), float("nan")
    for det in (False, True):
        got = run(q, k, v, cu_q, 8, do, deterministic=det, **options)
        for label, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a.double(), b, **TOL[torch.float32], msg=lambda m: f"{label}: {m}")


def test_a_short_window_costs_less_than_causal():
    """CPU time of the interpreted kernels (block visits dominate it): a window of 16 on a 384-token document
    visits at most 3 key blocks of 16 per query block where causal visits 13 on average. Measured 0.40x
    causal for forward + backward (0.54x at 256 tokens, where fixed costs weigh more); a window that were
    only masked, its blocks still visited, would cost 1x: the gate is 0.6x."""
    import time

    q, k, v, cu, do = make_inputs([384], 1, 1, 16, torch.float32, seed=9)

    def cpu_seconds(**options):
        t0 = time.process_time()
        run(q, k, v, cu, 384, do, **options)
        return time.process_time() - t0

    cpu_seconds(window_size=(16, -1))  # warm up the interpreter's caches for both
    ratio = cpu_seconds(window_size=(16, -1)) / cpu_seconds()
    assert ratio < 0.6, ratio


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, computing the poisoned document itself
def test_no_read_across_a_document_boundary():
    """NaN in the middle document: a load that crossed into it would spread NaN to its neighbours."""
    lengths = [33, 20, 40]
    q, k, v, cu, do = make_inputs(lengths, 2, 1, 64, torch.float32, seed=1)
    poisoned = slice(33, 53)
    for x in (q, k, v, do):
        x[poisoned] = float("nan")
    for det in (False, True):
        got = run(q, k, v, cu, max(lengths), do, deterministic=det)
        for part in (slice(0, 33), slice(53, 93)):
            sub_cu = torch.tensor([0, part.stop - part.start], dtype=torch.int32)
            want = oracle(q[part], k[part], v[part], sub_cu, do[part], True)
            for a, b in zip(got, want):
                torch.testing.assert_close(a[part].double(), b, **TOL[torch.float32])


def test_deterministic_backward_is_bitwise_reproducible_and_agrees():
    q, k, v, cu, do = make_inputs([50, 17, 40], 4, 2, 64, torch.float16, seed=2)
    first = run(q, k, v, cu, 50, do, deterministic=True)
    second = run(q, k, v, cu, 50, do, deterministic=True)
    atomic = run(q, k, v, cu, 50, do, deterministic=False)
    for a, b, c in zip(first, second, atomic):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=2e-3, rtol=2e-3)


def test_deterministic_follows_torch_flag():
    q, k, v, cu, do = make_inputs([50, 30], 2, 2, 64, torch.float32, seed=3)
    torch.use_deterministic_algorithms(True)
    try:
        flagged = run(q, k, v, cu, 50, do)
    finally:
        torch.use_deterministic_algorithms(False)
    explicit = run(q, k, v, cu, 50, do, deterministic=True)
    for a, b in zip(flagged, explicit):
        assert torch.equal(a, b)


def test_segment_checks_run_before_the_kernel():
    q, k, v, cu, do = make_inputs([10, 20], 2, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="max_seqlen=10 is shorter than a segment of 20"):
        va.varlen_attention(q, k, v, cu, 10)
    with pytest.raises(ValueError, match="rise from 0 to T=30"):
        va.varlen_attention(q, k, v, torch.tensor([0, 10, 25], dtype=torch.int32), 20)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_tiny_model_packed_row_matches_documents_alone(family):
    """Through HF: a packed row on the Triton kernels gives each document's logits and gradients alone
    (under SDPA, another model with the same weights; Gemma2 under eager, with its 4-token sliding window
    on layer 0 and attention softcap, against HF's own masks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mftcore.model.decoder import decoder, hidden_states

    extra = dict(head_dim=16, sliding_window=4, attn_logit_softcapping=2.0, query_pre_attn_scalar=16) \
        if family == "gemma2" else {}
    config = AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=97, **extra)
    torch.manual_seed(0)
    packed_model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="mftcore_varlen")
    alone_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager" if extra else "sdpa")
    alone_model.load_state_dict(packed_model.state_dict())
    assert packed_model.config._attn_implementation == "mftcore_varlen"
    packed_model.eval(), alone_model.eval()
    docs = [torch.randint(0, 97, (n,)) for n in (13, 1, 30, 6)]

    def forward(model, ids_list):
        ids = torch.cat(ids_list)[None]
        pos = torch.cat([torch.arange(len(x)) for x in ids_list])[None]
        cu = torch.tensor([0, *torch.tensor([len(x) for x in ids_list]).cumsum(0).tolist()], dtype=torch.int32)
        if model is alone_model and extra:  # HF's sliding masks: run_decoder's packed mask has no window
            return model.lm_head(decoder(model)(input_ids=ids).last_hidden_state)[0]
        batch = Batch(ids, ids, ids, pos, cu, max(len(x) for x in ids_list))
        return model.lm_head(hidden_states(model, batch))[0]

    probe = torch.randn(sum(len(x) for x in docs), 97)
    packed = forward(packed_model, docs)
    grads = torch.autograd.grad((packed * probe).sum(), list(packed_model.parameters()))
    alone_logits, start = [], 0
    alone_grads = [torch.zeros_like(g) for g in grads]
    for doc in docs:
        logits = forward(alone_model, [doc])
        alone_logits.append(logits)
        for acc, g in zip(alone_grads, torch.autograd.grad((logits * probe[start:start + len(doc)]).sum(),
                                                           list(alone_model.parameters()))):
            acc += g
        start += len(doc)
    torch.testing.assert_close(packed, torch.cat(alone_logits), atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, alone_grads):  # Gemma2: fp32 tanh by exp2 (~1e-7, times the cap) through 2 layers
        torch.testing.assert_close(a, b, atol=5e-5 if extra else 1e-5, rtol=1e-4)


# ------------------------------------------------------------------ the tuner, opcheck, host reads

def test_the_tuner_picks_the_fastest_candidate_of_each_kernel(monkeypatch, tmp_path):
    """MFTCORE_AUTOTUNE=1 with made-up timings that favour the second small candidate of each kernel: that
    one is used (the launches show it), the results still match the oracle, and a second call times nothing."""
    from mftcore.kernels import autotune

    monkeypatch.setenv("MFTCORE_AUTOTUNE", "1")
    monkeypatch.setenv("MFTCORE_CACHE_DIR", str(tmp_path))
    autotune.reset()
    second = {"FWD_CONFIGS": va.BlockConfig(16, 16, 2, 1), "DKDV_CONFIGS": va.BlockConfig(16, 16, 2, 1),
              "DQ_CONFIGS": va.BlockConfig(16, 16, 2, 1)}
    for table, cfg in second.items():
        monkeypatch.setattr(va, table, {d: [SMALL[table], cfg] for d in getattr(va, table)})
    seen, timed = [], []
    launch = va.launch
    monkeypatch.setattr(va, "launch", lambda spec, grid, *a: seen.append(spec) or launch(spec, grid, *a))

    def fake_timer(fn):
        fn()
        timed.append(seen[-1])
        return 1.0 if seen[-1].constexprs["BLOCK_M"] == 16 and seen[-1].num_warps == 2 else 2.0

    monkeypatch.setattr(va, "timer", lambda: fake_timer)
    q, k, v, cu, do = make_inputs([40, 9, 23], 4, 2, 64, torch.float32, seed=4)
    try:
        for det in (True, False):
            got = run(q, k, v, cu, 40, do, deterministic=det)
            for a, b in zip(got, oracle(q, k, v, cu, do, True)):
                torch.testing.assert_close(a.double(), b, **TOL[torch.float32])
        assert len(timed) == 2 * 4  # forward, dK/dV (atomic and not), dQ: two candidates each
        seen.clear()
        timed.clear()
        run(q, k, v, cu, 40, do, deterministic=True)
        assert timed == [] and all(s.num_warps == 2 for s in seen if "BLOCK_N" in s.constexprs)
        assert {r.source for r in autotune.records()} == {"measured"}
    finally:
        autotune.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_on_the_triton_path(dtype):
    q, k, v, cu, do = make_inputs([20, 1, 11], 4, 2, 64, dtype, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    # q, k, v, cu_q, cu_k, max_q, max_k, left, right (causal), softcap, scale, deterministic, return_lse
    args = (q, k, v, cu, cu, 20, 20, -1, 0, 0.0, 0.125, False, False)
    torch.library.opcheck(torch.ops.mftcore.varlen_attention.default, args)
    o, lse = torch.ops.mftcore.varlen_attention(*args)
    assert lse.shape == (4, 32)
    torch.library.opcheck(torch.ops.mftcore.varlen_attention_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, cu, cu, 20, 20, -1, 0, 0.0,
                           0.125, True))
    # separate q/k segments, a window and a softcap
    q2, _, _, cu_q, cu_k, do2 = make_qk_inputs([7, 0, 12], [20, 1, 11], 4, 2, 64, dtype, seed=5)
    args = (q2.requires_grad_(), k, v, cu_q, cu_k, 12, 20, 5, 2, 3.0, 0.125, False, True)
    torch.library.opcheck(torch.ops.mftcore.varlen_attention.default, args)
    o, lse = torch.ops.mftcore.varlen_attention(*args)
    torch.library.opcheck(torch.ops.mftcore.varlen_attention_backward.default,
                          (do2, q2.detach(), k.detach(), v.detach(), o.detach(), lse, cu_q, cu_k, 12, 20, 5, 2, 3.0,
                           0.125, False))


def test_no_host_reads_in_forward_and_backward(monkeypatch):
    """The CUDA path's code: no tensor value is read on the host (the interpreter-only segment check,
    which reads cu_seqlens because the interpreter does not bounds-check, is left out)."""
    from tests.helpers.no_sync import no_host_reads

    monkeypatch.setattr(va, "segments", lambda *args: None)
    q, k, v, cu, do = make_inputs([30, 2, 17], 4, 2, 64, torch.float16, seed=6)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    cu_k = torch.tensor([0, 20, 35, 49], dtype=torch.int32)
    every_option = dict(cu_seqlens_k=cu_k, max_seqlen_k=20, window_size=(8, -1), softcap=5.0, return_lse=True)
    for det, options in ((False, {}), (True, {}), (False, every_option)):
        with no_host_reads():
            out = va.varlen_attention(q, k, v, cu, 30, deterministic=det, **options)
            o = out[0] if options else out
            grads = torch.autograd.grad(o, (q, k, v), do)
        assert all(g.isfinite().all() for g in grads)


CANDIDATES = [(d, table, cfg) for table in ("FWD_CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS")
              for d in (64, 128, 256) for cfg in getattr(va, table)[d]]


@pytest.mark.parametrize("d, table, cfg", CANDIDATES, ids=lambda x: str(x).replace("BlockConfig", ""))
def test_every_tuning_candidate_matches_the_oracle(d, table, cfg, monkeypatch, request):
    """Each block configuration the tuner may pick (GPU sizes, run as they are), alone in its table, on
    documents that cross its blocks: the same results as the float64 oracle (fp32 inputs)."""
    monkeypatch.setattr(va, table, {**getattr(va, table), d: [cfg]})
    q, k, v, cu, do = make_inputs([70, 1, 130], 1, 1, d, torch.float32, seed=7)
    for det in ((False, True) if table != "FWD_CONFIGS" else (False,)):
        got = run(q, k, v, cu, 130, do, deterministic=det)
        for label, a, b in zip(("o", "dq", "dk", "dv"), got, oracle(q, k, v, cu, do, True)):
            torch.testing.assert_close(a.double(), b, **TOL[torch.float32], msg=lambda m: f"{label}: {m}")
