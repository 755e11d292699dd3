"""`mftcore eval`: the tiny model on the team's problems, end to end (generation, sandbox, pass@k, JSONL,
table), with a LoRA adapter, and one-line errors."""

import json
import os

import pytest

from mftcore.cli import main
from mftcore.sandbox import check_platform
from tests.helpers.paths import ROOT
from tests.helpers.tiny_models import save_tiny_llama

HE = os.path.join(ROOT, "examples", "benchmarks", "humaneval_tiny.jsonl")
MBPP = os.path.join(ROOT, "examples", "benchmarks", "mbpp_tiny.jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(str(tmp_path_factory.mktemp("model")), tokenizer, seed=5)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_greedy_pass_at_1_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "he.jsonl"
    assert main(["eval", model_dir, "--benchmark", HE, "--max_new_tokens", "12", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["benchmark", "problems", "samples", "pass@1"]
    assert printed[1].split()[:3] == ["humaneval_tiny", "4", "1"] and printed[2].split()[0] == "python_funcs"
    assert printed[-2] == f"sandbox: {', '.join(check_platform())}"
    records = read_jsonl(out)
    assert [r["task_id"] for r in records] == ["mft/0", "mft/1", "mft/2", "mft/3"]
    for r in records:  # a tiny random model passes nothing; every failure says why in one line
        assert len(r["completions"]) == 1 and r["passed"] == [False] and r["pass@1"] == 0.0
        assert isinstance(r["errors"][0], str) and "\n" not in r["errors"][0]
    # Greedy decoding is deterministic: the same command gives the same completions.
    again = tmp_path / "again.jsonl"
    assert main(["eval", model_dir, "--benchmark", HE, "--max_new_tokens", "12", "--output", str(again)]) == 0
    assert read_jsonl(again) == records


def test_sampled_pass_at_k_raw_prompts_and_adapter(model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = str(tmp_path / "adapter")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(adapter)
    out = tmp_path / "mbpp.jsonl"
    args = ["eval", model_dir, "--adapter", adapter, "--benchmark", MBPP, "--n", "3", "--k", "1", "3",
            "--temperature", "1.0", "--prompt_format", "raw", "--max_new_tokens", "10", "--name", "mbpp",
            "--output", str(out), "--workers", "2", "--timeout", "5"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[-2:] == ["pass@1", "pass@3"]
    records = read_jsonl(out)
    assert len(records) == 3 and all(len(r["completions"]) == 3 and "pass@3" in r for r in records)
    assert records[2]["tag"] == "shell_commands"


@pytest.mark.parametrize("extra, message", [
    (["--n", "2", "--k", "5"], "eval.k: pass@5 needs n >= 5"),
    (["--prompt_format", "raw", "--timeout", "0"], "eval.timeout: must be a number of seconds"),
])
def test_bad_flags_are_one_line(model_dir, capsys, extra, message):
    assert main(["eval", model_dir, "--benchmark", HE] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_benchmark_line_names_file_and_line(model_dir, tmp_path, capsys):
    path = tmp_path / "b.jsonl"
    path.write_text(open(HE).readline() + '{"task_id": "x"}\n')
    assert main(["eval", model_dir, "--benchmark", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mftcore: error: {path}:2: "), err


def test_a_platform_the_sandbox_refuses_is_one_line(model_dir, capsys, monkeypatch):
    from mftcore.sandbox import executor

    monkeypatch.setitem(executor.ISOLATION, "auto", ("namespaces", "cgroup", "landlock"))
    assert main(["eval", model_dir, "--benchmark", HE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sandbox: this platform cannot confine reads and writes" in err[0], err
