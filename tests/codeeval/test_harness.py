"""The evaluation harness with a scripted model (its answers are chosen, so pass@k is known), split
across ranks, and its table."""

import json
import os

import pytest
import torch

from mftcore.codeeval.benchmarks import read_benchmark
from mftcore.codeeval.harness import evaluate_benchmark
from mftcore.codeeval.spec import BenchmarkSpec
from mftcore.commands.generate import Generator
from mftcore.sandbox import check_platform
from tests.helpers.paths import ROOT

HE_FILE = os.path.join(ROOT, "examples", "benchmarks", "humaneval_tiny.jsonl")
SOLUTIONS = [json.loads(line)["canonical_solution"] for line in open(HE_FILE)]


class ScriptedModel(torch.nn.Module):
    """generate() answers each prompt with the next of its scripted answers (cycling)."""

    def __init__(self, tokenizer, answers: dict):
        super().__init__()
        self.tokenizer, self.answers, self.seen, self.calls = tokenizer, answers, {}, []

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **kwargs):
        self.calls.append(kwargs)
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask) if m])
            options = next((a for key, a in self.answers.items() if key in prompt), ["pass"])
            i = self.seen[prompt] = self.seen.get(prompt, -1) + 1
            rows.append(ids + self.tokenizer(options[i % len(options)], add_special_tokens=False)["input_ids"]
                        + [eos_token_id])
        width = max(map(len, rows))
        return torch.tensor([r + [eos_token_id] * (width - len(r)) for r in rows])


def scripted(tokenizer, wrong_every=None):
    """Canonical answers for problems 0-2; problem 3 (select_all) right on one sample of two."""
    answers = {f"def {name}(": [f"```python\n{sol}```"] for name, sol in
               zip(["add", "count_lines", "reverse_words"], SOLUTIONS)}
    answers["def select_all("] = ["```python\n    return 'SELECT *'\n```", f"```python\n{SOLUTIONS[3]}```"]
    return Generator(ScriptedModel(tokenizer, answers), tokenizer, {"system": "S:", "user": "U:", "assistant": "A:"},
                     torch.device("cpu"))


def test_pass_at_k_of_known_answers(tokenizer):
    problems = read_benchmark(HE_FILE)
    spec = BenchmarkSpec(name="he", file=HE_FILE, n=2, k=[1, 2], temperature=0.5, batch_size=3)
    result = evaluate_benchmark(scripted(tokenizer), problems, spec, seed=1)
    assert [p.passed for p in result.problems] == [[True, True]] * 3 + [[False, True]]
    assert result.problems[3].errors[0] == "AssertionError" and result.problems[3].errors[1] is None
    assert result.metrics() == {"pass@1": pytest.approx(0.875), "pass@2": 1.0}
    assert result.by_tag() == {"python_funcs": {"pass@1": 1.0, "pass@2": 1.0},
                               "sql_queries": {"pass@1": 0.5, "pass@2": 1.0}}
    record = result.records()[3]
    assert record["task_id"] == "mft/3" and record["completions"][1].startswith("```python")
    assert record["pass@1"] == 0.5 and record["passed"] == [False, True]
    table = result.table().splitlines()
    assert table[0].split() == ["benchmark", "problems", "samples", "pass@1", "pass@2"]
    assert table[1].split() == ["he", "4", "2", "0.8750", "1.0000"]
    assert table[3].split() == ["sql_queries", "1", "2", "0.5000", "1.0000"]
    assert result.capabilities == check_platform()  # what the sandbox applied, passed on


def test_split_across_ranks_gives_the_one_rank_result(tokenizer):
    """Two ranks deal the 8 (problem, sample) pairs between them (rank 0 the first sample of each problem,
    rank 1 the second), make the same number of synced generate calls, and every rank gets all rows:
    the one-process result. (One scripted model serves both ranks, so rank 1, run first, draws each
    problem's first answer.)"""
    problems = read_benchmark(HE_FILE)
    spec = BenchmarkSpec(name="he", file=HE_FILE, n=2, k=[1, 2], temperature=0.5, batch_size=3)
    alone = evaluate_benchmark(scripted(tokenizer), problems, spec, seed=1)
    shared = scripted(tokenizer)
    parts, gens = {}, [Generator(shared.model, tokenizer, shared.markers, shared.device) for _ in range(2)]

    def gather_as(rank):
        def gather(rows):
            parts[rank] = rows
            return [parts.get(r, []) for r in range(2)]
        return gather

    evaluate_benchmark(gens[1], problems, spec, seed=1, rank=1, world_size=2, gather=gather_as(1))
    both = evaluate_benchmark(gens[0], problems, spec, seed=1, rank=0, world_size=2, gather=gather_as(0))
    assert [p.passed for p in both.problems] == [[True, True]] * 3 + [[True, False]]  # swapped draws
    assert both.metrics() == alone.metrics() and both.by_tag() == alone.by_tag()
    calls = shared.model.calls
    assert len(calls) == 4 and all(c.get("synced_gpus") for c in calls)  # 2 batches of 3 per rank
