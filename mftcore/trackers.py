"""Experiment trackers of `report_to` (HF Trainer's key and spellings): Weights & Biases, MLflow, trackio;
TensorBoard is written by mftcore/metrics.py itself. Each tracker imports its library when the run
starts, so none of them is a dependency of mftcore (each is an extra: pip install "mftcore[wandb]").

Every tracker gets the same scalars under the same names as TensorBoard (`scalar_tags`: `loss/train`,
`{task}_loss/valid`, `{task}_tokens/train`, `lr/train`, `pass@1/NAME`, ...; MLflow, which refuses `@`
and a few other characters in a key, gets them with `_` instead), and the run's config once (wandb and
trackio: the run config; MLflow: one param per key). Rank 0 only (Metrics is silent elsewhere).

A tracker that raises mid-run is reported once (one line naming it) and dropped: training, metrics.jsonl
and the other trackers go on. A resumed run appends to the same tracker run: the ids are kept in
output_dir/trackers.json (wandb: resume="allow" with the saved id; MLflow: the saved run id; trackio:
resume="allow" with the saved run name). Steps logged after the checkpoint by the stopped run are
logged again: MLflow and trackio keep both values of such a step; wandb drops values of a step lower
than the last one it saw for the run, with a warning of its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import secrets
import sys
import time

from mftcore.errors import ConfigError
from mftcore.io import atomic_write_json, read_json_object

TRACKERS_FILE = "trackers.json"  # in output_dir: the tracker runs' ids, for a resumed run to append to
PROJECT = "mftcore"  # the default project / experiment name (WANDB_PROJECT, TRACKIO_PROJECT, MLFLOW_EXPERIMENT_NAME)
CHOICES = ("tensorboard", "wandb", "mlflow", "trackio", "none")
# report_to name -> (module to import, pip extra of mftcore that installs it)
LIBRARIES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}


def tracker_names(report_to) -> list:
    """report_to (a name or a list of names) as a list without "none"."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in dict.fromkeys(names) if n != "none"]


def report_to_problem(report_to) -> str | None:
    """Why report_to is not valid, or None (config validation: names only, nothing is imported)."""
    names = [report_to] if isinstance(report_to, str) else report_to
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"expected a name or a list of names, got {report_to!r}"
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        return f"{unknown[0]!r} is not supported (choose from {', '.join(CHOICES)}, or a list of them)"
    if "none" in names and len(names) > 1:
        return f"\"none\" cannot be combined with trackers, got {report_to!r}"
    return None


def check_trackers(report_to) -> None:
    """Each tracker's library is installed (before anything loads; nothing is imported here)."""
    for name in tracker_names(report_to):
        if name in LIBRARIES and importlib.util.find_spec(LIBRARIES[name][0]) is None:
            module, extra = LIBRARIES[name]
            raise ConfigError(f"report_to: {name!r} needs the {module} package: pip install \"mftcore[{extra}]\"")


def scalar_tags(split: str, scalars: dict, task_loss: dict, task_values: dict) -> dict:
    """The scalars of one Metrics.write as {tag: number}, named as MFTCoder's TensorBoard tags; values that
    are not numbers (no MFU on CPU: None) are left out."""
    tags = {f"{key}/{split}": value for key, value in scalars.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
    tags.update({f"{task}_loss/{split}": value for task, value in task_loss.items()})
    for key, per_task in task_values.items():
        tags.update({f"{task}_{key.removeprefix('task_')}/{split}": value for task, value in per_task.items()})
    return tags


class Trackers:
    """The trackers of report_to other than TensorBoard, started for one run; `log` and `close` never raise
    (a failing tracker is reported once and dropped)."""

    def __init__(self, report_to, output_dir: str, config: dict, *, resumed: bool, say=print):
        self.say, self.active = say, []
        names = [n for n in tracker_names(report_to) if n in LIBRARIES]
        if not names:
            return
        check_trackers(names)
        ids_path = os.path.join(output_dir, TRACKERS_FILE)
        saved = read_json_object(ids_path) if resumed and os.path.isfile(ids_path) else {}
        run_name = os.path.basename(os.path.abspath(output_dir))
        ids = {}
        for name in names:
            try:
                tracker = TRACKER_CLASSES[name](output_dir, run_name, config, saved.get(name) or {})
            except Exception as e:  # e.g. wandb online without a login: the run goes on, the user is told
                self.report(name, e)
                continue
            self.active.append(tracker)
            ids[name] = tracker.ids
        atomic_write_json(ids_path, ids)

    def log(self, step: int, tags: dict) -> None:
        for tracker in list(self.active):
            try:
                tracker.log(step, tags)
            except Exception as e:  # a tracker's own failure (network, disk, a library bug): not the run's
                self.drop(tracker, e)

    def close(self) -> None:
        for tracker in list(self.active):
            try:
                tracker.close()
            except Exception as e:
                self.drop(tracker, e)
        self.active = []

    def drop(self, tracker, error: Exception) -> None:
        self.active.remove(tracker)
        self.report(tracker.name, error)

    def report(self, name: str, error: Exception) -> None:
        message = " ".join(str(error).split())[:300] or type(error).__name__
        self.say(f"mftcore: warning: report_to {name!r} failed ({type(error).__name__}: {message}); "
                 f"training continues without it (metrics.jsonl has every value)")


class WandbTracker:
    """Weights & Biases: WANDB_PROJECT (default "mftcore"), WANDB_MODE=offline, WANDB_DIR as wandb reads them."""

    name = "wandb"

    def __init__(self, output_dir: str, run_name: str, config: dict, saved: dict):
        import wandb

        run_id = saved.get("id") or secrets.token_hex(4)  # wandb's ids: lower-case letters and digits
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, id=run_id,
                              resume="allow", config=config, dir=os.environ.get("WANDB_DIR", output_dir))
        self.ids = {"id": run_id}

    def log(self, step: int, tags: dict) -> None:
        self.run.log(tags, step=step)

    def close(self) -> None:
        self.run.finish()


MLFLOW_KEY = re.compile(r"[^\w./\- :]")  # MLflow accepts letters, digits, _ . / - space and : in a key
MLFLOW_PARAM_CHARS = 6000  # MLflow's longest param value


class MlflowTracker:
    """MLflow: MLFLOW_TRACKING_URI (default: a file store in output_dir/mlruns) and MLFLOW_EXPERIMENT_NAME
    (default "mftcore")."""

    name = "mlflow"

    def __init__(self, output_dir: str, run_name: str, config: dict, saved: dict):
        uri = saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") \
            or "file://" + os.path.join(os.path.abspath(output_dir), "mlruns")
        if uri.startswith("file:"):  # MLflow 3 asks for this opt-in to its (still supported) file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [Param(MLFLOW_KEY.sub("_", k), json.dumps(v, default=str)[:MLFLOW_PARAM_CHARS])
                      for k, v in config.items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.ids = {"run_id": self.run_id, "tracking_uri": uri}

    def log(self, step: int, tags: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(MLFLOW_KEY.sub("_", k), float(v), now, step)
                                                    for k, v in tags.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    """trackio (local by default, in TRACKIO_DIR): TRACKIO_PROJECT (default "mftcore")."""

    name = "trackio"

    def __init__(self, output_dir: str, run_name: str, config: dict, saved: dict):
        import trackio

        self.project = saved.get("project") or os.environ.get("TRACKIO_PROJECT", PROJECT)
        self.run_name = saved.get("name") or f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        with contextlib.redirect_stdout(io.StringIO()):  # its banner of seven lines; ours is one
            self.run = trackio.init(project=self.project, name=self.run_name, config=config, resume="allow",
                                    auto_log_cpu=False, auto_log_gpu=False)
        print(f"trackio: project {self.project!r}, run {self.run_name!r} (trackio show --project "
              f"\"{self.project}\")", file=sys.stderr)
        self.ids = {"project": self.project, "name": self.run_name}

    def log(self, step: int, tags: dict) -> None:
        self.run.log(tags, step=step)

    def close(self) -> None:
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):
            if trackio.context_vars.current_run.get() is self.run:  # else trackio's atexit finishes it again
                trackio.finish()
            else:
                self.run.finish()


TRACKER_CLASSES = {"wandb": WandbTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker}
