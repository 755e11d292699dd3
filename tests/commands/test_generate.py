"""`mftcore generate`: batched left-padded generation, training-format prompts, JSONL, streaming, adapters."""

import json
import os
import shutil

import pytest
import torch

from mftcore.cli import main
from mftcore.commands.generate import Sampling, generate_records, load_generator, prompt_ids
from mftcore.data.render import render_record, tokenize_segments
from tests.helpers.tiny_models import save_tiny_llama

MARKERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
PROMPTS = [
    {"prompt": "How do I count the lines in app.log?"},
    {"prompt": "Write a SQL query that returns all users.", "system": "Answer with SQL only."},
    {"prompt": "x"},
    {"chat_rounds": [{"role": "human", "content": "List files."}, {"role": "bot", "content": "ls"},
                     {"role": "human", "content": "Sorted by size, largest first, including hidden ones?"}]},
    {"messages": [{"role": "user", "content": "def add(a, b):"}]},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = save_tiny_llama(str(tmp_path_factory.mktemp("model")), tokenizer, seed=3)
    with open(os.path.join(path, "mftcore_config.json"), "w") as f:
        json.dump({"role_markers": MARKERS}, f)
    return path


def write_prompts(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_batched_left_padding_gives_the_one_by_one_answers(model_dir):
    gen = load_generator(model_dir)
    sampling = Sampling(max_new_tokens=6)
    one_by_one = generate_records(gen, PROMPTS, sampling, batch_size=1)
    batched = generate_records(gen, PROMPTS, sampling, batch_size=4)
    assert [r["output"] for r in batched] == [r["output"] for r in one_by_one]
    assert [{k: v for k, v in r.items() if k != "output"} for r in batched] == PROMPTS
    assert sum(bool(r["output"]) for r in batched) >= 3


def test_prompt_tokens_are_the_training_tokens_with_the_saved_markers(model_dir, tokenizer):
    gen = load_generator(model_dir)
    assert gen.markers == MARKERS
    rounds = [{"role": "system", "content": "s"}, {"role": "human", "content": "q"}, {"role": "bot", "content": "a"}]
    ids, mask = tokenize_segments(render_record({"chat_rounds": rounds}, MARKERS), tokenizer, tokenizer.eos_token_id)
    assert prompt_ids(gen, {"prompt": "q", "system": "s"}) == ids[:mask.index(1)]
    assert tokenizer.decode(prompt_ids(gen, {"prompt": "q"})) == "### Instruction:\nq\n### Response:\n"


def test_file_to_jsonl_and_stdout(model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:3])
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--model", model_dir, "--file", prompts, "--batch_size", "2", "--max_new_tokens", "4"]
    assert main(args + ["--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [p["prompt"] for p in PROMPTS[:3]]
    assert all(isinstance(r["output"], str) for r in records)
    capsys.readouterr()
    assert main(args) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records


def test_single_prompt_streams_the_answer(model_dir, tmp_path, capsys):
    expected = generate_records(load_generator(model_dir), PROMPTS[:1], Sampling(max_new_tokens=8))[0]["output"]
    out = tmp_path / "one.jsonl"
    assert main(["generate", "--model", model_dir, "--prompt", PROMPTS[0]["prompt"], "--max_new_tokens", "8",
                 "--output", str(out)]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert json.loads(out.read_text()) == {**PROMPTS[0], "output": expected}


def test_sampling_and_beam_search(model_dir, capsys):
    base = ["generate", "--model", model_dir, "--prompt", "hello", "--max_new_tokens", "8"]
    outputs = []
    for extra in (["--temperature", "1.5", "--top_p", "0.9", "--seed", "7"],
                  ["--temperature", "1.5", "--top_p", "0.9", "--seed", "7"],
                  ["--temperature", "1.5", "--top_p", "0.9", "--seed", "8"],
                  ["--num_beams", "3"], ["--greedy", "--temperature", "1.5"], []):
        assert main(base + extra) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]  # seeded sampling repeats; another seed differs
    assert outputs[4] == outputs[5]  # --greedy wins over --temperature
    assert main(base + ["--num_beams", "2", "--temperature", "0.5"]) == 2
    assert "beam search is deterministic" in capsys.readouterr().err


def test_adapter_generates_what_the_merged_model_generates(model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    shutil.copy(os.path.join(model_dir, "mftcore_config.json"), adapter)
    merged = str(tmp_path / "merged")
    assert main(["merge", "--base", model_dir, "--adapter", adapter, "--out", merged]) == 0

    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    capsys.readouterr()
    args = ["generate", "--model", model_dir, "--adapter", adapter, "--file", prompts, "--max_new_tokens", "6"]
    assert main(args) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", "--model", merged, "--file", prompts, "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out == with_adapter
    assert main(["generate", "--model", model_dir, "--file", prompts, "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out != with_adapter


@pytest.mark.parametrize("line, message", [
    ('{"prompt": 3}', "expected a string 'prompt'"),
    ('{"chat_rounds": [{"role": "bot", "content": "a"}, {"role": "human", "content": "q"}]}', "alternate"),
    ("{oops", "invalid JSON"),
])
def test_bad_prompt_line_names_file_and_line(model_dir, tmp_path, capsys, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    assert main(["generate", "--model", model_dir, "--file", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mftcore: error: {path}:2: ") and message in err[0], err


def test_model_directory_without_tokenizer_or_fitting_adapter(model_dir, tmp_path, capsys, tokenizer):
    from tests.helpers.tiny_models import build_tiny

    weights_only = str(tmp_path / "checkpoint-5")
    build_tiny("llama", len(tokenizer)).save_pretrained(weights_only)
    assert main(["generate", "--model", weights_only, "--prompt", "hi"]) == 2
    assert "no tokenizer_config.json beside the weights" in capsys.readouterr().err

    from peft import LoraConfig, get_peft_model

    other = build_tiny("qwen2", len(tokenizer))
    other.config.hidden_size = 32
    adapter = str(tmp_path / "adapter")
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_config(other.config), LoraConfig(r=2, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    assert main(["generate", "--model", model_dir, "--adapter", adapter, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the base model" in err[0], err
