"""The scale-out pieces that need no second process: engine choice, the DeepSpeed config filled from
ours, placeholder batches for ranks whose share is empty, sharded evaluation counts, the one-process
engine path (a process group of one), and `mftcore export` of a one-process checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from mftcore import parallel
from mftcore.cli import main
from mftcore.config import TrainConfig
from mftcore.data import StepLoader, collate_padded, load_tasks
from mftcore.data.batch import empty_batch
from mftcore.errors import ConfigError
from mftcore.evaluate import batched
from mftcore.model.load import load_tokenizer
from mftcore.model.loss_model import LossModel
from mftcore.parallel.deepspeed import fill_deepspeed_config
from mftcore.train import train
from tests.helpers.engine import engine_config, read_metrics, tensors, write_config
from tests.helpers.paths import DATA, ROOT, TINY_MODEL, TOKENIZER

BASE = {"data_paths": DATA, "tokenizer_path": TOKENIZER, "model_config": TINY_MODEL,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}


def config(**updates) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **updates})


def test_engine_choice_defaults_and_spellings():
    assert parallel.choose_engine(config(), 1) == "none"
    assert parallel.choose_engine(config(), 4) == "ddp"  # runs every model and peft_type
    assert parallel.choose_engine(config(deepspeed_config={}), 1) == "deepspeed"
    assert config(distributed_type="FSDP").distributed_type == "fsdp"  # MFTCoder's spellings
    assert config(distributed_type="DeepSpeed").distributed_type == "deepspeed"


@pytest.mark.parametrize("updates, world, message", [
    ({"distributed_type": "none"}, 2, "distributed_type: \"none\" runs one process, but WORLD_SIZE=2"),
    ({"distributed_type": "fsdp", "deepspeed_config": {}}, 2, "deepspeed_config: set, but distributed_type is 'fsdp'"),
    ({"distributed_type": "fsdp", "peft_type": "qlora", "pretrained_model_path": "m"}, 2, "cannot shard 4-bit"),
    ({"distributed_type": "fsdp", "mixed_precision": "fp16"}, 2, "mixed_precision: fp16"),
])
def test_engine_choice_refuses_contradictions(updates, world, message):
    with pytest.raises(ConfigError, match=message):
        parallel.choose_engine(config(**updates), world)


def test_unknown_engine_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="distributed_type: 'megatron' is not supported"):
        parallel.choose_engine(config(distributed_type="megatron"), 1)
    with pytest.raises(ConfigError, match="deepspeed_config: expected a string, an object or null, got 3"):
        config(deepspeed_config=3)


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.json", 2), ("deepspeed_zero3.json", 3)])
def test_shipped_deepspeed_configs_are_filled_from_ours(name, stage):
    cfg = config(deepspeed_config=os.path.join(ROOT, "configs", name), max_grad_norm=0.5)
    ds = fill_deepspeed_config(cfg, world_size=8, dtype=torch.bfloat16, hidden_size=4096)
    sizes = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert sizes == (4, 2, 64)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and zero["reduce_bucket_size"] == 4096 * 4096
    assert "auto" not in json.dumps(ds)
    assert not fill_deepspeed_config(cfg, 1, torch.float32, 64)["bf16"]["enabled"]  # CPU: fp32


@pytest.mark.parametrize("ds, message", [
    ({"train_micro_batch_size_per_gpu": 2},
     "train_micro_batch_size_per_gpu: 2 contradicts per_device_train_batch_size = 4"),
    ({"train_batch_size": 32}, "train_batch_size: 32 contradicts per_device_train_batch_size x gradient_accumulation"),
    ({"gradient_clipping": 2.0}, "gradient_clipping: 2.0 contradicts max_grad_norm = 1.0"),
    ({"bf16": {"enabled": True}},
     "bf16.enabled: True contradicts mixed_precision='auto' \\(float32 on this machine\\)"),
    ({"optimizer": {"type": "Adam"}}, "optimizer: mftcore passes its own AdamW"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler: mftcore passes its own"),
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage: 1 is not supported"),
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}},
     "zero_optimization.sub_group_size: \"auto\" is filled"),
])
def test_deepspeed_contradictions_are_one_line_errors_naming_the_key(ds, message):
    with pytest.raises(ConfigError, match=message) as e:
        fill_deepspeed_config(config(deepspeed_config=ds), world_size=2, dtype=torch.float32, hidden_size=64)
    assert str(e.value).startswith("deepspeed_config: ") and "\n" not in str(e.value)


def test_deepspeed_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(ConfigError, match=f"{bad}:3: invalid JSON"):
        fill_deepspeed_config(config(deepspeed_config=str(bad)), 2, torch.float32, 64)
    with pytest.raises(ConfigError, match="deepspeed_config: .*nowhere.json: file not found"):
        fill_deepspeed_config(config(deepspeed_config=str(tmp_path / "nowhere.json")), 2, torch.float32, 64)
    qlora = config(deepspeed_config={"zero_optimization": {"stage": 3}}, peft_type="qlora", pretrained_model_path="m")
    with pytest.raises(ConfigError, match="QLoRA's 4-bit weights run under ZeRO stage 2 only"):
        fill_deepspeed_config(qlora, 2, torch.float32, 64)


def test_every_rank_gets_as_many_micro_batches_and_a_placeholder_where_its_share_is_empty(tokenizer):
    cfg = config(data_split="6.5,2,91.5")  # 33 train samples: global micro-batches of 8 leave 1 at the end
    data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id, progress=False)
    assert len(data.train) == 33
    steps = []
    for rank in (0, 1):
        loader = StepLoader(data.train, batch_size=4, accumulation=2, pad_id=0, seed=1, rank=rank, world_size=2)
        it = iter(loader)
        steps.append([next(it)[1] for _ in range(loader.steps_per_epoch())])
    assert [len(s) for s in steps[0]] == [len(s) for s in steps[1]] == [2, 2, 1]
    last = steps[1][-1][0]
    assert last.num_tokens == 0 and (last.labels == -100).all() and last.attention_mask.all()
    assert steps[0][-1][0].num_tokens > 0
    real = sum(int((b.task_ids >= 0).any(dim=1).sum()) for s in steps for step in s for b in step)
    assert real == 33  # every sample once per epoch over the ranks


def test_a_placeholder_adds_exactly_nothing_to_loss_or_gradient():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    out = LossModel(model, 3)(empty_batch(7), token_scale=torch.zeros(1))
    out.loss.backward()
    assert out.loss.item() == 0 and out.task_token_count.sum() == 0
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_sharded_evaluation_gives_each_rank_as_many_batches():
    class Sample:
        def __init__(self, i):
            self.input_ids, self.loss_mask, self.task_id = [1, 2, i], [0, 1, 1], i % 2

    samples = [Sample(i) for i in range(12)]  # 3 batches of 5: rank 0 gets two, rank 1 one and a placeholder
    shares = [list(batched(samples, 5, 0, rank, 2)) for rank in (0, 1)]
    assert [len(s) for s in shares] == [2, 2]
    assert [b.input_ids.shape[0] for b in shares[0]] == [5, 2] and shares[1][1].num_tokens == 0
    assert sum(b.num_tokens for s in shares for b in s) == sum(b.num_tokens for b in batched(samples, 5, 0))


def test_one_process_fsdp_run_and_its_resume_rules(tmp_path):
    """distributed_type fsdp without torchrun: a process group of one, in a process of its own (a process
    group's threads outlive it, and this test process forks tokenizer workers later); the losses are the
    plain run's; a one-process ("hf") checkpoint cannot resume under FSDP, whose format differs."""
    plain = train(engine_config(tmp_path / "plain", max_train_steps=2, checkpointing_steps=1))
    cfg = write_config(tmp_path / "fsdp.json", tmp_path / "fsdp", max_train_steps=2, distributed_type="fsdp")
    run = [sys.executable, "-m", "mftcore", "train", cfg]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = [r["loss"] for r in read_metrics(tmp_path / "plain", "train")]
    assert [r["loss"] for r in read_metrics(tmp_path / "fsdp", "train")] == pytest.approx(want, rel=1e-6)
    assert tensors(tmp_path / "fsdp" / "final").keys() == tensors(plain).keys()
    assert (tmp_path / "fsdp" / "checkpoint-2" / "dcp" / ".metadata").is_file()
    proc = subprocess.run(run + [f"resume_from_checkpoint={tmp_path / 'plain' / 'checkpoint-1'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "checkpoint-1 was saved by a one-process or ddp run, this run uses distributed_type 'fsdp' (export it with "
        "`mftcore export` to change engines)")


def test_export_of_a_one_process_checkpoint_and_its_errors(tmp_path, monkeypatch, capsys):
    cfg = engine_config(tmp_path / "out", max_train_steps=2, checkpointing_steps=2)
    final = train(cfg)
    assert main(["export", str(tmp_path / "out" / "checkpoint-2"), str(tmp_path / "exported")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", use_safetensors=True)
    want = tensors(final)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    # The exported tokenizer scores like the trained one (same chat template, same ids).
    tok = load_tokenizer(cfg)
    batch = collate_padded(load_tasks(cfg, tok, tok.eos_token_id, progress=False).valid, tok.eos_token_id)
    assert batch.input_ids.numel() > 0

    assert main(["export", str(tmp_path / "out"), str(tmp_path / "x")]) == 2
    assert "export: " in capsys.readouterr().err and not (tmp_path / "x").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**BASE, "output_dir": str(tmp_path / "o"), "distributed_type": "none"}))
    assert main(["train", str(path)]) == 2
    assert "distributed_type: \"none\" runs one process" in capsys.readouterr().err
