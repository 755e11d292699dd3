"""Code benchmarks as `Problem`s: HumanEval-format (task_id, prompt, test, entry_point) and MBPP-format
(text or prompt, test_list, test_setup_code / test_imports) records, from a local JSONL file or a
Hugging Face dataset (`hf:NAME`, `hf:NAME:CONFIG`, read through `datasets`).

A Problem holds what the model is shown and the test program that decides a completion: HumanEval's
`check(candidate)` followed by `check(entry_point)`, MBPP's setup code and asserts. How a prompt is
rendered and how a completion becomes a program is prompts.py's business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from mftcore.errors import DataError
from mftcore.io import JsonProblem, open_regular, parse_json

HF_PREFIX = "hf:"


@dataclass
class Problem:
    task_id: str
    kind: str  # "humaneval" or "mbpp"
    text: str  # HumanEval: the code prompt (signature and docstring); MBPP: the task's description
    tests: str  # the program run after the completion; it raises if the completion is wrong
    entry_point: Optional[str] = None  # the function the tests call (HumanEval; MBPP: read off its asserts)
    examples: list = field(default_factory=list)  # MBPP: the asserts, shown in the prompt as in its paper
    tag: Optional[str] = None  # the task tag pass@k is also reported by


def humaneval_problem(record: dict, tag: Optional[str]) -> Problem:
    for key in ("task_id", "prompt", "test", "entry_point"):
        if not isinstance(record.get(key), (str, int)) or (key != "task_id" and not str(record[key]).strip()):
            raise ValueError(f"HumanEval record: {key!r} must be a non-empty string")
    return Problem(str(record["task_id"]), "humaneval", record["prompt"],
                   f"{record['test']}\n\ncheck({record['entry_point']})\n", record["entry_point"], tag=tag)


def mbpp_problem(record: dict, tag: Optional[str], index: int) -> Problem:
    text = record.get("text", record.get("prompt"))
    asserts = record.get("test_list")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("MBPP record: 'text' (or 'prompt') must be a non-empty string")
    if not isinstance(asserts, list) or not asserts or not all(isinstance(a, str) for a in asserts):
        raise ValueError("MBPP record: 'test_list' must be a non-empty list of strings")
    setup = record.get("test_setup_code") or ""
    imports = record.get("test_imports") or []
    if not isinstance(setup, str) or not isinstance(imports, list):
        raise ValueError("MBPP record: 'test_setup_code' must be a string and 'test_imports' a list")
    tests = "\n".join([*imports, setup, *asserts]).strip() + "\n"
    return Problem(str(record.get("task_id", index)), "mbpp", text, tests, called_function(asserts[0]),
                   examples=list(asserts), tag=tag)


def called_function(assertion: str) -> Optional[str]:
    """The name of the first function an MBPP assert calls (`assert f(x) == y` -> "f")."""
    import ast

    try:
        tree = ast.parse(assertion)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return node.func.id
    return None


def problem_from_record(record, tag: Optional[str] = None, index: int = 0) -> Problem:
    """HumanEval or MBPP, told by its keys; a record's own "tag" (a string) wins over `tag`."""
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    own = record.get("tag")
    if own is not None and not isinstance(own, str):
        raise ValueError("'tag' must be a string")
    tag = own or tag
    if "entry_point" in record or "test" in record:
        return humaneval_problem(record, tag)
    if "test_list" in record:
        return mbpp_problem(record, tag, index)
    raise ValueError("neither a HumanEval record (task_id, prompt, test, entry_point) nor an MBPP one "
                     "(text, test_list)")


def read_jsonl(path: str, tag: Optional[str]) -> list:
    """Problems from a JSONL file, read by the guarded path and the strict JSON reader (mftcore/io.py):
    invalid UTF-8, duplicate keys or a line nested too deep are `file:line` errors."""
    problems = []
    with open_regular(path, DataError, what="benchmark file") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = parse_json(line)
            except JsonProblem as e:
                raise DataError(f"{path}:{lineno}: {e.reason}") from None
            try:
                problems.append(problem_from_record(record, tag, len(problems)))
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    return problems


def read_hf(source: str, split: Optional[str], tag: Optional[str]) -> list:
    """`hf:NAME[:CONFIG]`: a dataset of the Hub (or a local dataset directory), through `datasets`."""
    import datasets  # a core dependency; imported here because it is slow to import
    name, _, config = source[len(HF_PREFIX):].partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as e:  # datasets raises many kinds (missing, offline, bad split): one line each
        raise DataError(f"{source}: could not load split {split or 'test'!r}: {str(e).splitlines()[0]}") from None
    problems = []
    for index, record in enumerate(data):
        try:
            problems.append(problem_from_record(dict(record), tag, index))
        except ValueError as e:
            raise DataError(f"{source}[{split or 'test'}][{index}]: {e}") from None
    return problems


def read_benchmark(source: str, *, split: Optional[str] = None, tag: Optional[str] = None,
                   limit: Optional[int] = None) -> list:
    """The problems of a local JSONL file or of `hf:NAME[:CONFIG]` (split: default "test"), the first
    `limit` of them if given."""
    if source.startswith(HF_PREFIX):
        problems = read_hf(source, split, tag)
    elif os.path.isfile(source):
        problems = read_jsonl(source, tag)
    else:
        raise DataError(f"{source}: benchmark file not found (a Hugging Face dataset is written hf:NAME)")
    if not problems:
        raise DataError(f"{source}: no problems")
    seen = set()
    for p in problems:
        if p.task_id in seen:
            raise DataError(f"{source}: task_id {p.task_id!r} appears twice")
        seen.add(p.task_id)
    return problems[:limit] if limit else problems
