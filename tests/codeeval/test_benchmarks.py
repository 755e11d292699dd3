"""Reading benchmarks: HumanEval and MBPP records (full and sanitized MBPP), from JSONL or a Hugging Face
dataset, with one-line errors; and that the team's sample problems pass with their canonical solutions."""

import json
import os

import pytest

from mftcore.codeeval.benchmarks import read_benchmark
from mftcore.errors import DataError
from mftcore.sandbox import run_program
from tests.helpers.paths import ROOT

HUMANEVAL = os.path.join(ROOT, "examples", "benchmarks", "humaneval_tiny.jsonl")
MBPP = os.path.join(ROOT, "examples", "benchmarks", "mbpp_tiny.jsonl")


def records(path):
    return [json.loads(line) for line in open(path)]


def test_humaneval_and_mbpp_records():
    he = read_benchmark(HUMANEVAL)
    assert [p.task_id for p in he] == ["mft/0", "mft/1", "mft/2", "mft/3"] and he[0].kind == "humaneval"
    assert he[0].entry_point == "add" and he[0].tests.endswith("check(add)\n") and he[0].tag == "python_funcs"
    mb = read_benchmark(MBPP, tag="mbpp")
    assert [p.task_id for p in mb] == ["1", "2", "3"] and mb[0].kind == "mbpp"
    assert mb[0].entry_point == "max_of_three" and mb[0].examples[0] == "assert max_of_three(1, 2, 3) == 3"
    assert [p.tag for p in mb] == ["mbpp", "mbpp", "shell_commands"]  # a record's own tag wins
    assert len(read_benchmark(HUMANEVAL, limit=2)) == 2


def test_the_sample_problems_pass_with_their_reference_solutions():
    for problem, record in zip(read_benchmark(HUMANEVAL), records(HUMANEVAL)):
        assert run_program(problem.text + record["canonical_solution"], problem.tests).passed, problem.task_id
        assert not run_program(problem.text + "    return None\n", problem.tests).passed
    for problem, record in zip(read_benchmark(MBPP), records(MBPP)):
        assert run_program(record["code"], problem.tests).passed, problem.task_id


def test_sanitized_mbpp_and_setup_code(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({"task_id": 7, "prompt": "Sum a list.", "test_imports": ["import math"],
                                "test_list": ["assert math.isclose(total([1.5, 2.5]), 4.0)"]}) + "\n" +
                    json.dumps({"task_id": 8, "text": "Double.", "test_setup_code": "K = 2",
                                "test_list": ["assert double(3) == 3 * K"]}) + "\n")
    first, second = read_benchmark(str(path))
    assert first.tests.startswith("import math\n") and first.entry_point == "total"
    assert run_program("def total(xs):\n    return sum(xs)\n", first.tests).passed
    assert run_program("def double(x):\n    return 2 * x\n", second.tests).passed


@pytest.mark.parametrize("line, message", [
    ("{oops", "invalid JSON"),
    ('{"task_id": "x", "prompt": "def f():", "test": "", "entry_point": "f"}', "'test' must be a non-empty string"),
    ('{"text": "t", "test_list": []}', "'test_list' must be a non-empty list"),
    ('{"question": "q"}', "neither a HumanEval record"),
    ('[1, 2]', "each line must be a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "b.jsonl"
    path.write_text(open(HUMANEVAL).readline() + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        read_benchmark(str(path))
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_missing_duplicate_and_empty(tmp_path):
    with pytest.raises(DataError, match="benchmark file not found"):
        read_benchmark(str(tmp_path / "nowhere.jsonl"))
    dup = tmp_path / "dup.jsonl"
    dup.write_text(open(HUMANEVAL).readline() * 2)
    with pytest.raises(DataError, match="task_id 'mft/0' appears twice"):
        read_benchmark(str(dup))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no problems"):
        read_benchmark(str(tmp_path / "empty.jsonl"))


def test_hugging_face_dataset(tmp_path):
    """hf:NAME goes through datasets.load_dataset; a local dataset directory (parquet, as the Hub stores
    openai_humaneval) stands in for the Hub, which the tests cannot reach."""
    import datasets

    folder = tmp_path / "openai_humaneval"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(records(HUMANEVAL)).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    problems = read_benchmark(f"hf:{folder}")
    assert [p.task_id for p in problems] == [p.task_id for p in read_benchmark(HUMANEVAL)]
    assert problems[1].tests == read_benchmark(HUMANEVAL)[1].tests
    with pytest.raises(DataError, match="could not load split 'validation'"):
        read_benchmark(f"hf:{folder}", split="validation")
