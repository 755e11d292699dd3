"""Evaluate a model on a benchmark: generate n completions per problem (batched, left-padded, with the
KV cache: commands/generate.py), run each after its tests in the sandbox, and count pass@k.

With several ranks, the (problem, sample) pairs are dealt round-robin; each rank generates and runs
its own, and the results are gathered so every rank holds all of them. Every rank makes the same
number of generate calls (placeholder prompts where it has none left) with `synced_gpus`, so that
sharded engines (FSDP2, ZeRO-3), which gather weights in every forward, stay in step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from mftcore.codeeval.passk import mean_pass_at_k, pass_at_k, pass_at_k_by_tag
from mftcore.codeeval.prompts import program_of, prompt_ids, stop_strings
from mftcore.sandbox import Limits, SandboxPool


@dataclass
class ProblemResult:
    task_id: str
    tag: object
    completions: list
    passed: list
    errors: list  # the failure's last line per completion (None where it passed)

    def record(self, ks: list) -> dict:
        n, c = len(self.passed), sum(self.passed)
        return {"task_id": self.task_id, "tag": self.tag, "completions": self.completions, "passed": self.passed,
                "errors": self.errors, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n}}


@dataclass
class BenchmarkResult:
    name: str
    ks: list
    problems: list = field(default_factory=list)  # [ProblemResult], in the benchmark's order
    capabilities: tuple = ()  # the sandbox's restrictions on this platform

    def metrics(self) -> dict:
        return mean_pass_at_k([(len(p.passed), sum(p.passed)) for p in self.problems], self.ks)

    def by_tag(self) -> dict:
        return pass_at_k_by_tag([(p.tag, len(p.passed), sum(p.passed)) for p in self.problems], self.ks)

    def records(self) -> list:
        return [p.record(self.ks) for p in self.problems]

    def table(self) -> str:
        """The summary: one row for the benchmark, one per task tag."""
        cols = [f"pass@{k}" for k in self.ks]
        n = max((len(p.passed) for p in self.problems), default=0)
        rows = [(self.name, len(self.problems), self.metrics())]
        for tag, values in self.by_tag().items():
            rows.append((f"  {tag}", sum(p.tag == tag for p in self.problems), values))
        width = max(len(r[0]) for r in rows + [("benchmark", 0, {})])
        lines = [f"{'benchmark':<{width}}  problems  samples  " + "  ".join(f"{c:>8}" for c in cols)]
        for label, count, values in rows:
            cells = "  ".join(f"{values[c]:8.4f}" if c in values else f"{'-':>8}" for c in cols)
            lines.append(f"{label:<{width}}  {count:>8}  {n:>7}  {cells}")
        return "\n".join(lines)


def generate_completions(gen, problems: list, spec, items: list, *, seed: int, synced: bool, batches: int,
                         autocast=contextlib.nullcontext, progress=None) -> list:
    """Completion text for each (problem index, sample index) of `items`, in `batches` generate calls
    (more than the items need: placeholder calls, for ranks that must stay in step)."""
    from mftcore.commands.generate import Sampling, generate_ids

    sampling = Sampling(spec.max_new_tokens, spec.sampling_temperature, spec.top_p, 1, seed)
    ids = {i: prompt_ids(gen, problems[i], spec.prompt_format) for i in sorted({i for i, _ in items})}
    order = sorted(range(len(items)), key=lambda j: len(ids[items[j][0]]))  # similar lengths batch together
    stops = sorted({s for i in ids for s in stop_strings(problems[i], spec.prompt_format)})
    extra = {"stop_strings": stops, "tokenizer": gen.tokenizer} if stops else {}
    if synced:
        extra["synced_gpus"] = True
    placeholder = [gen.tokenizer.eos_token_id]
    out = [None] * len(items)
    torch.manual_seed(seed)
    for b in range(batches):
        chunk = order[b * spec.batch_size:(b + 1) * spec.batch_size]
        with autocast():
            new = generate_ids(gen, [ids[items[j][0]] for j in chunk] or [placeholder], sampling, use_cache=True,
                               **extra)
        for j, tokens in zip(chunk, new):
            out[j] = gen.tokenizer.decode(tokens, skip_special_tokens=True)
        if progress is not None and chunk:
            progress(len(chunk))
    return out


def sandbox_limits(spec) -> Limits:
    return Limits(wall_seconds=float(spec.timeout), cpu_seconds=max(1, math.ceil(spec.timeout / 2)),
                  memory_mb=spec.memory_mb)


def evaluate_benchmark(gen, problems: list, spec, *, seed: int, rank: int = 0, world_size: int = 1,
                       gather=None, autocast=contextlib.nullcontext, progress=None, root=None,
                       workers=None) -> BenchmarkResult:
    """pass@k of the model of `gen` on `problems` (see the module docstring). gather(obj) -> [obj of
    every rank] when world_size > 1 (mftcore.parallel.comm.gather_objects); root: the module an engine
    wrapped (FSDP2's root is unsharded while generating); workers: the sandbox pool's size when the
    spec leaves it to us (default: the CPU count)."""
    everything = [(i, s) for i in range(len(problems)) for s in range(spec.n)]
    mine = everything[rank::world_size]
    per_rank = math.ceil(len(everything) / world_size)
    batches = math.ceil(per_rank / spec.batch_size)
    model = gen.model
    was_training = model.training
    model.eval()
    try:
        with unsharded(root):
            texts = generate_completions(gen, problems, spec, mine, seed=seed + rank, synced=world_size > 1,
                                         batches=batches, autocast=autocast, progress=progress)
    finally:
        model.train(was_training)
    jobs = [(program_of(problems[i], text, spec.prompt_format), problems[i].tests) for (i, _), text in
            zip(mine, texts)]
    pool = SandboxPool(workers=spec.workers or workers, limits=sandbox_limits(spec))
    outcomes = pool.run(jobs) if jobs else []
    rows = [(i, s, text, o.passed, o.error, o.capabilities) for (i, s), text, o in zip(mine, texts, outcomes)]
    if world_size > 1:
        rows = [row for part in gather(rows) for row in part]
    rows.sort()
    result = BenchmarkResult(spec.name, list(spec.k), capabilities=rows[0][5] if rows else ())
    for i, p in enumerate(problems):
        own = [r for r in rows if r[0] == i]
        result.problems.append(ProblemResult(p.task_id, p.tag, [r[2] for r in own], [r[3] for r in own],
                                             [r[4] for r in own]))
    return result


@contextlib.contextmanager
def unsharded(root):
    """FSDP2 keeps the root module's own parameters (embeddings, final norm, LM head) sharded between
    forwards of the whole module; generation calls the HF model inside it, so gather them for its duration."""
    if root is None or not (hasattr(root, "unshard") and hasattr(root, "reshard")):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()
