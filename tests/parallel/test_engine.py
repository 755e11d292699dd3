"""The one-process Engine: step() applies finite updates and skips non-finite ones, with the host read
(CPU optimizers) and with fused AdamW's found_inf switch, which decides on the device (the GPU path, run
here on CPU: fused AdamW has a CPU kernel)."""

import pytest
import torch

from mftcore.parallel.engine import SKIP_REASONS, Engine
from tests.helpers.engine import InfGradient


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x).sum()


def make_engine(fused: bool):
    torch.manual_seed(0)
    module = Tiny()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, **({"fused": True} if fused else {}))
    return Engine(module, module, optimizer)


def run_step(engine, poison):
    loss = engine.module(torch.ones(4, 3))
    if poison == "gradient":
        loss = InfGradient.apply(loss)
    engine.backward(loss)
    total = loss.detach() * (float("nan") if poison == "loss" else 1.0)
    return engine.step(1.0, total)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("poison", [None, "loss", "gradient"])
def test_step_applies_finite_updates_and_skips_the_rest(fused, poison):
    engine = make_engine(fused)
    before = [p.detach().clone() for p in engine.module.parameters()]
    _, code = run_step(engine, poison)
    if fused:
        assert isinstance(code, torch.Tensor)  # decided on the device: nothing read back
    reason = SKIP_REASONS[int(code)]
    moved = [not torch.equal(a, b) for a, b in zip(before, engine.module.parameters())]
    if poison is None:
        assert reason is None and all(moved)
        assert all(int(s["step"]) == 1 for s in engine.optimizer.state.values())
    else:
        assert reason in ("loss", "gradient") and not any(moved)
        assert all(int(s.get("step", 0)) == 0 for s in engine.optimizer.state.values())
    assert all(p.grad is None for p in engine.module.parameters())


def test_fused_and_host_paths_make_the_same_update_decisions():
    """A sequence of good and bad steps: both paths leave the same step counts and reasons."""
    results = {}
    for fused in (False, True):
        engine = make_engine(fused)
        codes = [int(run_step(engine, p)[1]) for p in (None, "loss", None, "gradient", None)]
        results[fused] = (codes, [int(s["step"]) for s in engine.optimizer.state.values()])
    assert results[False] == results[True] == ([0, 1, 0, 2, 0], [3, 3])
