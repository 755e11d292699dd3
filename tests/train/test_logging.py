"""What a user reads while training: the logged loss (window mean) and step_loss, a fractional epoch,
eval_at_start's step-0 record, num_threads, and the progress bar showing the current step's values."""

import io
import json
import os
import stat

import pytest
import torch
from tqdm.auto import tqdm

from mftcore.config import TrainConfig
from mftcore.metrics import Metrics
from mftcore.train import train


def records(cfg, split):
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_loss_is_the_window_mean_and_eval_at_start_changes_nothing(tiny_config, tmp_path, capsys, monkeypatch):
    import mftcore.train
    from tests.helpers.paths import TINY_MODEL

    real_evaluate = mftcore.train.evaluate

    def evaluate_drawing_random_numbers(*args, **kwargs):  # as a sampling evaluation would: the restore is seen
        torch.rand(16)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(mftcore.train, "evaluate", evaluate_drawing_random_numbers)
    threads = torch.get_num_threads()
    dropout = {**TINY_MODEL, "attention_dropout": 0.1}  # training draws from the RNG after step 0
    path, _ = tiny_config(log_interval=1, output_dir=str(tmp_path / "every"), model_config=dropout)
    every = TrainConfig.from_file(path)
    train(every)
    path, _ = tiny_config(log_interval=5, output_dir=str(tmp_path / "window"), eval_at_start=True, num_threads=1,
                          model_config=dropout)
    window = TrainConfig.from_file(path)
    try:
        train(window)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    report = capsys.readouterr().out
    assert "CPU threads: 1 per process (num_threads)" in report
    for start in ("data: ", "steps: ", "validation: ", "outputs: "):  # the plan of the run (mftcore/data/plan.py)
        assert f"\n{start}" in report.replace("\r", "\n"), start

    each = records(every, "train")
    assert [r["loss"] for r in each] == [r["step_loss"] for r in each]  # a window of one step: its own loss
    logged = records(window, "train")
    assert [r["step"] for r in logged] == [5, 10]
    for r in logged:  # eval_at_start did not move training: the steps' losses are bitwise the same
        steps = each[r["step"] - 5:r["step"]]
        assert r["step_loss"] == steps[-1]["loss"]
        assert r["loss"] == pytest.approx(sum(s["loss"] for s in steps) / 5, rel=1e-6)
        assert r["loss"] != r["step_loss"]

    valid = records(window, "valid")
    assert [r["step"] for r in valid] == [0] and valid[0]["loss"] > logged[-1]["loss"]
    assert set(valid[0]["task_loss"]) == set(logged[0]["task_loss"])
    assert records(every, "valid") == []
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(c.output_dir, "final", "model.safetensors")) for c in (every, window))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # save_pretrained's model.safetensors is 0600 by itself; checkpoints and final/ follow the umask
    umask = os.umask(0)
    os.umask(umask)
    for d in ("final", "checkpoint-10"):
        mode = os.stat(os.path.join(window.output_dir, d, "model.safetensors")).st_mode
        assert stat.S_IMODE(mode) == 0o666 & ~umask, (d, oct(mode))


def test_epoch_is_logged_fractional(tiny_config):
    path, _ = tiny_config(log_interval=1, max_train_steps=4)
    cfg = TrainConfig.from_file(path)
    train(cfg)
    epochs = [r["epoch"] for r in records(cfg, "train")]
    assert isinstance(epochs[0], float) and 0 < epochs[0] < 1
    assert epochs == pytest.approx([round(k * epochs[0], 4) for k in range(1, 5)], abs=2e-4)


def test_progress_bar_shows_the_current_steps_values(tmp_path):
    metrics = Metrics(str(tmp_path), None, total_steps=3)
    metrics.bar.close()
    out = io.StringIO()
    metrics.bar = tqdm(total=3, file=out, mininterval=1e9)  # updates alone never redraw: only a refresh does
    metrics.advance(None)
    metrics.advance({"loss": "1.2345"})
    last = out.getvalue().split("\r")[-1]
    assert "2/3" in last and "loss=1.2345" in last
    metrics.advance({"loss": "0.5000"})
    last = out.getvalue().split("\r")[-1]
    assert "3/3" in last and "loss=0.5000" in last
    metrics.close()
