"""The fused cross-entropy's Triton paths in Triton's interpreter: every candidate the tuner may pick
against the float64 oracle, the tuner end to end (timings, cache, switch), opcheck, and no host reads.

Not collected by the main suite (the name does not start with test_): tests/kernels/test_cross_entropy_interpret.py
runs it in a subprocess with TRITON_INTERPRET=1, which must be set before triton is imported. The GPU tiles
(256x128x64 and so on) run here as they are, on shapes smaller than one tile in each direction and larger
than one in another, so masks and edges are exercised; fp16 stands for bf16, which the interpreter gets wrong.
"""

import os

import pytest
import torch

from mftcore.kernels import autotune
from mftcore.kernels import cross_entropy as ce
from mftcore.kernels import cross_entropy_kernels as cek
from mftcore.kernels.cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    token_scales,
)
from tests.helpers.no_sync import no_host_reads

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run with TRITON_INTERPRET=1 (tests/kernels/test_cross_entropy_interpret.py does)")

FAMILY_DTYPE = {"sm90_16bit": torch.float16, "sm80_16bit": torch.float16, "fp32": torch.float32,
                "interpret": torch.float32}
PLANS = sorted({(p, FAMILY_DTYPE[f]) for f in FAMILY_DTYPE for p in cek.TRITON_CANDIDATES[f]}, key=str)
PLANS += [(p, d) for p in cek.CUBLAS_CANDIDATES for d in (torch.float32, torch.float16)]
TOL = {torch.float32: 2e-5, torch.float16: 6e-3}  # max error / largest reference value


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch, tmp_path):
    monkeypatch.setenv("MFTCORE_CACHE_DIR", str(tmp_path / "cache"))
    autotune.reset()
    yield
    autotune.reset()


def case(N=260, H=40, V=140, K=3, dtype=torch.float32, seed=0):
    """N over one 256-row tile, V over one 128-column tile, H not a multiple of the K blocks."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 3).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    labels[1] = V - 1
    return hidden, weight, bias, labels, torch.randint(0, K, (N,), generator=g)


def check_against_oracle(hidden, weight, bias, labels, tasks, tol, **kw):
    ours = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    refs = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    out = fused_linear_cross_entropy(ours[0], ours[1], labels, tasks, bias=ours[2], num_tasks=3, **kw)
    ref = fused_linear_cross_entropy_reference(refs[0], refs[1], labels, tasks, bias=refs[2], num_tasks=3)
    out.loss.backward()
    ref.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) <= tol * abs(ref.loss.item())
    for got, want in zip([out.task_loss_sum] + [t.grad for t in ours], [ref.task_loss_sum] + [t.grad for t in refs]):
        err = (got.double() - want).abs().max().item()
        assert err <= tol * want.abs().max().item(), (err, want.abs().max().item())


@pytest.mark.parametrize("plan, dtype", PLANS, ids=lambda x: str(x).replace("ChunkPlan", "").replace(" ", ""))
def test_every_candidate_plan_matches_the_oracle(plan, dtype, monkeypatch):
    monkeypatch.setattr(cek, "default_plan", lambda family: plan)
    hidden, weight, bias, labels, tasks = case(dtype=dtype)
    check_against_oracle(hidden, weight, bias, labels, tasks, TOL[dtype])


@pytest.mark.parametrize("family", ["sm90_16bit", "sm80_16bit"])
def test_every_weight_gradient_tile_accumulates_correctly(family, monkeypatch):
    """fp16 hidden states and an fp32 head: grad_W summed in fp32 by each candidate tile, over 3 chunks."""
    monkeypatch.setattr(ce, "chunk_rows", lambda *args: 128)
    hidden, weight, bias, labels, tasks = case(dtype=torch.float16)
    for tile in cek.GRAD_W_CANDIDATES[family]:
        monkeypatch.setitem(cek.GRAD_W_CANDIDATES, "interpret", [tile])
        w32 = weight.float().requires_grad_()
        fused_linear_cross_entropy(hidden, w32, labels, tasks, num_tasks=3).loss.backward()
        w64 = weight.double().requires_grad_()
        fused_linear_cross_entropy_reference(hidden.double(), w64, labels, tasks, num_tasks=3).loss.backward()
        assert w32.grad.dtype == torch.float32
        err = (w32.grad.double() - w64.grad).abs().max().item()
        assert err <= 2e-3 * w64.grad.abs().max().item(), (tile, err)


def test_the_tuner_times_both_paths_keeps_the_faster_and_caches_it(monkeypatch, tmp_path):
    """MFTCORE_AUTOTUNE=1 in the interpreter, with timings made up per path (the interpreter's own would
    mean nothing): the cuBLAS plan 'wins', is used, written to the cache and not timed again."""
    monkeypatch.setenv("MFTCORE_AUTOTUNE", "1")
    last, timed, launched = {}, [], []
    step = cek.chunk_step

    def recording_step(*args):
        last["plan"] = args[7]
        return step(*args)

    def fake_timer(fn):
        fn()
        timed.append(last["plan"])
        return 1.0 if last["plan"].path == "cublas" else 2.0

    monkeypatch.setattr(cek, "chunk_step", recording_step)
    monkeypatch.setattr(ce, "chunk_step", recording_step)
    monkeypatch.setattr(cek, "timer", lambda: fake_timer)
    original_launch = cek.launch
    monkeypatch.setattr(cek, "launch", lambda spec, grid, *a: launched.append(spec.kernel.fn.__name__)
                        or original_launch(spec, grid, *a))
    hidden, weight, bias, labels, tasks = case()
    check_against_oracle(hidden, weight, bias, labels, tasks, TOL[torch.float32])
    assert sorted(p.path for p in timed) == ["cublas", "triton"]
    (rec,) = autotune.records("cross_entropy")
    assert rec.choice["path"] == "cublas" and rec.source == "measured"
    assert os.path.isfile(autotune.cache_path("cross_entropy", rec.key))
    timed.clear()
    launched.clear()
    check_against_oracle(hidden, weight, bias, labels, tasks, TOL[torch.float32])
    assert timed == []  # chosen once per key
    assert set(launched) == {"_rows_lse_grad_kernel"}
    autotune.reset()
    monkeypatch.setenv("MFTCORE_AUTOTUNE", "0")
    launched.clear()
    check_against_oracle(hidden, weight, bias, labels, tasks, TOL[torch.float32])
    assert timed == [] and "_logits_lse_kernel" in launched and "_rows_lse_grad_kernel" not in launched


OPTIONS = {"plain": (), "options": (0.1, 0.02, 3.0, 1.3, False), "options-none": (0.1, 0.02, 3.0, 1.3, True)}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["triton", "cublas"])
def test_opcheck_on_the_triton_paths(dtype, path, options, monkeypatch):
    """options: label_smoothing, z_loss, softcap, logit_scale, recompute (reduction="none")."""
    if path == "cublas":
        monkeypatch.setattr(cek, "default_plan", lambda family: cek.CUBLAS_INTERPRET[0])
    hidden, weight, bias, labels, tasks = case(N=40, H=24, V=50, dtype=dtype)
    scale, t, valid, _ = token_scales(labels, tasks, 3, "task_mean")
    args = (hidden.requires_grad_(), weight.float().requires_grad_(), bias.requires_grad_(), labels, t, valid,
            scale, 3, True, True, True, None, False, *OPTIONS[options])
    torch.library.opcheck(torch.ops.mftcore.fused_linear_cross_entropy.default, args)


@pytest.mark.parametrize("path", ["triton", "cublas"])
def test_no_host_reads_on_the_triton_paths(path, monkeypatch):
    """Forward and backward of both paths (and the no-gradient path) read no tensor value on the host."""
    if path == "cublas":
        monkeypatch.setattr(cek, "default_plan", lambda family: cek.CUBLAS_INTERPRET[0])
    hidden, weight, bias, labels, tasks = case(N=40, H=24, V=50, dtype=torch.float16)
    h, w = hidden.clone().requires_grad_(), weight.float().requires_grad_()
    with no_host_reads():
        out = fused_linear_cross_entropy(h, w, labels, tasks, bias=bias, num_tasks=3)
        out.loss.backward()
        with torch.no_grad():
            fused_linear_cross_entropy(h, w, labels, tasks, bias=bias, num_tasks=3, reduction="token_mean")
        opts = dict(label_smoothing=0.1, z_loss=0.01, softcap=2.0, logit_scale=0.7)
        fused_linear_cross_entropy(h, w, labels, tasks, bias=bias, num_tasks=3, reduction="none",
                                   **opts).loss.sum().backward()
    assert h.grad.isfinite().all() and w.grad.isfinite().all()


def test_tune_shapes_tunes_every_op_a_run_meets(monkeypatch):
    """What rank 0 runs before the first step (mftcore/parallel/tuning.py), at tiny shapes in fp16: the
    fused loss with and without gradients, the fp32 head's weight-gradient GEMM, and each attention kernel."""
    from mftcore.parallel.tuning import RunShapes, tune_shapes

    monkeypatch.setenv("MFTCORE_AUTOTUNE", "1")
    monkeypatch.setattr(cek, "timer", lambda: lambda fn: fn() or 1.0)
    va = __import__("sys").modules["mftcore.kernels.varlen_attention"]
    monkeypatch.setattr(va, "timer", lambda: lambda fn: fn() or 1.0)
    small = va.BlockConfig(16, 16, 1, 1)
    for table in ("FWD_CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS"):
        monkeypatch.setattr(va, table, {d: [small] for d in getattr(va, table)})
    shapes = RunShapes(train_tokens=64, eval_tokens=32, hidden=24, vocab=50, bias=False, weight_dtype=torch.float32,
                       dtype=torch.float16, varlen=True, heads=2, kv_heads=1, head_dim=16, seq_length=32)
    tune_shapes(shapes, torch.device("cpu"))
    ops = sorted({r.op for r in autotune.records()})
    assert ops == ["cross_entropy", "cross_entropy_grad_weight", "varlen_attention_dkdv", "varlen_attention_forward"]
    assert sorted(r.key["grad"] for r in autotune.records("cross_entropy")) == [0, 1]
