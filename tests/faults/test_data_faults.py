"""Hostile data: links, FIFOs, devices, loops, bad bytes, records that train on nothing. `mftcore prepare`
(tokenize into the cache) must stop with one line naming the file (and line), or with
skip_bad_samples count the line and go on; nothing half-built may stay in the cache directory. All
data files go through one guarded path (mftcore/data/files.py, io.open_regular, io.parse_json)."""

import json
import os

import pytest

from tests.faults.harness import base_config, check_refused, check_succeeded, leftovers, run_cli, snapshot, write_json
from tests.helpers.paths import TOKENIZER

GOOD = {"chat_rounds": [{"role": "human", "content": "How do I list files?"}, {"role": "bot", "content": "ls -la"}]}


def task(tmp_path, name="t", lines=(GOOD,) * 4) -> str:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    with open(d / "a.jsonl", "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")
    return str(d)


def prepare(tmp_path, capfd, data_paths, **updates):
    cfg = base_config(tmp_path, data_paths=[str(p) for p in data_paths], **updates)
    outcome = run_cli(capfd, ["prepare", write_json(tmp_path / "c.json", cfg)])
    assert not leftovers(tmp_path / "cache"), "a failed build left its temporary directory"
    return outcome


def bad_line(raw: bytes):
    """A task whose second line is `raw`: the error names a.jsonl:2."""
    return lambda tmp_path: [task(tmp_path, lines=[GOOD, raw + b"\n", GOOD])]


def dangling_link(tmp_path):
    d = task(tmp_path)
    os.symlink(tmp_path / "gone.jsonl", os.path.join(d, "b.jsonl"))
    return [d]


def fifo_in_task(tmp_path):
    d = task(tmp_path)
    os.mkfifo(os.path.join(d, "b.jsonl"))
    return [d]


def fifo_as_path(tmp_path):
    os.mkfifo(tmp_path / "p.jsonl")
    return [tmp_path / "p.jsonl"]


def device_as_file(tmp_path):
    d = task(tmp_path)
    os.symlink("/dev/zero", os.path.join(d, "z.jsonl"))
    return [d]


def link_loop(tmp_path):
    d = task(tmp_path)
    os.makedirs(os.path.join(d, "sub"))
    os.symlink("..", os.path.join(d, "sub", "up"))
    return [d]


def self_link_loop(tmp_path):
    d = task(tmp_path)
    os.symlink(os.path.join(d, "loop.jsonl"), os.path.join(d, "loop.jsonl"))
    return [d]


def dir_twice(tmp_path):
    d = task(tmp_path)
    os.makedirs(os.path.join(d, "real"))
    task(tmp_path, "t/real")
    os.symlink("real", os.path.join(d, "again"))
    return [d]


def file_twice(tmp_path):
    d = task(tmp_path)
    os.symlink("a.jsonl", os.path.join(d, "b.jsonl"))
    return [d]


def missing_path(tmp_path):
    return [tmp_path / "nowhere"]


def broken_task_link(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "t")
    return [tmp_path / "t"]


def no_jsonl(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "readme.txt").write_text("no data here")
    return [tmp_path / "t"]


def no_assistant_turn(tmp_path):
    return [task(tmp_path, lines=[{"chat_rounds": [{"role": "human", "content": "hello"}]}] * 3)]


def answers_cut_off(tmp_path):
    long_prompt = {"prompt": "word " * 200, "answer": "ok"}
    return [task(tmp_path, lines=[long_prompt] * 3)]


def all_dropped(tmp_path):
    return [task(tmp_path, lines=[{"prompt": "word " * 300, "answer": "ok"}] * 3)]


# (id, make(tmp_path) -> data_paths, config updates, names the error line must hold)
CASES = [
    ("dangling-symlink", dangling_link, {}, ["b.jsonl", "broken symbolic link"]),
    ("fifo-in-task", fifo_in_task, {}, ["b.jsonl", "FIFO"]),
    ("fifo-as-data-path", fifo_as_path, {}, ["p.jsonl", "FIFO"]),
    ("device-as-file", device_as_file, {}, ["z.jsonl", "character device"]),
    ("symlink-loop", link_loop, {}, ["symbolic link loop"]),
    ("self-link", self_link_loop, {}, ["loop.jsonl", "loop"]),
    ("directory-twice", dir_twice, {}, ["same directory"]),
    ("file-twice", file_twice, {}, ["b.jsonl", "same file"]),
    ("missing-path", missing_path, {}, ["nowhere", "does not exist"]),
    ("broken-task-link", broken_task_link, {}, ["broken symbolic link"]),
    ("no-jsonl", no_jsonl, {}, ["no *.jsonl files"]),
    ("invalid-utf8", bad_line(b'{"text": "caf\xe9"}'), {}, ["a.jsonl:2", "invalid UTF-8"]),
    ("lone-surrogate", bad_line(b'{"text": "bad \\ud800 half"}'), {}, ["a.jsonl:2", "lone surrogate"]),
    ("deep-nesting", bad_line(b"[" * 100000 + b"]" * 100000), {}, ["a.jsonl:2", "nested too deeply"]),
    ("duplicate-key", bad_line(b'{"text": "a", "text": "b"}'), {}, ["a.jsonl:2", "duplicate key"]),
    ("not-an-object", bad_line(b'["text", "a"]'), {}, ["a.jsonl:2", "JSON object"]),
    ("control-character", bad_line(b'{"text": "a\x01b"}'), {}, ["a.jsonl:2", "invalid JSON"]),
    ("nul-bytes", bad_line(b"\x00\x00\x00"), {}, ["a.jsonl:2"]),
    ("unknown-shape", bad_line(b'{"question_text": "q"}'), {}, ["a.jsonl:2", "no known shape"]),
    ("content-not-string", bad_line(b'{"prompt": 1, "answer": 2}'), {}, ["a.jsonl:2"]),
    ("huge-integer", bad_line(b'{"text": ' + b"9" * 5000 + b"}"), {}, ["a.jsonl:2"]),
    ("no-assistant-turn", no_assistant_turn, {}, ["no loss tokens"]),
    ("answers-cut-off", answers_cut_off, {"seq_length": 32}, ["no loss tokens", "seq_length=32"]),
    ("drop-drops-all", all_dropped, {"seq_length": 32, "long_sample_policy": "drop"},
     ["no samples", "dropped", "seq_length=32"]),
]


@pytest.mark.parametrize("make,updates,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_data_is_one_line(tmp_path, capfd, make, updates, names):
    check_refused(prepare(tmp_path, capfd, make(tmp_path), **updates), *names)


SKIPPABLE = [("invalid-utf8", b'{"text": "caf\xe9"}'), ("lone-surrogate", b'{"text": "\\udc00"}'),
             ("deep-nesting", b"[" * 100000 + b"]" * 100000), ("duplicate-key", b'{"text": "a", "text": "b"}')]


@pytest.mark.parametrize("raw", [c[1] for c in SKIPPABLE], ids=[c[0] for c in SKIPPABLE])
def test_skip_bad_samples_counts_the_line(tmp_path, capfd, raw):
    outcome = prepare(tmp_path, capfd, bad_line(raw)(tmp_path), skip_bad_samples=True)
    check_succeeded(outcome)
    assert "1 bad lines skipped (first: " in outcome.err and "a.jsonl:2" in outcome.err


def test_a_task_with_no_loss_tokens_is_a_counted_warning_with_skip_bad_samples(tmp_path, capfd):
    silent = task(tmp_path, "silent", lines=[{"chat_rounds": [{"role": "human", "content": "hi"}]}] * 2)
    outcome = prepare(tmp_path, capfd, [task(tmp_path), silent], skip_bad_samples=True)
    check_succeeded(outcome)
    assert "task silent: 2 samples" in outcome.err and "2 without any loss token" in outcome.err
    assert "warning: task silent has no loss tokens" in outcome.err


def test_every_task_without_loss_tokens_is_an_error_even_when_skipping(tmp_path, capfd):
    outcome = prepare(tmp_path, capfd, no_assistant_turn(tmp_path), skip_bad_samples=True)
    check_refused(outcome, "no loss tokens")


def test_unreadable_file(tmp_path, capfd, monkeypatch):
    """Root reads a chmod 000 file anyway, so the refusal comes from a patched os.open (the guarded path's)."""
    d = task(tmp_path)
    real_open, target = os.open, os.path.join(d, "a.jsonl")

    def refusing(path, *args, **kwargs):
        if os.fspath(path) == target:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    check_refused(prepare(tmp_path, capfd, [d]), "a.jsonl", "permission denied")


def test_file_rewritten_in_place_gets_a_new_cache_entry(tmp_path, capfd):
    d = task(tmp_path, lines=[{"text": "aaaa"}] * 4)
    check_succeeded(prepare(tmp_path, capfd, [d]))
    path = os.path.join(d, "a.jsonl")
    st = os.stat(path)
    with open(path, "r+b") as f:  # same size, same mtime, other bytes
        f.write(f.read().replace(b"aaaa", b"bbbb"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    outcome = prepare(tmp_path, capfd, [d])
    check_succeeded(outcome)
    assert "(built)" in outcome.err, "the stale entry was reused"


def test_generate_file_with_bad_bytes_names_file_and_line(tmp_path, capfd, tiny_pretrained):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n')
    check_refused(run_cli(capfd, ["generate", "--model", tiny_pretrained, "--file", prompts]), "p.jsonl:2",
                  "invalid UTF-8")


@pytest.mark.parametrize("kind", ["fifo", "missing", "nested"])
def test_generate_file_guarded(tmp_path, capfd, tiny_pretrained, kind):
    prompts = tmp_path / "p.jsonl"
    if kind == "fifo":
        os.mkfifo(prompts)
    elif kind == "nested":
        prompts.write_bytes(b"[" * 100000 + b"]" * 100000 + b"\n")
    names = {"fifo": ["p.jsonl", "FIFO"], "missing": ["p.jsonl", "not found"], "nested": ["p.jsonl:1", "nested"]}
    check_refused(run_cli(capfd, ["generate", "--model", tiny_pretrained, "--file", prompts]), *names[kind])


def test_token_ids_beyond_the_embedding(tmp_path, capfd):
    """A tokenizer with added tokens that the model's embedding does not have: one line at load time."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    vocab = len(tok)
    tok.add_tokens(["<tool_call>", "<tool_result>"])
    tok.save_pretrained(tmp_path / "tok")
    d = task(tmp_path, lines=[{"prompt": "use <tool_call>", "answer": "<tool_result> done"}] * 4)
    model = {**base_config(tmp_path)["model_config"], "vocab_size": vocab}
    cfg = base_config(tmp_path, data_paths=[d], tokenizer_path=str(tmp_path / "tok"), model_config=model)
    before = snapshot(d)
    check_refused(run_cli(capfd, ["train", write_json(tmp_path / "c.json", cfg)]), "a.jsonl:", f"vocabulary of {vocab}")
    assert snapshot(d) == before


@pytest.mark.parametrize("damage", ["truncate-ids", "meta-not-json", "offsets-missing"])
def test_a_damaged_cache_entry_is_built_again(tmp_path, capfd, damage):
    d = task(tmp_path)
    check_succeeded(prepare(tmp_path, capfd, [d]))
    (entry,) = [e for e in (tmp_path / "cache").iterdir() if e.is_dir()]
    if damage == "truncate-ids":
        os.truncate(entry / "input_ids.bin", 5)
    elif damage == "meta-not-json":
        (entry / "meta.json").write_text('{"format": 2, ')
    else:
        os.remove(entry / "offsets.npy")
    outcome = prepare(tmp_path, capfd, [d])
    check_succeeded(outcome)
    assert "damaged" in outcome.err and "(built)" in outcome.err


@pytest.mark.parametrize("where", ["tokenizer", "model"])
def test_a_fifo_in_a_model_or_tokenizer_directory_is_named_not_read(tmp_path, capfd, tiny_pretrained, where):
    import shutil

    d = shutil.copytree(tiny_pretrained, tmp_path / "m")
    os.remove(d / "tokenizer_config.json" if where == "tokenizer" else d / "config.json")
    os.mkfifo(d / ("tokenizer_config.json" if where == "tokenizer" else "config.json"))
    if where == "tokenizer":
        cfg = base_config(tmp_path, data_paths=[task(tmp_path)], tokenizer_path=str(d))
        outcome = run_cli(capfd, ["train", write_json(tmp_path / "c.json", cfg)])
        check_refused(outcome, "tokenizer_path", "tokenizer_config.json", "not a regular file")
    else:
        outcome = run_cli(capfd, ["generate", "--model", d, "--prompt", "hi"])
        check_refused(outcome, "--model", "config.json", "not a regular file")


@pytest.mark.parametrize("line,named", [
    (b'{"task_id": "a", "task_id": "b"}', "duplicate key"),
    (b'{"prompt": "caf\xe9"}', "invalid UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nested"),
    (b"7", "must be a JSON object"),
])
def test_a_benchmark_file_is_read_strictly(tmp_path, line, named):
    """`mftcore eval --benchmark FILE` reads its JSONL by the same guarded path and strict reader."""
    from mftcore.codeeval.benchmarks import read_jsonl
    from mftcore.errors import DataError

    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\n" + line + b"\n")
    with pytest.raises(DataError, match=f"b.jsonl:2: .*{named}"):
        read_jsonl(str(path), None)
