"""CPU threads: training steps per second of configs/tiny.json at 1 and at 2 torch threads, measured in
one run (interleaved rounds, the fastest of each counts), and their ratio.

    python bench/bench_threads.py [--quick] [--json PATH]
    mftcore bench threads [--quick] [--json PATH]              # the same

Each call runs STEPS optimizer steps of the tiny model (full fine-tuning, AdamW, the fused loss) on the
same fixed micro-batches of the sample data; only torch.set_num_threads differs. Wall-clock time: that
is what more threads are meant to shorten. On a machine whose cores are shared with other processes
the second thread waits for a core, and with OpenMP's spin-waiting both threads can run slower than
one (the claim this measures: "two threads were 4-9x slower than one"). CPU only; no gate: the
results file records what this machine does, and the start-up report says how many threads a run uses.
"""

from __future__ import annotations

import tempfile

import torch

import common
from bench_train_step import example_samples, fused_loss

STEPS, QUICK_STEPS = 8, 2
THREADS = (1, 2)


def make_step(model, optimizer, batches, num_tasks: int):
    from mftcore.loss import step_token_scales

    def steps(n: int):
        for i in range(n):
            micro = [batches[i % len(batches)]]
            scales, _ = step_token_scales(micro, "case3", num_tasks)
            loss, _ = fused_loss(model, micro[0], num_tasks, scales[0])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return steps


def measure(n_steps: int, rounds: int) -> dict:
    from mftcore.data import StepLoader
    from mftcore.model.build import build_model

    with tempfile.TemporaryDirectory() as cache:
        cfg, data, tokenizer = example_samples(common.ROOT + "/configs/tiny.json", cache)
    loader = StepLoader(data.train, batch_size=cfg.per_device_train_batch_size, accumulation=1,
                        pad_id=tokenizer.pad_token_id or 0, seed=0, pack=False, seq_length=cfg.seq_length)
    batches = [step.batches[0] for _, step in zip(range(n_steps), loader.steps())]  # fixed: the same every call
    torch.manual_seed(0)
    model = build_model(cfg, len(tokenizer), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = make_step(model, optimizer, batches, len(data.names))
    before = torch.get_num_threads()

    def at(threads: int):
        def call():
            torch.set_num_threads(threads)
            steps(n_steps)
        return call

    try:
        at(1)()  # warm-up: first-call allocations and kernel choices are not counted
        timings = common.time_interleaved({f"{t}_threads": at(t) for t in THREADS}, rounds=rounds, clock="wall")
    finally:
        torch.set_num_threads(before)
    rates = {name: n_steps / seconds for name, seconds in timings.best.items()}
    return {"steps_per_call": n_steps, "rounds": rounds, "clock": "wall",
            **{f"steps_per_s_{name}": rate for name, rate in rates.items()},
            "one_over_two_threads": rates["1_threads"] / rates["2_threads"],
            "torch_default_threads": before}


def run(device: str, quick: bool) -> dict:
    if device != "cpu":
        raise SystemExit("bench threads: CPU only (torch threads are a CPU setting)")
    result = measure(QUICK_STEPS if quick else STEPS, 1 if quick else 3)
    return {**result, **common.machine_record("cpu"), "config": "configs/tiny.json"}


def table(result: dict) -> str:
    rows = [{"threads": t, "steps/s": f"{result[f'steps_per_s_{t}_threads']:.2f}"} for t in THREADS]
    return "\n".join([f"train steps/s of configs/tiny.json by torch threads ({result['clock']} clock, fastest "
                      f"of {result['rounds']} rounds of {result['steps_per_call']} steps)",
                      common.format_table(rows),
                      f"1 thread / 2 threads = {result['one_over_two_threads']:.2f}x "
                      f"(torch's default here: {result['torch_default_threads']} threads)"])


def check_gates(result: dict):
    return None


def main(argv=None) -> int:
    return common.run_script("threads", run, table, check_gates, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
