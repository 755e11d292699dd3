"""Prompts and programs: what a model is shown for a Problem, and how its completion becomes the program
the sandbox runs before the tests.

Every prompt goes through `prompt_ids`, whose formats are the rows of PROMPT_FORMATS:
- "training": the instruction as the user turn of the model's training format (the role markers it
  was trained with, saved beside it: commands/generate.py tokenizes it exactly as training did); the
  answer's first fenced code block (or all of it) is the code.
- "raw": for completion models: HumanEval's code prompt, or MBPP's description and first assert as a
  docstring, tokenized with the tokenizer's special tokens (a BOS where it has one); generation stops
  at the first top-level statement after the function (STOP_STRINGS).
A new format (a model's own chat template) is one more row and one more branch of `prompt_ids`.
"""

from __future__ import annotations

import re

PROMPT_FORMATS = ("training", "raw")

# HumanEval's stop sequences (Chen et al. 2021); MBPP's from bigcode-evaluation-harness.
STOP_STRINGS = {
    "humaneval": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
    "mbpp": ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```"],
}
FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def render_instruction(problem) -> str:
    """The user turn of the chat formats."""
    if problem.kind == "humaneval":
        return f"Complete the following Python function.\n```python\n{problem.text.rstrip()}\n```"
    tests = "\n".join(problem.examples)
    return f"{problem.text.strip()}\nYour code should pass these tests:\n\n{tests}"


def render_raw_prompt(problem) -> str:
    if problem.kind == "humaneval":
        return problem.text
    return f'"""\n{problem.text.strip()}\n{problem.examples[0]}\n"""\n'


def prompt_ids(gen, problem, prompt_format: str) -> list:
    """Token ids of the prompt for `problem` in `prompt_format` (one of PROMPT_FORMATS)."""
    if prompt_format == "raw":
        return gen.tokenizer(render_raw_prompt(problem), add_special_tokens=True)["input_ids"]
    if prompt_format == "training":
        from mftcore.commands.generate import prompt_ids as training_prompt_ids

        return training_prompt_ids(gen, {"prompt": render_instruction(problem)})
    raise ValueError(f"unknown prompt format {prompt_format!r}")


def stop_strings(problem, prompt_format: str) -> list:
    """Strings that end a completion early (None: EOS alone ends it)."""
    return STOP_STRINGS[problem.kind] if prompt_format == "raw" else []


def truncate_at_stops(text: str, stops: list) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def extract_code(answer: str) -> str:
    """The first fenced code block of a chat answer (an unclosed fence runs to the end), else the answer."""
    m = FENCE.search(answer)
    return m.group(1) if m else answer


def imports_of(code: str) -> str:
    """The import lines of a HumanEval prompt, which a model's whole-function answer tends to drop."""
    return "".join(line + "\n" for line in code.splitlines() if re.match(r"(from\s+\S+\s+)?import\s", line))


def program_of(problem, completion: str, prompt_format: str) -> str:
    """The program that the tests run after: prompt + continuation, or the answer's own code."""
    if prompt_format == "raw":
        body = truncate_at_stops(completion, stop_strings(problem, prompt_format))
        return problem.text + body if problem.kind == "humaneval" else body
    code = extract_code(completion)
    if problem.kind == "mbpp":
        return code
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M):
        return imports_of(problem.text) + code  # the answer repeats the whole function
    return problem.text + code  # the answer continues the body
