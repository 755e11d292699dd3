"""The data pipeline: task directories, bad input, the tokenization cache, `mftcore prepare`."""

import json
import os
import socket
import threading

import numpy as np
import pytest

from mftcore.config import TrainConfig
from mftcore.data import epoch_order, load_tasks, micro_batches, report_lines
from mftcore.data.cache import SampleStore, prepare_cache, task_names
from mftcore.data.dataset import split_counts
from mftcore.data.show import decode
from mftcore.errors import ConfigError, DataError
from tests.helpers.paths import DATA, TOKENIZER


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def chat(q="q", a="a"):
    return json.dumps({"chat_rounds": [{"role": "human", "content": q}, {"role": "bot", "content": a}]})


def make_cfg(tmp_path, paths, **updates):
    raw = {"data_paths": [str(p) for p in paths], "tokenizer_path": TOKENIZER, "model_config": {"model_type": "llama"},
           "seq_length": 64, "output_dir": str(tmp_path / "out"), "tokenize_workers": 1, **updates}
    return TrainConfig.from_dict(raw)


def load(cfg, tokenizer):
    return load_tasks(cfg, tokenizer, tokenizer.eos_token_id, progress=False)


def samples_of(data):
    return [(s.input_ids.tolist(), s.loss_mask.tolist(), s.task_id) for s in list(data.train) + list(data.valid)]


# --- tasks and splits ---

def test_tasks_files_names_and_split(tmp_path, tokenizer):
    write(tmp_path / "a" / "code" / "x.jsonl", [chat(f"q{i}") for i in range(10)])
    write(tmp_path / "a" / "code" / "deep" / "y.jsonl", [chat(f"r{i}") for i in range(10)])
    (tmp_path / "a" / "code" / "notes.txt").write_text("not data")
    write(tmp_path / "a" / "code" / ".ipynb_checkpoints" / "x.jsonl", ["not read: hidden, as for glob"])
    write(tmp_path / "b" / "code" / "z.jsonl", [chat(f"s{i}") for i in range(5)])
    # MFTCoder's "[a,b]" string form of data_paths; the split is read as fractions of its sum
    cfg = make_cfg(tmp_path, [], data_paths=f"[{tmp_path / 'a' / 'code'},{tmp_path / 'b' / 'code'}]",
                   data_split="3,1,0")
    data = load(cfg, tokenizer)
    assert data.names == ["code", "code_2"]
    assert (data.report["code"]["samples"], data.report["code"]["train"], data.report["code"]["valid"]) == (20, 15, 5)
    assert (data.report["code_2"]["train"], data.report["code_2"]["valid"]) == (4, 1)  # ceil(0.75 * 5) = 4
    assert sorted(s.task_id for s in data.train) == [0] * 15 + [1] * 4
    # both files of task "code", sorted, recursively; the split is a seeded shuffle, deterministic
    assert len({tuple(s[0]) for s in samples_of(data)}) == 25
    assert samples_of(load(cfg, tokenizer)) == samples_of(data)
    other = load(make_cfg(tmp_path, [], data_paths=cfg.data_paths, data_split="3,1,0", seed=5), tokenizer)
    assert [s.input_ids.tolist() for s in other.train] != [s.input_ids.tolist() for s in data.train]


def test_long_sample_policy_truncate_and_drop(tmp_path, tokenizer):
    write(tmp_path / "t" / "x.jsonl", [chat(), chat(a="word " * 80), chat(a="more " * 90)])
    data = load(make_cfg(tmp_path, [tmp_path / "t"], data_split="1,0,0"), tokenizer)
    assert data.report["t"]["truncated"] == 2 and data.report["t"]["samples"] == 3
    assert sorted(len(s.input_ids) for s in data.train)[1:] == [64, 64]
    data = load(make_cfg(tmp_path, [tmp_path / "t"], data_split="1,0,0", long_sample_policy="drop"), tokenizer)
    assert (data.report["t"]["dropped"], data.report["t"]["samples"], len(data.train)) == (2, 1, 1)
    assert "2 longer than seq_length=64 dropped" in report_lines(data, make_cfg(
        tmp_path, [tmp_path / "t"], long_sample_policy="drop"))[1]


# --- bad input: one line naming file:line, or skipped and counted ---

BAD_LINES = [
    (b'{"chat_rounds": [}', "invalid JSON"),
    (b'{"foo": "bar"}', "record has no known shape"),
    (b'{"chat_rounds": [{"role": "human", "content": "q"}, {"role": "robot", "content": "a"}]}',
     r"chat_rounds\[1\]: unknown role 'robot'"),
    (b'{"chat_rounds": [{"role": "human", "content": "q"}, {"role": "user", "content": "a"}]}',
     r"chat_rounds\[1\] has role 'user': roles must alternate"),
    (b'{"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": ""}]}', "empty content"),
    (b'{"prompt": "q", "answer": "  "}', "empty content in answer"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, tokenizer, line, reason):
    f = tmp_path / "t" / "x.jsonl"
    f.parent.mkdir()
    f.write_bytes(chat().encode() + b"\n\n" + line + b"\n" + chat().encode() + b"\n")  # a blank line is fine
    with pytest.raises(DataError, match=f"^{f}:3: {reason}"):
        load(make_cfg(tmp_path, [tmp_path / "t"]), tokenizer)


def test_byte_order_mark_and_crlf_are_read(tmp_path, tokenizer):
    f = tmp_path / "t" / "x.jsonl"
    f.parent.mkdir()
    f.write_bytes(b"\xef\xbb\xbf" + chat().encode() + b"\r\n" + chat().encode() + b"\r\n")
    data = load(make_cfg(tmp_path, [tmp_path / "t"], data_split="1,0,0"), tokenizer)
    assert len(data.train) == 2 and data.train[0].input_ids.tolist() == data.train[1].input_ids.tolist()


def test_skip_bad_samples_counts_per_task(tmp_path, tokenizer):
    lines = [chat()] + [line.decode("utf-8", "replace") for line, _ in BAD_LINES[:-1]]
    write(tmp_path / "t1" / "x.jsonl", lines)
    (tmp_path / "t1" / "y.jsonl").write_bytes(BAD_LINES[-1][0] + b"\n" + chat("z").encode() + b"\n")
    write(tmp_path / "t2" / "x.jsonl", [chat(), chat("w")])
    cfg = make_cfg(tmp_path, [tmp_path / "t1", tmp_path / "t2"], skip_bad_samples=True, data_split="1,0,0")
    data = load(cfg, tokenizer)
    assert (data.report["t1"]["skipped"], data.report["t1"]["samples"]) == (7, 2)
    assert (data.report["t2"]["skipped"], data.report["t2"]["samples"]) == (0, 2)
    assert data.report["t1"]["skip_examples"][0] == f"{tmp_path / 't1' / 'x.jsonl'}:2: invalid JSON: " \
                                                    "Expecting value (column 18)"
    assert "7 bad lines skipped (first: " in report_lines(data, cfg)[1]
    # a task left with nothing is still an error
    write(tmp_path / "t3" / "x.jsonl", ['{"foo": 1}'])
    with pytest.raises(DataError, match=r"t3: the task has no samples \(all 1 lines were bad\)"):
        load(make_cfg(tmp_path, [tmp_path / "t3"], skip_bad_samples=True), tokenizer)


def test_missing_path_and_empty_directory(tmp_path, tokenizer):
    with pytest.raises(DataError, match=f"^{tmp_path / 'nope'}: data path does not exist"):
        load(make_cfg(tmp_path, [tmp_path / "nope"]), tokenizer)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no \*\.jsonl files"):
        load(make_cfg(tmp_path, [tmp_path / "empty"], skip_bad_samples=True), tokenizer)


# --- the cache ---

def test_cache_is_reused_and_invalidated(tmp_path, tokenizer):
    write(tmp_path / "t" / "x.jsonl", [chat(f"q{i}") for i in range(6)])
    cfg = make_cfg(tmp_path, [tmp_path / "t"])
    first = load(cfg, tokenizer)
    assert not first.cache_reused and first.cache.startswith(str(tmp_path / "mftcore_cache"))
    again = load(cfg, tokenizer)
    assert again.cache_reused and again.cache == first.cache

    entries = {first.cache}

    def rebuilt(cfg_, tok=tokenizer):
        data = load_tasks(cfg_, tok, tok.eos_token_id, progress=False)
        assert not data.cache_reused and data.cache not in entries
        entries.add(data.cache)
        return data

    rebuilt(make_cfg(tmp_path, [tmp_path / "t"], seq_length=32))
    rebuilt(make_cfg(tmp_path, [tmp_path / "t"], long_sample_policy="drop"))
    rebuilt(make_cfg(tmp_path, [tmp_path / "t"], skip_bad_samples=True))
    rebuilt(make_cfg(tmp_path, [tmp_path / "t"], role_markers={"user": "### I:\n"}))
    rebuilt(make_cfg(tmp_path, [tmp_path / "t"], eos_token="ls"), tok=eos_tokenizer("ls"))
    other_tok = eos_tokenizer(None)
    other_tok.add_tokens(["<extra>"])  # same files, different tokenizer
    rebuilt(cfg, tok=other_tok)
    # the data: a file edited (size/mtime), a file added
    write(tmp_path / "t" / "x.jsonl", [chat(f"q{i}") for i in range(7)])
    assert rebuilt(cfg).report["t"]["samples"] == 7
    write(tmp_path / "t" / "sub" / "y.jsonl", [chat("new")])
    assert rebuilt(cfg).report["t"]["samples"] == 8
    # rewritten in place with the same size and mtime: the key is the content, so a new entry
    target = tmp_path / "t" / "sub" / "y.jsonl"
    st = os.stat(target)
    write(target, [chat("old")])
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(target) == st.st_size and os.stat(target).st_mtime_ns == st.st_mtime_ns
    rebuilt(cfg)
    # only finished entries (and the digest memory) are in the cache directory, nothing half-written
    assert sorted(os.listdir(tmp_path / "mftcore_cache")) == sorted([os.path.basename(e) for e in entries]
                                                                    + ["digests.json"])


def eos_tokenizer(eos):
    from mftcore.model.load import load_tokenizer

    return load_tokenizer(TrainConfig.from_dict({"data_paths": ["x"], "tokenizer_path": TOKENIZER,
                                                 "model_config": {"model_type": "llama"}, "eos_token": eos}))


def test_eos_token_override(tmp_path):
    tok = eos_tokenizer("ls")
    assert tok.eos_token_id == tok.convert_tokens_to_ids("ls") != 0
    write(tmp_path / "t" / "x.jsonl", [chat()])
    data = load(make_cfg(tmp_path, [tmp_path / "t"], eos_token="ls", data_split="1,0,0"), tok)
    ids = data.train[0].input_ids.tolist()
    assert ids[-2] == tok.eos_token_id and 0 not in ids  # the answer ends with the override, not <|endoftext|>
    with pytest.raises(ConfigError, match="eos_token: 'no-such-token' is not a token"):
        eos_tokenizer("no-such-token")


def test_failed_build_leaves_nothing(tmp_path, tokenizer):
    write(tmp_path / "t" / "x.jsonl", [chat(), "{bad"])
    with pytest.raises(DataError):
        load(make_cfg(tmp_path, [tmp_path / "t"]), tokenizer)
    assert os.listdir(tmp_path / "mftcore_cache") == ["digests.json"]  # no entry, no temporary


KILLED_BUILD = r"""
import os, signal, sys
import mftcore.data.cache as cache
from mftcore.config import TrainConfig
from mftcore.data import load_tasks
from mftcore.model.load import load_tokenizer
cache.write_index = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # dies with the tokens written
cfg = TrainConfig.from_dict(dict(data_paths=[sys.argv[1]], tokenizer_path=sys.argv[2], output_dir=sys.argv[3],
                                 model_config={"model_type": "llama"}, tokenize_workers=1))
tok = load_tokenizer(cfg)
load_tasks(cfg, tok, tok.eos_token_id, progress=False)
"""


def test_a_killed_build_is_cleaned_up_by_the_next(tmp_path, tokenizer):
    import subprocess
    import sys

    write(tmp_path / "t" / "x.jsonl", [chat(f"q{i}") for i in range(6)])
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(tmp_path / "t"), TOKENIZER, str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    cache_dir = tmp_path / "mftcore_cache"
    (abandoned,) = set(os.listdir(cache_dir)) - {"digests.json"}
    assert abandoned.startswith(".tmp-") and os.path.getsize(cache_dir / abandoned / "input_ids.bin") > 0
    live = cache_dir / ".tmp-being-built-by-this-process"  # a concurrent builder that is still alive
    live.mkdir()
    (live / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    data = load(make_cfg(tmp_path, [tmp_path / "t"]), tokenizer)
    assert not data.cache_reused
    assert sorted(os.listdir(cache_dir)) == sorted([live.name, os.path.basename(data.cache), "digests.json"])
    assert sorted(os.listdir(data.cache)) == ["input_ids.bin", "loss_mask.bin", "meta.json", "offsets.npy",
                                              "sources.npy", "task_ids.npy"]


def test_parallel_build_equals_serial_and_the_sample_data(tmp_path, tokenizer):
    """Two tokenizer processes give the same cache as one; ids and masks are render + tokenize of each line."""
    from mftcore.data.render import render_record, tokenize_segments

    serial = make_cfg(tmp_path, DATA, data_split="1,0,0", cache_dir=str(tmp_path / "c1"))
    parallel = make_cfg(tmp_path, DATA, data_split="1,0,0", cache_dir=str(tmp_path / "c2"), tokenize_workers=2)
    a, b = SampleStore(prepare_cache(serial, tokenizer, 0, progress=False)[0]), \
        SampleStore(prepare_cache(parallel, tokenizer, 0, progress=False)[0])
    assert len(a) == len(b) == 480
    for name in ("offsets", "task_ids", "sources", "ids", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for i in (0, 200, 479):
        file, line = a.source(i)
        with open(file, encoding="utf-8") as f:
            record = json.loads(f.readlines()[line - 1])
        ids, mask = tokenize_segments(render_record(record, serial.role_markers), tokenizer, tokenizer.eos_token_id)
        got_ids, got_mask, task = a.sample(i)
        assert got_ids.tolist() == ids[:64] and got_mask.tolist() == mask[:64]
        assert serial.data_paths[task] == os.path.dirname(file)


def test_other_ranks_wait_for_local_rank_zero(tmp_path, tokenizer):
    write(tmp_path / "t" / "x.jsonl", [chat()])
    cfg = make_cfg(tmp_path, [tmp_path / "t"])
    got = {}
    waiter = threading.Thread(target=lambda: got.update(
        r=prepare_cache(cfg, tokenizer, 0, local_rank=1, progress=False)))
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive()  # rank 1 does not build
    path, reused = prepare_cache(cfg, tokenizer, 0, local_rank=0, progress=False)
    waiter.join(timeout=10)
    assert not reused and got["r"] == (path, True)
    with pytest.raises(DataError, match="did not appear"):
        prepare_cache(make_cfg(tmp_path, [tmp_path / "t"], seq_length=9), tokenizer, 0, local_rank=1,
                      wait_timeout=0.1)


# --- mftcore prepare ---

def run_cli(capsys, *args):
    """`mftcore ARGS` in this process (the console script calls the same main): (exit code, stdout, stderr)."""
    from mftcore.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prepare_show_prints_what_the_model_sees(tmp_path, tokenizer, capsys):
    write(tmp_path / "t" / "x.jsonl", [json.dumps({"system": "s", "prompt": "q", "answer": "a"}),
                                       json.dumps({"text": "t"})])
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"data_paths": [str(tmp_path / "t")], "tokenizer_path": TOKENIZER,
                                    "model_config": {"model_type": "llama"}, "output_dir": str(tmp_path / "o")}))
    code, out, err = run_cli(capsys, "prepare", str(cfg_path), "seq_length=100", "--show", "5")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    prompt, answer, text = enc("<s>system\ns\n<s>human\nq\n<s>bot\n"), enc("a\n"), enc("t\n")
    assert rows == [
        {"task": "t", "split": "train", "text": "<s>system\ns\n<s>human\nq\n<s>bot\na\n<|endoftext|>",
         "marked": "<s>system\ns\n<s>human\nq\n<s>bot\n⟦a\n<|endoftext|>⟧",
         "input_ids": prompt + answer + [0], "loss_mask": [0] * len(prompt) + [1] * (len(answer) + 1)},
        {"task": "t", "split": "train", "text": "t\n<|endoftext|>", "marked": "⟦t\n<|endoftext|>⟧", "input_ids": text + [0],
         "loss_mask": [1] * (len(text) + 1)},
    ]
    assert "(built)" in err and "task t: 2 samples" in err
    code, out, err = run_cli(capsys, "prepare", str(cfg_path), "seq_length=100")
    assert code == 0 and "(reused)" in err and out == ""


def test_prepare_show_marks_each_samples_split(tmp_path, tokenizer, capsys):
    write(tmp_path / "t" / "x.jsonl", [json.dumps({"text": f"sample {i}"}) for i in range(6)])
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"data_paths": [str(tmp_path / "t")], "tokenizer_path": TOKENIZER,
                                    "model_config": {"model_type": "llama"}, "output_dir": str(tmp_path / "o"),
                                    "data_split": "50,50,0"}))
    code, out, err = run_cli(capsys, "prepare", str(cfg_path), "--show", "6")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    cfg = TrainConfig.from_file(str(cfg_path))
    data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id)
    valid_texts = {decode(tokenizer, list(data.valid[i].input_ids)) for i in range(len(data.valid))}
    assert len(rows) == 6 and len(data.valid) == 3
    assert [r["text"] in valid_texts for r in rows] == [r["split"] == "valid" for r in rows]
    assert {r["split"] for r in rows} == {"train", "valid"}


def test_prepare_bad_data_exits_2_with_one_line(tmp_path, capsys):
    write(tmp_path / "t" / "x.jsonl", [chat(), '{"chat_rounds": [{"role": "bot", "content": "a"}]}'])
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"data_paths": [str(tmp_path / "t")], "tokenizer_path": TOKENIZER,
                                    "model_config": {"model_type": "llama"}, "output_dir": str(tmp_path / "o")}))
    code, out, err = run_cli(capsys, "prepare", str(cfg_path))
    assert code == 2
    assert err.strip().splitlines() == [
        f"mftcore: error: {tmp_path / 't' / 'x.jsonl'}:2: chat_rounds[0] has role 'bot': roles must alternate "
        "human/bot (system only first)"]


@pytest.mark.parametrize("update, key", [
    ({"long_sample_policy": "cut"}, "long_sample_policy"),
    ({"skip_bad_samples": "yes"}, "skip_bad_samples"),
    ({"eos_token": ""}, "eos_token"),
    ({"eos_token": 2}, "eos_token"),
    ({"tokenize_workers": -1}, "tokenize_workers"),
    ({"padding_mode": "concat"}, "padding_mode"),
])
def test_data_keys_are_validated(tmp_path, update, key):
    with pytest.raises(ConfigError, match=f"config: {key}: "):
        make_cfg(tmp_path, ["x"], **update)
    assert make_cfg(tmp_path, ["x"], padding_mode="pack").padding_mode == "pack"


def test_task_names_are_unique():
    assert task_names(["a/code", "b/code/", "c/sql", "d/code"]) == ["code", "code_2", "sql", "code_3"]


def test_split_counts_use_fractions_of_the_sum():
    assert split_counts(100, 0.98, 0.02) == (98, 2)
    assert split_counts(10, 0.9, 0.1) == (9, 1)
    assert split_counts(3, 0.98, 0.02) == (3, 0)


def test_epoch_order_reshuffles_and_covers_everything():
    a, b = epoch_order(50, 1, 0), epoch_order(50, 1, 1)
    assert sorted(a.tolist()) == list(range(50)) and a.tolist() != b.tolist()
    batches = micro_batches(a, 8)
    assert [len(x) for x in batches] == [8] * 6 + [2]
    assert sorted(sum(batches, [])) == list(range(50))


def config_for(tmp_path, paths):
    return TrainConfig.from_dict({"data_paths": [str(p) for p in paths], "tokenizer_path": "x",
                                  "model_config": {"model_type": "llama"}, "seq_length": 16,
                                  "output_dir": str(tmp_path / "out"), "tokenize_workers": 1})


def good(q="q", a="a"):
    return json.dumps({"chat_rounds": [{"role": "human", "content": q}, {"role": "bot", "content": a}]})


def test_load_tasks_truncates_and_reports(tmp_path, tokenizer):
    write(tmp_path / "t1" / "x.jsonl", [good(), good(a="word " * 40)])
    write(tmp_path / "t2" / "sub" / "y.jsonl", [good()])
    data = load_tasks(config_for(tmp_path, [tmp_path / "t1", tmp_path / "t2"]), tokenizer, tokenizer.eos_token_id)
    assert data.names == ["t1", "t2"]
    assert data.report["t1"]["truncated"] == 1 and data.report["t1"]["samples"] == 2
    assert all(len(s.input_ids) <= 16 for s in list(data.train) + list(data.valid))
    assert {s.task_id for s in data.train} == {0, 1}


@pytest.mark.parametrize("content, expected", [
    (b'{"chat_rounds": [}\n', r"x\.jsonl:2: invalid JSON"),
    (b'{"text_only": 1}\n', r"x\.jsonl:2: record has no known shape"),
    (b'{"chat_rounds": [{"role": "bot", "content": "a"}]}\n', r"x\.jsonl:2: chat_rounds\[0\] has role 'bot'"),
    (b'\xff\xfe\n', r"x\.jsonl:2: invalid UTF-8"),
])
def test_bad_lines_name_file_and_line(tmp_path, tokenizer, content, expected):
    f = tmp_path / "t" / "x.jsonl"
    f.parent.mkdir()
    f.write_bytes(good().encode() + b"\n" + content)
    with pytest.raises(DataError, match=expected):
        load_tasks(config_for(tmp_path, [tmp_path / "t"]), tokenizer, tokenizer.eos_token_id)


def test_missing_and_empty_task_dirs(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_tasks(config_for(tmp_path, [tmp_path / "nope"]), tokenizer, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.jsonl files"):
        load_tasks(config_for(tmp_path, [tmp_path / "empty"]), tokenizer, 0)
