"""`mftcore eval MODEL [--adapter A] --benchmark FILE`: pass@k of a model on a HumanEval- or MBPP-format
benchmark (a JSONL file or hf:NAME), its completions run in mftcore.sandbox.

    mftcore eval output/tiny/final --benchmark examples/benchmarks/humaneval_tiny.jsonl --n 10 --k 1 10

Writes one JSONL line per problem (completions, pass/fail per completion, each failure's last line,
pass@k) to --output, and prints the summary table (pass@k of the benchmark and of each task tag).
"""

from __future__ import annotations

import os
import sys

from mftcore.codeeval.benchmarks import read_benchmark
from mftcore.codeeval.harness import evaluate_benchmark
from mftcore.codeeval.spec import BenchmarkSpec, check_spec
from mftcore.io import atomic_write_text
from mftcore.outputs import check_output
from mftcore.sandbox import check_platform


def default_name(source: str) -> str:
    base = source.removeprefix("hf:").rstrip("/").split(":")[0]
    return os.path.splitext(os.path.basename(base))[0] or "benchmark"


def evaluate_model(model_dir: str, benchmark: str, *, adapter: str | None = None, name: str | None = None,
                   output: str | None = None, trust_remote_code: bool = False, stream=None, **options):
    """`mftcore eval`: options are BenchmarkSpec fields (n, k, temperature, prompt_format, ...).
    Returns the BenchmarkResult; the JSONL goes to `output` (default: NAME.results.jsonl)."""
    import json

    from tqdm.auto import tqdm

    from mftcore.commands.generate import load_generator

    stream = stream or sys.stdout
    spec = BenchmarkSpec(name=name or default_name(benchmark), file=benchmark,
                         **{k: v for k, v in options.items() if v is not None})
    check_spec(spec, "eval")
    output = output or f"{spec.name}.results.jsonl"
    local = benchmark if os.path.exists(benchmark) else None  # an hf: name is not a path
    check_output(output, "--output", {"benchmark": local, "model": model_dir, "adapter": adapter}, file=True)
    problems = read_benchmark(benchmark, split=spec.split, tag=spec.tag, limit=spec.limit)
    check_platform()  # a platform the sandbox refuses: one line now, before the model loads
    gen = load_generator(model_dir, adapter, trust_remote_code)
    with tqdm(total=len(problems) * spec.n, desc="generate", unit="completion") as bar:
        result = evaluate_benchmark(gen, problems, spec, seed=spec.seed, progress=bar.update)
    atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records()))
    print(result.table(), file=stream)
    print(f"sandbox: {', '.join(result.capabilities)}", file=stream)
    print(f"wrote {output}", file=stream)
    return result
