"""One benchmark evaluation as asked for: an entry of `eval_benchmarks` in a training config, or the
flags of `mftcore eval`. Every problem is a one-line ConfigError naming the key."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

from mftcore.codeeval.prompts import PROMPT_FORMATS
from mftcore.errors import ConfigError

RESERVED_NAMES = ("train", "valid")  # metrics.jsonl splits of their own


@dataclass
class BenchmarkSpec:
    name: str
    """Names the benchmark in metrics.jsonl, TensorBoard and metric_for_best ("NAME/pass@K")."""
    file: str
    """A HumanEval- or MBPP-format JSONL file, or hf:NAME[:CONFIG] (a Hugging Face dataset)."""
    k: list = field(default_factory=lambda: [1])
    """The k of pass@k reported (each <= n)."""
    n: int = 1
    """Samples per problem: 1 with temperature 0 is greedy pass@1."""
    max_new_tokens: int = 512
    """Longest completion in tokens."""
    every_steps: int = 0
    """During training: evaluate every this many optimizer steps and at the last one (0: at the last only)."""
    temperature: Optional[float] = None
    """Sampling temperature; null: 0 (greedy) when n is 1, else 0.8."""
    top_p: float = 0.95
    """Nucleus sampling, with temperature > 0."""
    prompt_format: str = "training"
    """"training": the user turn in the model's training format; "raw": the code prompt alone (completion models)."""
    split: Optional[str] = None
    """The split of a Hugging Face dataset (default "test")."""
    tag: Optional[str] = None
    """The task tag of problems without their own "tag" field (pass@k is also reported per tag)."""
    limit: Optional[int] = None
    """Only the first this many problems."""
    batch_size: int = 8
    """Prompts per generation batch (on each rank)."""
    timeout: float = 10.0
    """Wall-clock seconds per completion in the sandbox (CPU seconds: half of it)."""
    memory_mb: int = 1024
    """Address space per completion in the sandbox."""
    workers: int = 0
    """Completions run at once in the sandbox (0: the CPU count)."""
    seed: int = 1234
    """Sampling seed (during training: plus the step, so every evaluation draws its own samples)."""

    @property
    def sampling_temperature(self) -> float:
        return self.temperature if self.temperature is not None else (0.0 if self.n == 1 else 0.8)


def parse_spec(raw, where: str) -> BenchmarkSpec:
    """A BenchmarkSpec from a JSON object; `where` names it in errors (e.g. "eval_benchmarks[0]")."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object with name and file, got {str(raw)[:60]}")
    known = {f.name for f in fields(BenchmarkSpec)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    for key in ("name", "file"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: required, a non-empty string")
    values = dict(raw)
    if isinstance(values.get("k"), int) and not isinstance(values.get("k"), bool):
        values["k"] = [values["k"]]
    spec = BenchmarkSpec(**values)
    check_spec(spec, where)
    return spec


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_spec(spec: BenchmarkSpec, where: str) -> None:
    problems = []
    if spec.name in RESERVED_NAMES or "/" in spec.name:
        problems.append(("name", f"{spec.name!r} is reserved or holds a '/'"))
    for key in ("n", "max_new_tokens", "batch_size", "memory_mb"):
        if not is_int(getattr(spec, key)) or getattr(spec, key) < 1:
            problems.append((key, f"must be a positive integer, got {getattr(spec, key)!r}"))
    for key in ("every_steps", "workers", "seed"):
        if not is_int(getattr(spec, key)) or getattr(spec, key) < 0:
            problems.append((key, f"must be an integer >= 0, got {getattr(spec, key)!r}"))
    if not isinstance(spec.k, list) or not spec.k or not all(is_int(k) and k >= 1 for k in spec.k):
        problems.append(("k", f"must be a positive integer or a list of them, got {spec.k!r}"))
    elif is_int(spec.n) and max(spec.k) > spec.n:
        problems.append(("k", f"pass@{max(spec.k)} needs n >= {max(spec.k)} samples per problem, n is {spec.n}"))
    t = spec.temperature
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf):
        problems.append(("temperature", f"must be a number >= 0 or null, got {t!r}"))
    elif is_int(spec.n) and spec.n > 1 and spec.sampling_temperature == 0:
        problems.append(("temperature", f"n={spec.n} greedy samples would all be the same: set temperature > 0"))
    if isinstance(spec.top_p, bool) or not isinstance(spec.top_p, (int, float)) or not 0 < spec.top_p <= 1:
        problems.append(("top_p", f"must lie in (0, 1], got {spec.top_p!r}"))
    if isinstance(spec.timeout, bool) or not isinstance(spec.timeout, (int, float)) or not 0 < spec.timeout < 3600:
        problems.append(("timeout", f"must be a number of seconds in (0, 3600), got {spec.timeout!r}"))
    if spec.prompt_format not in PROMPT_FORMATS:
        problems.append(("prompt_format", f"{spec.prompt_format!r} is not supported (choose from "
                                          f"{', '.join(PROMPT_FORMATS)})"))
    for key in ("split", "tag"):
        if getattr(spec, key) is not None and not isinstance(getattr(spec, key), str):
            problems.append((key, f"must be a string or null, got {getattr(spec, key)!r}"))
    if spec.limit is not None and (not is_int(spec.limit) or spec.limit < 1):
        problems.append(("limit", f"must be a positive integer or null, got {spec.limit!r}"))
    if problems:
        key, message = problems[0]
        raise ConfigError(f"{where}.{key}: {message}")


def parse_specs(raw_list, source: str = "config") -> list:
    """The eval_benchmarks entries of a config; names must be unique."""
    if raw_list is None:
        return []
    specs = [parse_spec(raw, f"{source}: eval_benchmarks[{i}]") for i, raw in enumerate(raw_list)]
    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{source}: eval_benchmarks[{i}].name: {name!r} is used twice")
    return specs


def parse_metric(metric: Optional[str], specs: list, source: str = "config") -> Optional[tuple]:
    """metric_for_best -> None (the validation loss) or (benchmark name, "pass@K")."""
    if metric is None or metric == "loss":
        return None
    name, _, which = metric.rpartition("/")
    spec = next((s for s in specs if s.name == name), None)
    ks = [] if spec is None else spec.k
    if spec is None or which not in [f"pass@{k}" for k in ks]:
        choices = ["loss"] + [f"{s.name}/pass@{k}" for s in specs for k in s.k]
        raise ConfigError(f"{source}: metric_for_best: {metric!r} is not a metric of this run "
                          f"(choose from {', '.join(choices)})")
    return name, which
