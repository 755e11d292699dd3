"""report_to: every tracker gets the scalars of metrics.jsonl, read back here from each tracker's own storage
(wandb offline: its .wandb log; MLflow: a file store; trackio: its local SQLite database; TensorBoard: its
event files), the config once, and a resumed run appends to the same tracker run; a tracker that raises
mid-run is one warning and the run goes on. Offline, nothing leaves the machine."""

import atexit
import glob
import json
import os
import shutil
import struct
import tempfile

import pytest

# trackio reads TRACKIO_DIR once, when it is first imported: a directory of this session, never ~/.cache.
TRACKIO_DIR = os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="mftcore-tests-trackio-"))
atexit.register(shutil.rmtree, TRACKIO_DIR, True)

from mftcore.config import TrainConfig  # noqa: E402
from mftcore.errors import ConfigError  # noqa: E402
from mftcore.train import train  # noqa: E402
from mftcore.trackers import MLFLOW_KEY, TRACKERS_FILE  # noqa: E402

ALL = ["tensorboard", "wandb", "mlflow", "trackio"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline in tmp_path, MLflow's file store in tmp_path, trackio in this test's own project."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("TRACKIO_PROJECT", f"mftcore-test-{os.path.basename(tmp_path)}")
    os.makedirs(tmp_path / "wandb")
    return tmp_path


def expected_tags(output_dir: str) -> dict:
    """{(step, tag): value} from metrics.jsonl, named as TensorBoard's tags (the README's list)."""
    out = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            split, step = r["split"], r["step"]
            for key, value in r.items():
                if key in ("step", "split"):
                    continue
                if isinstance(value, dict):
                    name = "loss" if key == "task_loss" else key.removeprefix("task_")
                    out.update({(step, f"{task}_{name}/{split}"): v for task, v in value.items()})
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[(step, f"{key}/{split}")] = value
    return out


def wandb_records(path: str):
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte header, 32 KiB blocks of chunks
    with a 7-byte header each: crc, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_logged(wandb_dir: str, run_id: str) -> tuple:
    """({(step, tag): value}, config) of every offline run directory of run_id (a resume adds one)."""
    logged, config = {}, {}
    # A run resumed in the same second as its first start gets the directory name with "-1" appended.
    runs = glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb")) \
        + glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}-*", f"run-{run_id}.wandb"))
    for path in sorted(runs):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        logged[(step, key)] = json.loads(item.value_json)
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return logged, config


def mlflow_logged(run_id: str, keys: set) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    logged = {(m.step, key): m.value for key in keys for m in client.get_metric_history(run_id, MLFLOW_KEY.sub("_", key))}
    return logged, client.get_run(run_id).data.params


def trackio_logged(project: str, name: str) -> tuple:
    from trackio.sqlite_storage import SQLiteStorage

    logged = {}
    for row in SQLiteStorage.get_logs(project, name):
        logged.update({(row["step"], k): v for k, v in row.items() if k not in ("step", "timestamp")})
    return logged, SQLiteStorage.get_run_config(project, name) or {}


def tensorboard_logged(tb_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def assert_same(logged: dict, expected: dict, rel: float = 1e-9) -> None:
    missing = sorted(set(expected) - set(logged))
    assert not missing, f"{len(missing)} values not logged, e.g. {missing[:5]}"
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=rel, abs=1e-12), key


def test_every_tracker_reads_back_what_metrics_jsonl_holds(tiny_config, offline, capsys):
    out = str(offline / "out")
    path, _ = tiny_config(output_dir=out, report_to=ALL, log_interval=1, max_train_steps=4, evaluation_steps=2,
                          eval_at_start=True, num_threads=1)
    train(TrainConfig.from_file(path))
    expected = expected_tags(out)
    splits = {tag.rsplit("/", 1)[1] for _, tag in expected}
    assert splits == {"train", "valid"} and len(expected) > 40
    assert {"loss/train", "lr/train", "grad_norm/train", "tokens_per_s/train", "memory_gb/train", "loss/valid", "accuracy/valid", "python_funcs_loss/valid",
            "sql_queries_tokens/train"} <= {tag for _, tag in expected}
    ids = json.load(open(os.path.join(out, TRACKERS_FILE)))
    assert set(ids) == {"wandb", "mlflow", "trackio"}

    logged, config = wandb_logged(str(offline / "wandb"), ids["wandb"]["id"])
    assert_same(logged, expected)
    assert config["learning_rate"] == 3e-3 and config["report_to"] == ALL

    logged, params = mlflow_logged(ids["mlflow"]["run_id"], {tag for _, tag in expected})
    assert_same(logged, expected)
    assert json.loads(params["learning_rate"]) == 3e-3 and json.loads(params["max_train_steps"]) == 4

    logged, config = trackio_logged(ids["trackio"]["project"], ids["trackio"]["name"])
    assert_same(logged, expected)
    assert config.get("learning_rate") == 3e-3

    assert_same(tensorboard_logged(os.path.join(out, "tensorboard")), expected, rel=1e-6)  # float32 events
    assert "report_to" not in capsys.readouterr().out  # no tracker failed


def test_a_tracker_that_raises_mid_run_is_one_warning_and_the_run_finishes(tiny_config, offline, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    calls = []
    real = MlflowClient.log_batch

    def flaky(self, run_id, metrics=(), params=(), tags=(), **kw):
        if metrics:
            calls.append(1)
            if len(calls) >= 2:  # the second logged step: the server went away
                raise ConnectionError("mlflow server unreachable")
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    out = str(offline / "out")
    path, _ = tiny_config(output_dir=out, report_to=["mlflow", "tensorboard"], log_interval=1, max_train_steps=5,
                          num_threads=1)
    final = train(TrainConfig.from_file(path))
    printed = capsys.readouterr()
    text = printed.out + printed.err
    warnings = [line for line in text.replace("\r", "\n").splitlines() if "report_to 'mlflow' failed" in line]
    assert len(warnings) == 1 and "ConnectionError: mlflow server unreachable" in warnings[0]
    assert "training continues without it" in warnings[0]
    assert len(calls) == 2  # dropped after its failure: not called again
    assert os.path.isdir(final)
    steps = [r["step"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    assert_same(tensorboard_logged(os.path.join(out, "tensorboard")), expected_tags(out), rel=1e-6)


def test_a_resumed_run_appends_to_the_same_tracker_runs(tiny_config, offline):
    out = str(offline / "out")
    run = dict(output_dir=out, report_to=["wandb", "mlflow", "trackio"], log_interval=1, num_threads=1)
    path, _ = tiny_config(max_train_steps=3, **run)
    train(TrainConfig.from_file(path))
    first = json.load(open(os.path.join(out, TRACKERS_FILE)))
    path, _ = tiny_config(max_train_steps=5, **run)  # auto_resume: continues from checkpoint-3
    train(TrainConfig.from_file(path))
    assert json.load(open(os.path.join(out, TRACKERS_FILE))) == first
    expected = expected_tags(out)
    assert max(step for step, _ in expected) == 5
    assert_same(wandb_logged(str(offline / "wandb"), first["wandb"]["id"])[0], expected)
    assert_same(mlflow_logged(first["mlflow"]["run_id"], {tag for _, tag in expected})[0], expected)
    assert_same(trackio_logged(first["trackio"]["project"], first["trackio"]["name"])[0], expected)


def test_a_missing_tracker_library_is_one_config_error_before_anything_loads(tiny_config, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    path, _ = tiny_config(report_to=["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match=r"^report_to: 'wandb' needs the wandb package: "
                                          r"pip install \"mftcore\[wandb\]\"$"):
        train(TrainConfig.from_file(path))
    assert not os.path.exists(os.path.join(tmp_path, "out", "metrics.jsonl"))


@pytest.mark.parametrize("value, message", [
    ("comet", "'comet' is not supported"), (["none", "wandb"], "\"none\" cannot be combined"),
    (7, "expected a string or a list of strings")])
def test_report_to_is_validated(tiny_config, value, message):
    path, _ = tiny_config(report_to=value)
    with pytest.raises(ConfigError, match=f"report_to: .*{message}"):
        TrainConfig.from_file(path)


def test_report_to_none_writes_metrics_jsonl_only(tiny_config, tmp_path):
    path, cfg = tiny_config(report_to="none", max_train_steps=2, num_threads=1)
    train(TrainConfig.from_file(path))
    assert not os.path.exists(os.path.join(cfg["output_dir"], "tensorboard"))
    assert not os.path.exists(os.path.join(cfg["output_dir"], TRACKERS_FILE))
    assert len(open(os.path.join(cfg["output_dir"], "metrics.jsonl")).readlines()) == 1


def test_benchmark_records_reach_the_trackers_and_other_ranks_log_nothing(offline):
    """Metrics.write is the one place: a pass@k record (eval_benchmarks') goes to MLflow as `pass_1/NAME`
    (MLflow refuses `@`); a rank other than 0 (enabled=False) starts no tracker and writes no file."""
    from mftcore.metrics import Metrics

    silent = Metrics(str(offline / "rank1"), None, total_steps=2, enabled=False, report_to=["mlflow"], config={})
    silent.write(1, "train", {"loss": 1.0}, {"a": 1.0})
    silent.close()
    assert not os.path.exists(offline / "rank1")

    metrics = Metrics(str(offline / "rank0"), None, total_steps=2, report_to=["mlflow"], config={"seed": 7})
    metrics.write(1, "train", {"loss": 1.5, "mfu": None}, {"a": 1.25}, {"task_weight": {"a": 1.0}})
    metrics.write(2, "he", {"pass@1": 0.25, "problems": 4}, {}, {"task_pass@1": {"py": 0.5}})
    metrics.close()
    run_id = json.load(open(offline / "rank0" / TRACKERS_FILE))["mlflow"]["run_id"]
    logged, params = mlflow_logged(run_id, {"loss/train", "mfu/train", "a_loss/train", "a_weight/train",
                                            "pass@1/he", "problems/he", "py_pass@1/he"})
    assert logged == {(1, "loss/train"): 1.5, (1, "a_loss/train"): 1.25, (1, "a_weight/train"): 1.0,
                      (2, "pass@1/he"): 0.25, (2, "problems/he"): 4.0, (2, "py_pass@1/he"): 0.5}
    assert params == {"seed": "7"}
