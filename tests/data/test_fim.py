"""Fill-in-the-middle on `text` samples: PSM and SPM layouts with the tokenizer's FIM tokens, loss on the
middle and EOS only, drawn by seed at tokenization time (the same on any number of workers)."""

import json
import os

import pytest
from transformers import AutoTokenizer

from mftcore.config import TrainConfig
from mftcore.data import load_tasks
from mftcore.data.render import fmt
from mftcore.errors import ConfigError
from tests.helpers.paths import ROOT, TOKENIZER

CHATML = os.path.join(ROOT, "examples", "tokenizers", "chatml")  # Qwen's <|fim_prefix|> ... tokens
DEEPSEEK = os.path.join(ROOT, "examples", "tokenizers", "deepseek_coder")
CODE = [f"def f{i}(x):\n    return x * {i} + {i * i}  # number {i}" for i in range(40)]


def prepare(tmp_path, tokenizer_dir, tasks, **updates):
    paths = []
    for name, records in tasks.items():
        d = tmp_path / "data" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(str(d))
    cfg = TrainConfig.from_dict({"data_paths": paths, "tokenizer_path": tokenizer_dir, "seq_length": 256,
                                 "model_config": {"model_type": "llama"}, "data_split": "1,0,0",
                                 "output_dir": str(tmp_path / "out"), "tokenize_workers": 1,
                                 "shuffle_before_split": False, **updates})
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    store = load_tasks(cfg, tokenizer, tokenizer.eos_token_id, progress=False).train.store
    return tokenizer, [(store.sample(i)[0].tolist(), store.sample(i)[1].tolist(), store.sample(i)[2])
                       for i in range(len(store))]


def texts(records):
    return [{"text": t} for t in records]


def fim_ids(tokenizer, names=("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")):
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def dec(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("spm", [0.0, 1.0])
def test_layout_and_loss_on_the_middle_and_eos(tmp_path, spm):
    tokenizer, samples = prepare(tmp_path, CHATML, {"code": texts(CODE)}, fim_rate=1.0, fim_spm_rate=spm)
    pre, suf, mid = fim_ids(tokenizer)
    eos = tokenizer.eos_token_id
    for (ids, mask, _), text in zip(samples, CODE):
        doc = fmt(text)
        assert ids.count(pre) == ids.count(suf) == ids.count(mid) == 1 and ids[-1] == eos
        trained = [t for t, m in zip(ids, mask) if m]
        middle = dec(tokenizer, trained[:-1])
        assert trained[-1] == eos and trained == ids[len(ids) - len(trained):]  # the middle then EOS, at the end
        if spm:  # <PRE> <SUF> suffix <MID> prefix middle <EOS>
            assert ids[:2] == [pre, suf]
            suffix = dec(tokenizer, ids[2:ids.index(mid)])
            prefix = dec(tokenizer, ids[ids.index(mid) + 1:len(ids) - len(trained)])
        else:  # <PRE> prefix <SUF> suffix <MID> middle <EOS>
            assert ids[0] == pre and ids.index(suf) < ids.index(mid) == len(ids) - len(trained) - 1
            prefix = dec(tokenizer, ids[1:ids.index(suf)])
            suffix = dec(tokenizer, ids[ids.index(suf) + 1:ids.index(mid)])
        assert prefix + middle + suffix == doc  # cut at character level, nothing lost
        assert sum(mask) == len(trained)
    assert len({len(dec(tokenizer, [t for t, m in zip(s[0], s[1]) if m])) for s in samples}) > 5  # cuts vary


def test_rate_per_task_is_deterministic_and_leaves_chat_alone(tmp_path):
    chats = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    tasks = {"code": texts(CODE) + chats, "other": texts(CODE)}
    tokenizer, one = prepare(tmp_path / "a", CHATML, tasks, fim_rate=[0.5, 0.0], fim_spm_rate=0.5)
    _, two = prepare(tmp_path / "b", CHATML, tasks, fim_rate=[0.5, 0.0], fim_spm_rate=0.5, tokenize_workers=2)
    _, reseeded = prepare(tmp_path / "c", CHATML, tasks, fim_rate=[0.5, 0.0], fim_spm_rate=0.5, seed=7)
    _, plain = prepare(tmp_path / "d", CHATML, tasks)
    assert one == two and one != reseeded
    pre = fim_ids(tokenizer)[0]
    is_fim = [pre in ids for ids, _, _ in one]
    code, chat_samples, other = is_fim[:40], is_fim[40:45], is_fim[45:]
    assert 10 <= sum(code) <= 30  # rate 0.5 of 40, drawn by hash; a fixed outcome, not a flaky one
    assert not any(chat_samples) and not any(other)
    assert [s for s, f in zip(one, is_fim) if not f] == [s for s, f in zip(plain, is_fim) if not f]


def test_fim_tokens_from_the_table_the_config_or_an_error(tmp_path):
    tokenizer, samples = prepare(tmp_path / "a", DEEPSEEK, {"code": texts(CODE[:3])}, fim_rate=1.0,
                                 model_type="deepseek")
    assert samples[0][0][0] == tokenizer.convert_tokens_to_ids("<｜fim▁begin｜>")  # DeepSeek-Coder's spelling
    configured = ["<|fim_suffix|>", "<|fim_prefix|>", "<|fim_middle|>"]  # deliberately swapped: used as given
    tokenizer, samples = prepare(tmp_path / "b", CHATML, {"code": texts(CODE[:3])}, fim_rate=1.0,
                                 fim_tokens=configured)
    assert samples[0][0][0] == tokenizer.convert_tokens_to_ids("<|fim_suffix|>")
    with pytest.raises(ConfigError, match=r"^fim_rate: the tokenizer has no fill-in-the-middle tokens"):
        prepare(tmp_path / "c", TOKENIZER, {"code": texts(CODE[:3])}, fim_rate=0.5)
    with pytest.raises(ConfigError, match=r"^fim_tokens: '<nope>' not in the tokenizer's vocabulary"):
        prepare(tmp_path / "d", CHATML, {"code": texts(CODE[:3])}, fim_rate=0.5,
                fim_tokens=["<nope>", "<|fim_suffix|>", "<|fim_middle|>"])
    for key, value, message in [("fim_rate", 1.5, "rates must be numbers in"), ("fim_spm_rate", [0.5, 0.5],
                                                                                 "2 rates for 1 data_paths"),
                                ("fim_tokens", ["a", "b"], "expected \\[prefix, suffix, middle\\]")]:
        with pytest.raises(ConfigError, match=f"{key}: {message}"):
            prepare(tmp_path / "e", CHATML, {"code": texts(CODE[:1])}, **{key: value})
