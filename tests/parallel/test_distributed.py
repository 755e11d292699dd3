"""Multi-process training on CPU (gloo, 2 processes): DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 give the
losses of one process with the same global batch (fp32, to 1e-5), continue the same curve when resumed
from their checkpoints, and export a model that plain transformers loads; LoRA under FSDP2 and QLoRA
under ZeRO-2 too, on packed rows.

All distributed runs share one torchrun launch (tests/distributed_runs.py): starting 2 processes that
import torch, transformers and DeepSpeed is most of the cost here. The data are cut so that the
epoch's last global micro-batch holds one sample (rank 1 runs a placeholder batch there) and the
validation set splits unevenly over the ranks; CoBa weights the tasks, so the sharded evaluation and
the validation sampler feed every step. DeepSpeed builds two small C++ ops on first use (its CPU
communication op and CPU Adam: about 50 s together on a shared 2-core machine, cached under
~/.cache/torch_extensions).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from mftcore.cli import main
from mftcore.train import train
from tests.helpers.engine import engine_config, read_metrics, tensors, write_config
from tests.helpers.paths import ROOT

# 11 train samples per task (33 = 4 global micro-batches of 8, then 1), 4 valid per task (12 = 5 + 5 + 2).
# Tokenizing in-process: the launch's process group exists before the first run builds the data cache,
# and forking worker processes once its threads run is what distributed.join avoids in real runs.
RUN = dict(data_split="6.5,2,91.5", weighted_loss_mode="coba", coba_warmup_steps=2, coba_history_length=3,
           gradient_accumulation_steps=2, per_device_eval_batch_size=5, max_train_steps=4, checkpointing_steps=2,
           evaluation_steps=2, mixed_precision="fp32", tokenize_workers=1)
ENGINES = {
    "ddp": {"distributed_type": "ddp"},
    "fsdp": {"distributed_type": "fsdp"},
    "zero2": {"deepspeed_config": os.path.join(ROOT, "configs", "deepspeed_zero2.json")},
    # Inline, with parameters and optimizer offloaded to the CPU (DeepSpeedCPUAdam over our groups: DeepSpeed
    # refuses a torch optimizer there); the shipped ZeRO-3 file runs in the README test below.
    "zero3": {"deepspeed_config": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                         "offload_param": {"device": "cpu"}}}},
}
ADAPTERS = {  # name: (engine keys, adapter keys)
    "fsdp-lora": ({"distributed_type": "fsdp"}, {"peft_type": "lora"}),
    "zero2-qlora": ({"distributed_type": "deepspeed"}, {"peft_type": "qlora"}),
}
# Packed rows here: each rank takes its rows of every global micro-batch of rows.
ADAPTER_RUN = dict(lora_rank=4, lora_dropout=0.0, learning_rate=1e-2, weighted_loss_mode="case3", evaluation_steps=0,
                   padding_mode="pack")
RESUMED = ("ddp", "fsdp", "zero2", "zero3", "fsdp-lora")
# A code benchmark in every engine's run, split across the two ranks (synced generation, through FSDP2's
# and ZeRO-3's gathered weights): the curves stay those of the references, which evaluate none.
HUMANEVAL = os.path.join(ROOT, "examples", "benchmarks", "humaneval_tiny.jsonl")
BENCHMARKS = [{"name": "he", "file": HUMANEVAL, "every_steps": 2, "max_new_tokens": 6, "batch_size": 3, "workers": 1}]


def launch(args, cwd, timeout=420):
    """torchrun with these arguments; `python -m torch.distributed.run` is the torchrun script."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pretrained):
    """Every distributed run, in one launch; returns {name: output_dir}."""
    root = tmp_path_factory.mktemp("distributed")
    out, configs = {}, []
    for name, keys in ENGINES.items():
        out[name] = root / name
        configs.append(write_config(root / f"{name}.json", out[name], per_device_train_batch_size=4, **RUN, **keys,
                                    eval_benchmarks=BENCHMARKS))
    for name, (keys, adapter) in ADAPTERS.items():
        out[name] = root / name
        configs.append(write_config(root / f"{name}.json", out[name], per_device_train_batch_size=4,
                                    pretrained_model_path=tiny_pretrained, **{**RUN, **ADAPTER_RUN}, **adapter, **keys))
    for name in RESUMED:  # from checkpoint-2 of the run above, into a fresh directory
        with open(root / f"{name}.json") as f:
            cfg = json.load(f)
        out[f"{name}-resumed"] = root / f"{name}-resumed"
        cfg.update(output_dir=str(root / f"{name}-resumed"), resume_from_checkpoint=str(out[name] / "checkpoint-2"))
        (root / f"{name}-resumed.json").write_text(json.dumps(cfg))
        configs.append(str(root / f"{name}-resumed.json"))
    launch(["--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "tests", "helpers", "distributed_runs.py"), *configs],
           cwd=root)
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_pretrained):
    """The same runs in one process with the same global batch (8 = 2 ranks x 4)."""
    root = tmp_path_factory.mktemp("one-process")
    full = train(engine_config(root / "full", per_device_train_batch_size=8, **RUN))
    lora, qlora = (train(engine_config(root / kind, per_device_train_batch_size=8, peft_type=kind,
                                       pretrained_model_path=tiny_pretrained, **{**RUN, **ADAPTER_RUN}))
                   for kind in ("lora", "qlora"))
    return {"full": (root / "full", full), "fsdp-lora": (root / "lora", lora), "zero2-qlora": (root / "qlora", qlora)}


def curve(output_dir, split="train", keys=("loss", "grad_norm")):
    return [(r["step"], *(r[k] for k in keys)) for r in read_metrics(output_dir, split)]


def assert_close_curves(got, want, rel):
    assert [g[0] for g in got] == [w[0] for w in want]  # one record per step: rank 0 alone writes
    for g, w in zip(got, want):
        assert g[1:] == pytest.approx(w[1:], rel=rel), (g, w)


@pytest.mark.parametrize("name", list(ENGINES))
def test_engine_matches_one_process(runs, references, name):
    ref_dir, ref_final = references["full"]
    assert_close_curves(curve(runs[name]), curve(ref_dir), rel=1e-5)
    assert_close_curves(curve(runs[name], "valid", ("loss", "accuracy")), curve(ref_dir, "valid", ("loss", "accuracy")),
                        rel=1e-5)
    weights = [[list(r["task_weight"].values()) for r in read_metrics(d, "train")] for d in (runs[name], ref_dir)]
    assert weights[0] == [pytest.approx(w, rel=1e-5) for w in weights[1]] and weights[1][-1] != weights[1][0]
    # final/ is one HF model that plain transformers loads, with the weights of the one-process run.
    model = AutoModelForCausalLM.from_pretrained(runs[name] / "final", use_safetensors=True)
    want = tensors(ref_final)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=1e-4)  # 4 AdamW steps at lr 3e-3


@pytest.mark.parametrize("name", list(ENGINES))
def test_benchmarks_split_across_ranks(runs, name):
    """Each rank generated and ran its share; rank 0 logged the gathered result of all problems."""
    assert [(r["step"], r["problems"]) for r in read_metrics(runs[name], "he")] == [(2, 4), (4, 4)]
    with open(runs[name] / "benchmarks" / "he" / "step-4.jsonl") as f:
        results = [json.loads(line) for line in f]
    assert [r["task_id"] for r in results] == ["mft/0", "mft/1", "mft/2", "mft/3"]
    assert all(len(r["completions"]) == len(r["passed"]) == 1 for r in results)
    assert [r["step"] for r in read_metrics(runs[f"{name}-resumed"], "he")] == [4]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapters_match_one_process(runs, references, name):
    ref_dir, ref_final = references[name]
    assert_close_curves(curve(runs[name]), curve(ref_dir), rel=1e-5)
    got = tensors(runs[name] / "final", "adapter_model.safetensors")
    want = tensors(ref_final, "adapter_model.safetensors")
    assert got.keys() == want.keys() and all("lora_" in k for k in got)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", RESUMED)
def test_resumed_run_continues_the_curve(runs, name):
    """Restarted from checkpoint-2 (model, optimizer, schedule, data position, CoBa state, RNG per rank)."""
    resumed, full = curve(runs[f"{name}-resumed"]), curve(runs[name])
    assert [r[0] for r in resumed] == [3, 4]
    assert_close_curves(resumed, full[2:], rel=1e-6)
    weights = "adapter_model.safetensors" if "lora" in name else "model.safetensors"
    a, b = tensors(runs[f"{name}-resumed"] / "final", weights), tensors(runs[name] / "final", weights)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["fsdp", "zero2", "zero3", "fsdp-lora", "zero2-qlora"])
def test_export_turns_a_sharded_checkpoint_into_the_final_model(runs, tmp_path, tiny_pretrained, name):
    """`mftcore export checkpoint-4 OUT` (one process, from DCP shards or DeepSpeed's files) writes what
    the run's own final/ holds, which plain transformers (and peft, for an adapter) loads."""
    checkpoint = runs[name] / "checkpoint-4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["format"] == ("dcp" if name.startswith("fsdp") else "deepspeed") and state["world_size"] == 2
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), str(out)]) == 0
    weights = "adapter_model.safetensors" if "lora" in name else "model.safetensors"
    a, b = tensors(out, weights), tensors(runs[name] / "final", weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7)
    assert {"tokenizer.json", "mftcore_config.json"} <= set(os.listdir(out))
    if "lora" in name:
        from peft import PeftModel

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pretrained), out)
    else:
        AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)


def test_readme_torchrun_commands_run_as_written(tmp_path):
    """The README's launch lines, cut to two steps: the CLI under torchrun, tokenizing before the process
    group exists, the shipped ZeRO-3 JSON filled from tiny.json."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        block = re.search(r"<!-- torchrun-example -->\n```bash\n(.*?)```", f.read(), flags=re.S).group(1)
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert len(commands) == 2 and all(argv[0] == "torchrun" for argv in commands)
    for name in ("configs", "examples"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    for argv in commands:
        launch(argv[1:] + ["max_train_steps=2"], cwd=tmp_path)
    for out in ("output/tiny-fsdp", "output/tiny-zero3"):
        records = read_metrics(tmp_path / out)
        assert [(r["step"], r["split"]) for r in records] == [(2, "train"), (2, "valid")]
        AutoModelForCausalLM.from_pretrained(tmp_path / out / "final", use_safetensors=True)
