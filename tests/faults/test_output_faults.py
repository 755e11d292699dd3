"""Outputs that overlap inputs or runs: export, merge, generate, train and bench refuse, in one line and
before reading anything heavy, an output that is, contains or (existing) lies inside an input or a
training run directory, or that exists holding files mftcore did not write (mftcore/outputs.py); the
inputs are byte-for-byte untouched afterwards. A fresh path, or an earlier result of the same command,
is written."""

import json
import os
import shutil

import pytest

from tests.faults.harness import base_config, check_refused, check_succeeded, run_cli, snapshot, write_json


@pytest.fixture
def run(trained_run):
    return trained_run


def export_target(run, tmp_path, name):
    out, cfg = run["output_dir"], run["config"]
    if name == "unrelated-nonempty":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        return tmp_path / "mine"
    if name == "existing-file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file"
    return {"run-dir": out, "the-checkpoint": os.path.join(out, "checkpoint-3"),
            "another-checkpoint": os.path.join(out, "checkpoint-1"), "final": os.path.join(out, "final"),
            "data-dir": cfg["data_paths"][0], "parent-of-data": os.path.dirname(cfg["data_paths"][0]),
            "tokenizer": cfg["tokenizer_path"], "tensorboard": os.path.join(out, "tensorboard"),
            "empty-path": ""}[name]


EXPORT_REFUSED = [("run-dir", "contains the checkpoint"), ("the-checkpoint", "is the checkpoint"),
                  ("another-checkpoint", "training run directory"), ("final", "training run directory"),
                  ("tensorboard", "training run directory"), ("data-dir", "is the data path 1"),
                  ("parent-of-data", "contains the data path"), ("tokenizer", "is the tokenizer_path"),
                  ("unrelated-nonempty", "holds files mftcore did not write"), ("existing-file", "not a directory"),
                  ("empty-path", "empty path")]


@pytest.mark.parametrize("name,named", EXPORT_REFUSED, ids=[c[0] for c in EXPORT_REFUSED])
def test_export_refuses_an_output_over_an_input_or_a_run(run, tmp_path, capfd, name, named):
    target = export_target(run, tmp_path, name)
    before = snapshot(run["root"])
    kept = snapshot(target) if name == "unrelated-nonempty" else None
    outcome = run_cli(capfd, ["export", os.path.join(run["output_dir"], "checkpoint-3"), target])
    check_refused(outcome, "export", named)
    assert snapshot(run["root"]) == before, "an input or the run was changed"
    if kept is not None:
        assert snapshot(target) == kept


def test_export_writes_a_fresh_path_inside_the_run_then_refuses_to_replace_it(run, tmp_path, capfd):
    out = os.path.join(run["output_dir"], "step-3")
    try:
        check_succeeded(run_cli(capfd, ["export", os.path.join(run["output_dir"], "checkpoint-3"), out]))
        assert {"model.safetensors", "config.json", "mftcore_config.json"} <= set(os.listdir(out))
        check_refused(run_cli(capfd, ["export", os.path.join(run["output_dir"], "checkpoint-3"), out]),
                      "training run directory")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_export_replaces_its_own_earlier_result(run, tmp_path, capfd):
    ckpt = os.path.join(run["output_dir"], "checkpoint-3")
    check_succeeded(run_cli(capfd, ["export", ckpt, tmp_path / "exported"]))
    check_succeeded(run_cli(capfd, ["export", ckpt, tmp_path / "exported"]))


@pytest.fixture
def lora_run(tmp_path, tiny_pretrained):
    """The shape of a LoRA run's output_dir (metrics, a checkpoint, final/ with the adapter files): merge
    checks its flags before it loads anything, so the adapter need not be a trained one."""
    run = tmp_path / "lora-run"
    (run / "final").mkdir(parents=True)
    (run / "checkpoint-1").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    (run / "final" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (run / "checkpoint-1" / "trainer_state.json").write_text('{"step": 1}')
    return run


MERGE_REFUSED = [("run-dir", "contains the adapter"), ("adapter", "is the adapter"), ("base", "is the base model"),
                 ("parent-of-base", "contains the base model"), ("checkpoint", "training run directory")]


@pytest.mark.parametrize("name,named", MERGE_REFUSED, ids=[c[0] for c in MERGE_REFUSED])
def test_merge_refuses_an_output_over_an_input_or_a_run(lora_run, tiny_pretrained, tmp_path, capfd, name, named):
    base = tmp_path / "base"
    shutil.copytree(tiny_pretrained, base)
    target = {"run-dir": lora_run, "adapter": lora_run / "final", "base": base, "parent-of-base": tmp_path,
              "checkpoint": lora_run / "checkpoint-1"}[name]
    before = snapshot(tmp_path)
    outcome = run_cli(capfd, ["merge", "--base", base, "--adapter", lora_run / "final", "--out", target])
    check_refused(outcome, "--out", named)
    assert snapshot(tmp_path) == before


GENERATE_REFUSED = [("prompt-file", "is the prompt file"), ("inside-model", "exists inside the model"),
                    ("directory", "is a directory"), ("run-metrics", "training run directory")]


@pytest.mark.parametrize("name,named", GENERATE_REFUSED, ids=[c[0] for c in GENERATE_REFUSED])
def test_generate_refuses_an_output_over_an_input(run, tiny_pretrained, tmp_path, capfd, name, named):
    model = tmp_path / "model"
    shutil.copytree(tiny_pretrained, model)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    target = {"prompt-file": prompts, "inside-model": model / "config.json", "directory": tmp_path,
              "run-metrics": os.path.join(run["output_dir"], "metrics.jsonl")}[name]
    before = snapshot(tmp_path)
    outcome = run_cli(capfd, ["generate", "--model", model, "--file", prompts, "--output", target])
    check_refused(outcome, "--output", named)
    assert snapshot(tmp_path) == before


TRAIN_REFUSED = [("data-path", "lies inside the data path"), ("inside-data-path", "lies inside the data path"),
                 ("tokenizer-path", "is the tokenizer_path")]


@pytest.mark.parametrize("name,named", TRAIN_REFUSED, ids=[c[0] for c in TRAIN_REFUSED])
def test_train_refuses_an_output_dir_over_its_inputs(tmp_path, capfd, name, named):
    data = shutil.copytree(base_config(tmp_path)["data_paths"][0], tmp_path / "task")
    tok = shutil.copytree(base_config(tmp_path)["tokenizer_path"], tmp_path / "tok")
    out = {"data-path": data, "inside-data-path": data / "runs" / "a", "tokenizer-path": tok}[name]
    cfg = base_config(tmp_path, data_paths=[str(data)], tokenizer_path=str(tok), output_dir=str(out))
    path = write_json(tmp_path / "c.json", cfg)
    before = snapshot(tmp_path)
    check_refused(run_cli(capfd, ["train", path]), "output_dir", named)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["directory", "inside-run"])
def test_bench_refuses_a_json_path_over_a_run(run, tmp_path, capfd, name):
    target = tmp_path if name == "directory" else os.path.join(run["output_dir"], "metrics.jsonl")
    named = "is a directory" if name == "directory" else "training run directory"
    check_refused(run_cli(capfd, ["bench", "packing", "--quick", "--json", target]), "--json", named)


EVAL_REFUSED = [("benchmark-file", "is the benchmark"), ("inside-model", "exists inside the model"),
                ("run-metrics", "training run directory")]


@pytest.mark.parametrize("name,named", EVAL_REFUSED, ids=[c[0] for c in EVAL_REFUSED])
def test_eval_refuses_an_output_over_an_input(run, tiny_pretrained, tmp_path, capfd, name, named):
    """Refused before the benchmark is read or the model loaded (no sandbox run needed)."""
    from tests.helpers.paths import ROOT

    model = tmp_path / "model"
    shutil.copytree(tiny_pretrained, model)
    bench = tmp_path / "bench.jsonl"
    shutil.copy(os.path.join(ROOT, "examples", "benchmarks", "humaneval_tiny.jsonl"), bench)
    target = {"benchmark-file": bench, "inside-model": model / "config.json",
              "run-metrics": os.path.join(run["output_dir"], "metrics.jsonl")}[name]
    before = snapshot(tmp_path)
    outcome = run_cli(capfd, ["eval", model, "--benchmark", bench, "--output", target])
    check_refused(outcome, "--output", named)
    assert snapshot(tmp_path) == before
