"""Code benchmarks during training (`eval_benchmarks`): which are due at a step, and their evaluation on
the model being trained, split across the ranks, without touching anything the training depends on.

The training's random streams are left exactly where they were: every generator state (Python, NumPy,
torch CPU and CUDA) is captured before and restored after, and sampling is seeded from the entry's
seed plus the step (plus the rank), so an evaluation draws the same samples in a resumed run. The
model goes back to training mode; generation runs under no_grad and leaves the optimizer, the data
position and the weights alone. So a run with eval_benchmarks trains bitwise like one without
(tests/codeeval/test_training.py), and resumes bitwise.
"""

from __future__ import annotations

import contextlib
import json
import os

from tqdm.auto import tqdm

from mftcore import checkpoint
from mftcore.codeeval.benchmarks import HF_PREFIX, read_benchmark
from mftcore.codeeval.harness import evaluate_benchmark
from mftcore.codeeval.spec import parse_metric, parse_specs
from mftcore.errors import ConfigError
from mftcore.io import atomic_write_text
from mftcore.parallel.comm import gather_objects
from mftcore.sandbox import check_platform


def check_benchmarks(cfg) -> tuple:
    """(specs, metric) of a config: one-line errors (a local file that is not there too, a platform where
    the sandbox cannot run) before anything is loaded."""
    specs = parse_specs(cfg.eval_benchmarks)
    for i, spec in enumerate(specs):
        if not spec.file.startswith(HF_PREFIX) and not os.path.isfile(spec.file):
            raise ConfigError(f"config: eval_benchmarks[{i}].file: {spec.file}: benchmark file not found "
                              f"(a Hugging Face dataset is written hf:NAME)")
    metric = parse_metric(cfg.metric_for_best, specs)
    if specs:
        check_platform()
    return specs, metric


def local_workers() -> int:
    """Sandbox workers per rank: the node's CPUs shared by its ranks (torchrun's LOCAL_WORLD_SIZE)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextlib.contextmanager
def random_streams_kept():
    state = checkpoint.capture_rng()
    try:
        yield
    finally:
        checkpoint.restore_rng(state)


class TrainingBenchmarks:
    """The run's benchmarks: their specs, problems (read once) and the generator over the trained model."""

    def __init__(self, cfg, tokenizer, engine, env, autocast=contextlib.nullcontext):
        from mftcore.commands.generate import Generator

        self.specs, self.metric = check_benchmarks(cfg)
        self.problems = {s.name: read_benchmark(s.file, split=s.split, tag=s.tag, limit=s.limit) for s in self.specs}
        self.gen = Generator(engine.model, tokenizer, dict(cfg.role_markers), env.device)
        self.engine, self.env, self.autocast, self.output_dir = engine, env, autocast, cfg.output_dir

    def due(self, step: int, total_steps: int) -> list:
        return [s for s in self.specs if (s.every_steps and step % s.every_steps == 0) or step == total_steps]

    def evaluate(self, step: int, specs: list) -> dict:
        """{name: BenchmarkResult} of `specs` at `step`; every rank calls it and gets every result. Rank 0
        writes each one's per-problem results to output_dir/benchmarks/NAME/step-STEP.jsonl."""
        results = {}
        with random_streams_kept():
            for spec in specs:
                mine = len(range(self.env.rank, len(self.problems[spec.name]) * spec.n, self.env.world_size))
                # Rank 0's completions, one line below the train bar and gone when done (as evaluation's bar).
                with tqdm(total=mine, desc=spec.name, unit="completion", leave=False, position=1, mininterval=0,
                          miniters=1, dynamic_ncols=True, disable=self.env.rank != 0) as bar:
                    results[spec.name] = evaluate_benchmark(
                        self.gen, self.problems[spec.name], spec, seed=spec.seed + step, rank=self.env.rank,
                        world_size=self.env.world_size, gather=gather_objects, autocast=self.autocast,
                        root=self.engine.module, workers=local_workers(), progress=bar.update)
                if self.env.rank == 0:
                    path = os.path.join(self.output_dir, "benchmarks", spec.name, f"step-{step}.jsonl")
                    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                    for r in results[spec.name].records()))
        return results


def benchmark_records(result) -> tuple:
    """(scalars, per-tag values) of one result, as metrics.write takes them."""
    metrics = result.metrics()
    tags = result.by_tag()
    per_tag = {f"task_{key}": {tag: values[key] for tag, values in tags.items() if key in values} for key in metrics}
    return {**metrics, "problems": len(result.problems)}, per_tag
