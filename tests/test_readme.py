"""The README's merge / generate / MFTCoder-flags examples run as written, and its family table is the code's."""

import json
import os
import re
import shlex

import torch

from mftcore.cli import main
from mftcore.model.families import FAMILIES
from tests.helpers.paths import ROOT
from tests.helpers.tiny_models import save_tiny_llama

with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    README = f.read()


def blocks_after(marker: str) -> list:
    """The fenced code blocks that directly follow `<!-- marker -->` lines."""
    return re.findall(rf"<!-- {marker} -->\n```\w*\n(.*?)```", README, flags=re.S)


def make_workspace(root, tokenizer):
    """What the README's commands expect: a base model, a LoRA adapter (made by peft), prompts.jsonl."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    os.symlink(os.path.join(ROOT, "configs"), root / "configs")
    os.symlink(os.path.join(ROOT, "examples"), root / "examples")
    base = save_tiny_llama(str(root / "models" / "base"), tokenizer)
    torch.manual_seed(0)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(root / "output" / "lora" / "final")
    (root / "prompts.jsonl").write_text(
        '{"prompt": "Count the lines in app.log."}\n'
        '{"prompt": "Count the users.", "system": "Answer with SQL only."}\n'
        '{"chat_rounds": [{"role": "human", "content": "List files."}, {"role": "bot", "content": "ls"},'
        ' {"role": "human", "content": "Sorted by size?"}]}\n')


def test_readme_commands_run_as_written(tmp_path, tokenizer, monkeypatch):
    commands = [line.strip() for block in blocks_after("cli-example") for line in block.splitlines()
                if line.strip().startswith("mftcore ")]
    assert {c.split()[1] for c in commands} == {"merge", "generate", "train"} and len(commands) >= 7
    make_workspace(tmp_path, tokenizer)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[0] == "train":  # the same run, cut to two steps for the test
            argv += ["max_train_steps=2", "seq_length=256"]
        assert main(argv) == 0, command

    assert os.path.isfile("output/merged/model.safetensors")
    answers = [json.loads(line) for line in open("answers.jsonl")]
    assert len(answers) == 3 and all("output" in a for a in answers)
    with open("output/full/final/mftcore_config.json") as f:
        saved = json.load(f)
    assert saved["per_device_train_batch_size"] == 2 and len(saved["data_paths"]) == 2
    assert os.listdir("output/full/tensorboard")

    for block in blocks_after("py-example"):
        exec(compile(block, "README.md", "exec"), {})


def test_readme_family_table_is_the_code_table():
    rows = {}
    for line in README.splitlines():
        cells = [c.strip().strip("`").replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 5 and cells[0] in FAMILIES:
            rows[cells[0]] = cells
    assert set(rows) == set(FAMILIES)
    for name, (_, hf_types, eos, targets, layer) in rows.items():
        family = FAMILIES[name]
        assert (hf_types, eos, targets, layer) == (", ".join(family.hf_model_types), family.eos_token,
                                                    ", ".join(family.lora_targets), family.decoder_layer)


def test_where_things_are_names_files_that_exist():
    """Every path the README's map names (first column, and the files each row lists) exists."""
    section = README.split("### Where things are", 1)[1].split("\nTo add", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10
    missing = []
    for where, what in rows:
        paths = re.findall(r"`([^`]+)`", where)
        folder = paths[0] if paths[0].endswith("/") else os.path.dirname(paths[0]) + "/"
        for path in paths:  # a full path, or one relative to the row's first path's folder
            if not any(os.path.exists(os.path.join(ROOT, p)) for p in (path, folder + path)):
                missing.append(path)
        for name in re.findall(r"`([\w/]+\.py)`", what):
            if not any(os.path.exists(os.path.join(ROOT, p)) for p in (name, folder + name)):
                missing.append(folder + name)
    assert missing == []
