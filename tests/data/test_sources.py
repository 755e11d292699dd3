"""Tasks beyond MFTCoder's JSONL: parquet / arrow / csv / json files, save_to_disk directories and Hub
datasets (from the offline cache), read through `datasets`; the cache keyed on their fingerprints; bad
rows named by file and row; column mappings that match nothing."""

import json

import pytest

from mftcore.config import TrainConfig
from mftcore.data import load_tasks
from mftcore.data.cache import cache_key
from mftcore.errors import ConfigError, DataError
from tests.helpers.datasets_cache import cache_hub_dataset, write_dataset
from tests.helpers.paths import TOKENIZER


def make_cfg(tmp_path, paths, **updates):
    raw = {"data_paths": paths, "tokenizer_path": TOKENIZER, "model_config": {"model_type": "llama"},
           "seq_length": 64, "output_dir": str(tmp_path / "out"), "tokenize_workers": 1, "data_split": "1,0,0",
           **updates}
    return TrainConfig.from_dict(raw)


def load(cfg, tokenizer):
    return load_tasks(cfg, tokenizer, tokenizer.eos_token_id, progress=False)


def rows_of(data):
    store = data.train.store
    return [(store.sample(i)[0].tolist(), store.sample(i)[1].tolist()) for i in range(len(store))]


def chat_rows(n, key="chat_rounds"):
    return [{key: [{"role": "human", "content": f"q{i}"}, {"role": "bot", "content": f"a{i}"}]} for i in range(n)]


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "csv", "json", "disk"])
def test_every_format_gives_the_jsonl_tokens(tmp_path, tokenizer, fmt):
    """The same records as JSONL and in each format: the same ids and masks, in row order."""
    rows = [{"prompt": f"q{i}", "answer": f"a {i}" * (i + 1)} for i in range(7)]
    reference = rows_of(load(make_cfg(tmp_path, [jsonl(tmp_path / "j" / "x.jsonl", rows)]), tokenizer))
    ext = {"disk": ""}.get(fmt, "." + fmt)
    path = write_dataset(rows, tmp_path / fmt / f"data{ext}", fmt)
    data = load(make_cfg(tmp_path, [path], cache_dir=str(tmp_path / f"cache-{fmt}")), tokenizer)
    assert rows_of(data) == reference
    assert data.report[data.names[0]]["samples"] == 7


def test_a_directory_of_parquet_shards_is_one_task_in_file_order(tmp_path, tokenizer):
    rows = chat_rows(6)
    for k in range(3):
        write_dataset(rows[2 * k:2 * k + 2], tmp_path / "code" / f"part-{k}.parquet", "parquet")
    data = load(make_cfg(tmp_path, [str(tmp_path / "code")], tokenize_workers=2), tokenizer)
    reference = load(make_cfg(tmp_path, [jsonl(tmp_path / "j" / "code.jsonl", rows)]), tokenizer)
    assert data.names == ["code"] and rows_of(data) == rows_of(reference)


def test_save_to_disk_dataset_dict_takes_its_split(tmp_path, tokenizer):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(chat_rows(3)),
                               "test": datasets.Dataset.from_list(chat_rows(5))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load(make_cfg(tmp_path, [str(tmp_path / "dd")]), tokenizer).train) == 3
    entry = {"path": str(tmp_path / "dd"), "split": "test"}
    assert len(load(make_cfg(tmp_path, [entry]), tokenizer).train) == 5
    with pytest.raises(DataError, match=r"dd: no split 'valid' in this DatasetDict \(splits: train, test\)"):
        load(make_cfg(tmp_path, [{"path": str(tmp_path / "dd"), "split": "valid"}]), tokenizer)


def test_hub_dataset_from_the_offline_cache_with_subset_and_split(tmp_path, tokenizer):
    cache_hub_dataset("acme/tiny-chat", chat_rows(4, "messages"), tmp_path)
    cache_hub_dataset("acme/tiny-code", [{"text": f"def f{i}(): pass"} for i in range(3)], tmp_path,
                      split="validation", config="python")
    data = load(make_cfg(tmp_path, ["acme/tiny-chat", {"path": "acme/tiny-code", "subset": "python",
                                                       "split": "validation"}]), tokenizer)
    assert data.names == ["tiny-chat", "tiny-code"]
    assert (data.report["tiny-chat"]["samples"], data.report["tiny-code"]["samples"]) == (4, 3)
    with pytest.raises(DataError, match=r"^acme/missing\[train\]: not a local path, and datasets cannot load it as "
                                        r"a Hub dataset \(offline"):
        load(make_cfg(tmp_path, ["acme/missing"]), tokenizer)


def test_cache_keys_on_the_fingerprint(tmp_path, tokenizer):
    """Same data: the entry is reused; other rows in the same file: a new entry."""
    path = write_dataset(chat_rows(3), tmp_path / "d" / "x.parquet", "parquet")
    cfg = make_cfg(tmp_path, [path])
    key = cache_key(cfg, tokenizer, tokenizer.eos_token_id)
    assert key["tasks"][0]["files"][0]["fingerprint"]
    first = load(cfg, tokenizer)
    assert not first.cache_reused and load(cfg, tokenizer).cache_reused
    write_dataset(chat_rows(4), tmp_path / "d" / "x.parquet", "parquet")
    second = load(cfg, tokenizer)
    assert not second.cache_reused and second.cache != first.cache and len(second.train) == 4


BAD_ROWS = [
    ({"prompt": "q", "answer": ""}, "empty content in answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "unknown role 'robot'"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS)
def test_a_bad_row_names_file_and_row_or_is_skipped_and_counted(tmp_path, tokenizer, bad, reason):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "prompt": None,
            "answer": None}  # every row holds every column (null where a row has no value)
    rows = [good, {"messages": None, "prompt": None, "answer": None, **bad}, good]
    path = write_dataset(rows, tmp_path / "d" / "x.parquet", "parquet")
    with pytest.raises(DataError, match=f"^{path}: row 1: .*{reason}"):
        load(make_cfg(tmp_path, [path]), tokenizer)
    data = load(make_cfg(tmp_path, [path], skip_bad_samples=True), tokenizer)
    r = data.report["x.parquet"]
    assert (r["samples"], r["skipped"]) == (2, 1) and r["skip_examples"][0].startswith(f"{path}: row 1: ")


def test_a_column_mapping_that_matches_nothing_lists_the_columns(tmp_path, tokenizer):
    path = write_dataset([{"question": "q", "solution": "a"}], tmp_path / "d" / "x.parquet", "parquet")
    with pytest.raises(DataError, match=r"^\S+x\.parquet: no column mapping matches the columns found "
                                        r"\(question, solution\); expected messages"):
        load(make_cfg(tmp_path, [path]), tokenizer)
    with pytest.raises(DataError, match=r"columns: 'answer' \(for answer\) is not a column; columns found: "
                                        r"question, solution"):
        load(make_cfg(tmp_path, [{"path": path, "columns": {"prompt": "question", "answer": "answer"}}]), tokenizer)
    mapped = load(make_cfg(tmp_path, [{"path": path, "columns": {"prompt": "question", "answer": "solution"}}]),
                  tokenizer)
    reference = load(make_cfg(tmp_path, [jsonl(tmp_path / "j" / "x.jsonl", [{"prompt": "q", "answer": "a"}])]),
                     tokenizer)
    assert rows_of(mapped) == rows_of(reference)


def test_one_format_per_task_directory_and_entry_checks(tmp_path, tokenizer):
    jsonl(tmp_path / "mix" / "a.jsonl", chat_rows(1))
    write_dataset(chat_rows(1), tmp_path / "mix" / "b.parquet", "parquet")
    with pytest.raises(DataError, match=r"mix: holds \*\.jsonl and \*\.parquet files: one format per task"):
        load(make_cfg(tmp_path, [str(tmp_path / "mix")]), tokenizer)
    # a .json file beside *.jsonl is left alone, as MFTCoder's glob leaves it (e.g. dataset_info.json)
    (tmp_path / "j" / "info.json").parent.mkdir(parents=True, exist_ok=True)
    jsonl(tmp_path / "j" / "a.jsonl", chat_rows(2))
    (tmp_path / "j" / "info.json").write_text("{\"not\": \"data\"}")
    assert len(load(make_cfg(tmp_path, [str(tmp_path / "j")]), tokenizer).train) == 2
    for entry, message in [({"path": "x", "colums": {}}, r"unknown keys \['colums'\]"),
                           ({"path": "x", "columns": {"prompt": 1}}, "columns must map fields to column names"),
                           ({"split": "train"}, "an object with a \"path\"")]:
        with pytest.raises(ConfigError, match=message):
            make_cfg(tmp_path, [entry])
    with pytest.raises(ConfigError, match="split is for save_to_disk directories and Hub datasets only"):
        load(make_cfg(tmp_path, [{"path": str(tmp_path / "j"), "split": "train"}]), tokenizer)
