"""Prompts in each format, and completions turned into programs."""

import os

from mftcore.codeeval.benchmarks import read_benchmark
from mftcore.codeeval.prompts import extract_code, program_of, prompt_ids, render_instruction, truncate_at_stops
from mftcore.commands.generate import Generator
from mftcore.data.render import DEFAULT_ROLE_MARKERS, render_record, tokenize_segments
from mftcore.sandbox import run_program
from tests.helpers.paths import ROOT

HE = read_benchmark(os.path.join(ROOT, "examples", "benchmarks", "humaneval_tiny.jsonl"))
MBPP = read_benchmark(os.path.join(ROOT, "examples", "benchmarks", "mbpp_tiny.jsonl"))
MARKERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}


def test_training_format_prompt_is_the_training_tokens(tokenizer):
    gen = Generator(None, tokenizer, MARKERS, None)
    rounds = [{"role": "human", "content": render_instruction(HE[2])}, {"role": "bot", "content": "x"}]
    ids, mask = tokenize_segments(render_record({"chat_rounds": rounds}, MARKERS), tokenizer, tokenizer.eos_token_id)
    assert prompt_ids(gen, HE[2], "training") == ids[:mask.index(1)]
    text = tokenizer.decode(prompt_ids(gen, MBPP[0], "training"))
    assert text.startswith("### Instruction:\nWrite a function to return the largest of three numbers.\n")
    assert "assert max_of_three(3, 2, 1) == 3" in text and text.endswith("### Response:\n")
    default = Generator(None, tokenizer, DEFAULT_ROLE_MARKERS, None)
    assert tokenizer.decode(prompt_ids(default, HE[0], "training")).startswith("<s>human\nComplete the following")


def test_raw_prompt_is_the_code_prompt(tokenizer):
    gen = Generator(None, tokenizer, MARKERS, None)
    assert prompt_ids(gen, HE[0], "raw") == tokenizer(HE[0].text, add_special_tokens=True)["input_ids"]
    assert tokenizer.decode(prompt_ids(gen, MBPP[1], "raw"), skip_special_tokens=True) == (
        '"""\nWrite a function to count the vowels in a string.\nassert count_vowels(\'hello\') == 2\n"""\n')


def test_programs_of_chat_answers():
    body = "    return a + b\n"
    whole = "Here it is:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\nDone."
    for answer in (body, f"```python\n{body}```", whole, "```py\ndef add(a, b):\n    return a + b\n"):
        program = program_of(HE[0], answer, "training")
        assert run_program(program, HE[0].tests).passed, program
    # A whole function keeps the prompt's imports (typing's List here).
    program = program_of(HE[2], "```python\ndef reverse_words(words: List[str]) -> List[str]:\n"
                                "    return words[::-1]\n```", "training")
    assert program.startswith("from typing import List\n") and run_program(program, HE[2].tests).passed
    assert run_program(program_of(MBPP[0], "```python\ndef max_of_three(a, b, c):\n    return max(a, b, c)\n```",
                                  "training"), MBPP[0].tests).passed
    assert extract_code("no code here") == "no code here"


def test_programs_of_raw_completions_stop_at_the_next_statement():
    completion = "    return a + b\n\n\ndef unrelated():\n    raise SystemExit\nprint('x')\n"
    program = program_of(HE[0], completion, "raw")
    assert program == HE[0].text + "    return a + b\n\n" and run_program(program, HE[0].tests).passed
    mbpp = "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())\nassert count_vowels('a') == 0\n"
    assert run_program(program_of(MBPP[1], mbpp, "raw"), MBPP[1].tests).passed
    assert truncate_at_stops("abc\n#x", ["\n#", "\nprint"]) == "abc"
