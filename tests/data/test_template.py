"""chat_template "model": the tokenizer's own template renders each conversation; the loss is on the
assistant turns and the template's end-of-turn token, exactly. The oracle is each format's published
layout (what the trained pieces must decode to), independent of how mftcore finds the spans."""

import json
import os
import shutil

import pytest
from transformers import AutoTokenizer

from mftcore.config import TrainConfig
from mftcore.data import load_tasks
from mftcore.data.template import ChatTemplate, TemplateText, tokenize_template_texts
from mftcore.errors import ConfigError
from tests.helpers.paths import ROOT, TOKENIZER

FORMATS = os.path.join(ROOT, "examples", "tokenizers")
SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "Write f.", "def f(x):\n    return x", "And g?", "  def g():\n    pass\n"
# What each format trains for an assistant turn of content c: the published layouts.
TRAINED = {
    "chatml": lambda c: c + "<|im_end|>",
    "llama3": lambda c: c.strip() + "<|eot_id|>",
    "mistral": lambda c: " " + c.strip() + "</s>",
    "deepseek_coder": lambda c: "\n" + c + "\n<|EOT|>",
}
REASONING_CHATML = (  # Qwen3 / DeepSeek-R1 style: earlier assistant turns lose their <think> part
    "{%- for m in messages -%}"
    "{%- set c = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and not loop.last -%}{%- set c = c.split('</think>')[-1] | trim -%}{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
MARKED_CHATML = (  # with {% generation %} markers around what the assistant writes
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ m['content'] + '<|im_end|>' }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


def tok(name):
    return AutoTokenizer.from_pretrained(os.path.join(FORMATS, name))


def chat(*turns, system=None):
    rounds = ([{"role": "system", "content": system}] if system else [])
    rounds += [{"role": "human" if k % 2 == 0 else "bot", "content": t} for k, t in enumerate(turns)]
    return {"chat_rounds": rounds}


def messages_of(record):
    roles = {"human": "user", "bot": "assistant", "system": "system"}
    return [{"role": roles[r["role"]], "content": r["content"]} for r in record["chat_rounds"]]


def encode(tmp_path, tokenizer_dir, records, **updates):
    """(ids, mask) of every sample prepared from `records` with chat_template "model"."""
    data_dir = tmp_path / "data" / "t"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = TrainConfig.from_dict({"data_paths": [str(data_dir)], "tokenizer_path": str(tokenizer_dir),
                                 "model_config": {"model_type": "llama"}, "seq_length": 512, "data_split": "1,0,0",
                                 "output_dir": str(tmp_path / "out"), "tokenize_workers": 1, "chat_template": "model",
                                 "shuffle_before_split": False, **updates})
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    store = load_tasks(cfg, tokenizer, tokenizer.eos_token_id, progress=False).train.store
    return tokenizer, [(store.sample(i)[0].tolist(), store.sample(i)[1].tolist()) for i in range(len(store))]


def trained_runs(tokenizer, ids, mask):
    """The decoded runs of trained tokens, in order."""
    runs, current = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(t)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    return runs


@pytest.mark.parametrize("fmt", ["chatml", "llama3", "deepseek_coder"])
@pytest.mark.parametrize("system", [SYSTEM, None])
def test_prefix_consistent_formats_train_exactly_the_assistant_turns(tmp_path, fmt, system):
    """System prompt or none (chatml and deepseek_coder then insert their default one), two turns: one
    sample, the ids apply_chat_template gives, and the trained runs are each answer as the format writes it
    plus its end-of-turn token."""
    record = chat(Q1, A1, Q2, A2, system=system)
    tokenizer, samples = encode(tmp_path, os.path.join(FORMATS, fmt), [record])
    assert len(samples) == 1
    ids, mask = samples[0]
    assert ids == tokenizer.apply_chat_template(messages_of(record), tokenize=True, return_dict=False)
    assert trained_runs(tokenizer, ids, mask) == [TRAINED[fmt](A1), TRAINED[fmt](A2)]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if system is None and fmt in ("chatml", "deepseek_coder"):  # the template's default system prompt
        assert ("You are a helpful assistant." if fmt == "chatml" else "You are an AI programming assistant") in text


def test_a_template_that_moves_the_system_prompt_gives_one_sample_per_turn(tmp_path):
    """Mistral v0.3 puts the system prompt before the last user turn: not prefix-consistent, so each
    assistant turn is trained in the rendering where it is the last one (as at inference)."""
    record = chat(Q1, A1, Q2, A2, system=SYSTEM)
    tokenizer, samples = encode(tmp_path, os.path.join(FORMATS, "mistral"), [record])
    assert len(samples) == 2
    msgs = messages_of(record)
    for (ids, mask), upto, answer in zip(samples, (3, 5), (A1, A2)):
        assert ids == tokenizer.apply_chat_template(msgs[:upto], tokenize=True, return_dict=False)
        assert trained_runs(tokenizer, ids, mask) == [TRAINED["mistral"](answer)]
    one_turn = encode(tmp_path / "b", os.path.join(FORMATS, "mistral"), [chat(Q1, A1)])[1]
    assert len(one_turn) == 1  # without a system prompt the template is prefix-consistent


def write_tokenizer(tmp_path, template, post_processor=None):
    out = tmp_path / "tok"
    shutil.copytree(os.path.join(FORMATS, "chatml"), out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if post_processor is not None:
        tok_json = json.loads((out / "tokenizer.json").read_text())
        tok_json["post_processor"] = post_processor
        (out / "tokenizer.json").write_text(json.dumps(tok_json))
    return out


def test_a_template_that_strips_earlier_reasoning(tmp_path):
    """Earlier turns lose their <think> part once a later turn exists: one sample per assistant turn, each
    trained on its own turn with its reasoning, the earlier ones present (stripped) as context only."""
    a1, a2 = "<think>x is x</think>def f(x):\n    return x", "<think>g is empty</think>def g(): pass"
    tokenizer, samples = encode(tmp_path, write_tokenizer(tmp_path, REASONING_CHATML), [chat(Q1, a1, Q2, a2)])
    assert [trained_runs(tokenizer, *s) for s in samples] == [[a1 + "<|im_end|>"], [a2 + "<|im_end|>"]]
    second = tokenizer.decode(samples[1][0], skip_special_tokens=False)
    assert "x is x" not in second and "def f(x):\n    return x<|im_end|>" in second


def test_generation_markers_are_the_spans_and_match_transformers_mask(tmp_path):
    record = chat(Q1, A1, Q2, A2, system=SYSTEM)
    tokenizer, samples = encode(tmp_path, write_tokenizer(tmp_path, MARKED_CHATML), [record])
    (ids, mask), = samples
    hf = tokenizer.apply_chat_template(messages_of(record), tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
    assert ids == hf["input_ids"] and mask == hf["assistant_masks"]
    assert trained_runs(tokenizer, ids, mask) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]


def test_offsets_are_not_trimmed(tmp_path):
    """A ByteLevel post-processor that trims offsets would leave whitespace-only tokens (indentation) with
    empty spans; the mask is computed without it, and the ids are unchanged."""
    trim = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer, samples = encode(tmp_path, write_tokenizer(tmp_path, json.loads(
        (open(os.path.join(FORMATS, "chatml", "tokenizer_config.json")).read()))["chat_template"], trim),
        [chat(Q1, "x = 1\n\n        y = 2")])
    (ids, mask), = samples
    assert trained_runs(tokenizer, ids, mask) == ["x = 1\n\n        y = 2<|im_end|>"]


def test_templates_render_as_transformers_and_name_their_end_of_turn():
    msgs = messages_of(chat(Q1, A1, Q2, A2, system=SYSTEM))
    for fmt, eot in [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("mistral", "</s>"),
                     ("deepseek_coder", "<|EOT|>")]:
        tokenizer = tok(fmt)
        template = ChatTemplate(tokenizer)
        assert template.render(msgs) == tokenizer.apply_chat_template(msgs, tokenize=False)
        assert template.render(msgs[:2], generation_prompt=True) == tokenizer.apply_chat_template(
            msgs[:2], tokenize=False, add_generation_prompt=True)
        assert template.end_of_turn_tokens() == [eot]


def test_not_prefix_consistent_even_at_the_last_turn_is_an_error(tmp_path):
    odd = ("{%- for m in messages -%}{{ '<|im_start|>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
           " + m['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
           "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
    tokenizer = AutoTokenizer.from_pretrained(write_tokenizer(tmp_path, odd))
    with pytest.raises(ValueError, match="not prefix-consistent: adding assistant turn 1 changes"):
        ChatTemplate(tokenizer).samples(messages_of(chat(Q1, A1)))


def test_without_a_chat_template_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^chat_template: chat_template \"model\": the tokenizer has no chat "
                                          "template"):
        encode(tmp_path, TOKENIZER, [chat(Q1, A1)])


def test_single_turn_and_alpaca_records_use_the_template_and_text_stays_text(tmp_path):
    records = [{"prompt": Q1, "answer": A1, "system": SYSTEM}, {"instruction": "Do", "input": "it", "output": A2},
               {"text": "plain code"}]
    tokenizer, samples = encode(tmp_path, os.path.join(FORMATS, "chatml"), records)
    assert trained_runs(tokenizer, *samples[0]) == [A1 + "<|im_end|>"]
    assert "<|im_start|>user\nDo\n\nit<|im_end|>" in tokenizer.decode(samples[1][0], skip_special_tokens=False)
    assert trained_runs(tokenizer, *samples[2]) == ["plain code\n<|im_end|>"]  # MFTCoder's text + EOS


def test_fallback_without_offsets_splits_at_the_spans():
    """A tokenizer without a Rust backend: the text is cut at the span boundaries (documented rule)."""
    tokenizer = tok("chatml")

    class Slow:  # what tokenize_template_texts needs of a tokenizer that has no offsets
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [tokenizer.encode(t, add_special_tokens=False) for t in texts]}

    text = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nab<|im_end|>\n"
    start = text.index("ab")
    (ids, mask), = tokenize_template_texts(Slow(), [TemplateText(text, ((start, start + 12),))])
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "ab<|im_end|>"


def test_prepare_show_marks_the_trained_spans(tmp_path, capsys):
    from mftcore.cli import main

    data = tmp_path / "t"
    data.mkdir()
    (data / "x.jsonl").write_text(json.dumps(chat(Q1, A1, system=SYSTEM)) + "\n")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"data_paths": [str(data)], "tokenizer_path": os.path.join(FORMATS, "chatml"),
                               "model_config": {"model_type": "llama"}, "output_dir": str(tmp_path / "o"),
                               "chat_template": "model"}))
    assert main(["prepare", str(cfg), "--show", "1"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["marked"] == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n"
                             f"<|im_start|>assistant\n⟦{A1}<|im_end|>⟧\n")
    assert row["text"] == row["marked"].replace("⟦", "").replace("⟧", "")
