"""`mftcore merge`: LoRA and QLoRA adapters made by peft, merged into one model whose tokenizer renders
the training string with the markers the adapter was trained with."""

import json
import os

import pytest
import torch

from mftcore.cli import main
from mftcore.data.render import render_prompt, render_record
from mftcore.model.families import lora_target_modules
from tests.helpers.tiny_models import build_tiny, save_tiny_llama

MARKERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
IDS = torch.tensor([[5, 17, 300, 42, 9, 77, 123, 8]])


def logits_of(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    return save_tiny_llama(str(tmp_path_factory.mktemp("base")), tokenizer)


def make_lora_adapter(base: str, path: str, markers=None) -> str:
    """A LoRA adapter made by peft directly, with non-zero B so that merging changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules("llama"),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(path)
    if markers is not None:
        with open(os.path.join(path, "mftcore_config.json"), "w") as f:
            json.dump({"role_markers": markers, "seq_length": 256}, f)
    return path


def peft_logits(base: str, adapter: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter))


def test_merge_with_mftcoder_flags_keeps_outputs_and_training_template(base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_lora_adapter(base, str(tmp_path / "adapter"), MARKERS)
    out = str(tmp_path / "merged")
    assert main(["merge", "--base_model_or_path", base, "--adaptor_path", adapter,
                 "--merged_output_path", out, "--model_type", "llama"]) == 0

    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer.json", "mftcore_config.json"} <= files
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777 == 0o666 & ~umask  # not 0600
    assert "adapter_config.json" not in files and not any(f.endswith(".bin") for f in files)
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    expected = peft_logits(base, adapter)
    torch.testing.assert_close(logits_of(merged), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits_of(AutoModelForCausalLM.from_pretrained(base)), expected, atol=1e-3)

    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "Answer in SQL."}, {"role": "user", "content": "Count users."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == render_prompt("Count users.", MARKERS, system="Answer in SQL.")
    assert prompt == "### System:\nAnswer in SQL.\n### Instruction:\nCount users.\n### Response:\n"
    conversation = messages + [{"role": "assistant", "content": "SELECT count(*) FROM users;"}]
    training = "".join(s.text + (tok.eos_token if s.eos else "")
                       for s in render_record({"chat_rounds": conversation}, MARKERS))
    assert tok.apply_chat_template(conversation, tokenize=False) == training
    with open(os.path.join(out, "mftcore_config.json")) as f:
        assert json.load(f) == {"role_markers": MARKERS, "seq_length": 256}


def test_merge_with_short_flags_and_default_markers(base, tmp_path):
    from transformers import AutoTokenizer

    adapter = make_lora_adapter(base, str(tmp_path / "adapter"))
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--dtype", "bfloat16"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "human", "content": "ls?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>human\nls?\n<s>bot\n"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_merge_qlora_adapter_trained_on_a_4bit_base(base, tmp_path):
    """An adapter trained a few steps on the nf4 double-quantised base (bitsandbytes on CPU) merges into the
    full-precision base: the merged model computes what base + adapter compute."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules("llama")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    adapter = str(tmp_path / "qlora")
    model.save_pretrained(adapter)

    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base, "--adapter", adapter, "--out", out]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    expected = peft_logits(base, adapter)
    torch.testing.assert_close(logits_of(merged), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits_of(AutoModelForCausalLM.from_pretrained(base)), expected, atol=1e-4)


def test_merge_errors_are_one_line_and_leave_nothing(base, tmp_path, capsys, tokenizer):
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    out = tmp_path / "merged"
    assert main(["merge", "--base", base, "--adapter", str(not_adapter), "--out", str(out)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err

    other = str(tmp_path / "other")
    build_tiny("qwen2", len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    wrong = make_lora_adapter(base, str(tmp_path / "adapter"))
    assert main(["merge", "--base", other, "--adapter", wrong, "--out", str(out), "--model_type", "llama"]) == 2
    assert "model_type: 'llama' expects a llama checkpoint" in capsys.readouterr().err

    tiny_other = str(tmp_path / "wider")
    model = build_tiny("llama", len(tokenizer))
    model.config.hidden_size = 32  # a different base: the adapter's shapes do not fit
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(model.config).save_pretrained(tiny_other)
    tokenizer.save_pretrained(tiny_other)
    assert main(["merge", "--base", tiny_other, "--adapter", wrong, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mftcore: error: --adapter:") and "does not fit the base model" in err[-1], err
    assert "size mismatch" in err[-1] and all(line.startswith(("loading", "merging")) for line in err[:-1]), err
    assert main(["merge", "--base", base, "--adapter", wrong, "--out", base]) == 2
    assert "would destroy that input" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


@pytest.mark.parametrize("markers", [
    {"system": "<s>system\n", "user": "<s>human\n", "assistant": "<s>bot\n"},
    {"system": "{% raw %}S'\"}}:\n", "user": "### Q 😀\n", "assistant": "{{ A }}\n"},  # cannot escape the literal
])
def test_chat_template_renders_every_training_string(markers):
    from transformers import AutoTokenizer

    from mftcore.model.chat_template import build_chat_template
    from tests.helpers.tiny_models import TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)  # not the session fixture: this test sets its template
    tokenizer.chat_template = build_chat_template(markers)
    conversation = [{"role": "system", "content": "be\u202fbrief\xa0"}, {"role": "human", "content": "q1"},
                    {"role": "gpt", "content": "a1"}, {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a2\n"}]
    for end in (2, 3, 5):
        rounds = conversation[:end]
        training = "".join(s.text + (tokenizer.eos_token if s.eos else "")
                           for s in render_record({"chat_rounds": rounds}, markers))
        rendered = tokenizer.apply_chat_template(rounds, tokenize=False, add_generation_prompt=False)
        if rounds[-1]["role"] in ("human", "user"):  # the training segment ends with the assistant marker
            rendered = tokenizer.apply_chat_template(rounds, tokenize=False, add_generation_prompt=True)
        assert rendered == training
    for bad, message in (([{"role": "bot", "content": "a"}], "alternate"),
                         ([{"role": "human", "content": "q"}, {"role": "robot", "content": "a"}], "unknown role"),
                         ([{"role": "human", "content": "q"}, {"role": "system", "content": "s"}], "first")):
        with pytest.raises(Exception, match=message):
            tokenizer.apply_chat_template(bad, tokenize=False)
