"""The trainer's features on tiny models: LoRA/QLoRA/full, precision, activation checkpointing, MoE
auxiliary loss, evaluation with accuracy, early stopping, non-finite steps, metrics, loading safety."""

import json
import math
import os
import shutil
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mftcore import train as train_module
from mftcore.data import collate_padded, load_tasks
from mftcore.errors import ConfigError, TrainingError
from mftcore.metrics import attention_width, matmul_params, step_flops
from mftcore.model import loss_model as loss_model_module
from mftcore.model.build import build_model
from mftcore.model.decoder import causal_lm, run_decoder
from mftcore.model.load import load_tokenizer
from mftcore.model.moe import moe_spec, router_aux_loss
from mftcore.train import train
from tests.helpers.engine import InfGradient, engine_config, read_metrics, save_tiny_pretrained, tensors
from tests.helpers.paths import TINY_MODEL

CPU = torch.device("cpu")


def test_lora_trains_only_adapters_and_saves_a_plain_peft_adapter(tmp_path, tiny_pretrained):
    from peft import PeftModel

    cfg = engine_config(tmp_path / "out", pretrained_model_path=tiny_pretrained, peft_type="lora", lora_rank=4,
                        max_train_steps=3, evaluation_steps=3, learning_rate=1e-2)
    final = train(cfg)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(os.listdir(final))
    adapter = tensors(final, "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # "all-linear": q,k,v,o,gate,up,down
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    assert json.load(open(os.path.join(final, "adapter_config.json")))["r"] == 4
    # Plain peft reproduces the logged validation loss (and so the frozen base was not touched).
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pretrained), final)
    tok = load_tokenizer(cfg)
    valid = load_tasks(cfg, tok, tok.eos_token_id).valid
    batch = collate_padded(valid, tok.eos_token_id)
    with torch.no_grad():
        got = loss_model_module.batch_loss(model.eval(), batch, 3, reduction="task_mean").loss.item()
    assert got == pytest.approx(read_metrics(cfg.output_dir, "valid")[-1]["loss"], rel=1e-5)


def test_activation_checkpointing_is_on_by_default_and_configurable(tmp_path, tiny_pretrained):
    assert build_model(engine_config(tmp_path), 945, CPU).model.gradient_checkpointing  # the default
    assert not build_model(engine_config(tmp_path, gradient_checkpointing=False), 945, CPU).model.gradient_checkpointing
    lora = build_model(engine_config(tmp_path, pretrained_model_path=tiny_pretrained, peft_type="lora"), 945, CPU)
    assert causal_lm(lora).model.gradient_checkpointing


def test_qlora_quantizes_to_nf4_with_the_configured_compute_dtype_and_trains(tmp_path, tiny_pretrained):
    import bitsandbytes as bnb

    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = build_model(engine_config(tmp_path, pretrained_model_path=tiny_pretrained, peft_type="qlora",
                                          mixed_precision=precision), 945, CPU)
        q_proj = causal_lm(model).model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
        assert q_proj.base_layer.weight.quant_type == "nf4" and q_proj.base_layer.weight.compress_statistics
        assert q_proj.base_layer.compute_dtype == dtype
    cfg = engine_config(tmp_path / "out", pretrained_model_path=tiny_pretrained, peft_type="qlora", lora_rank=4,
                        max_train_steps=3, learning_rate=1e-2)
    final = train(cfg)
    losses = [r["loss"] for r in read_metrics(cfg.output_dir, "train")]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert "adapter_model.safetensors" in os.listdir(final)


def test_half_precision_autocasts_the_matmuls_and_keeps_fp32_master_weights(tmp_path):
    first_loss = {}
    for precision in ("fp32", "bf16", "fp16"):
        cfg = engine_config(tmp_path / precision, mixed_precision=precision, max_train_steps=1,
                            per_device_train_batch_size=4)
        final = train(cfg)
        first_loss[precision] = read_metrics(cfg.output_dir, "train")[0]["loss"]
        assert all(t.dtype == torch.float32 for t in tensors(final).values())
        # fp16 steps through a loss scaler, whose scale is part of the checkpoint.
        assert os.path.isfile(tmp_path / precision / "checkpoint-1" / "scaler.pt") == (precision == "fp16")
    for half in ("bf16", "fp16"):
        assert first_loss[half] != first_loss["fp32"]  # half-precision matmuls round differently...
        assert first_loss[half] == pytest.approx(first_loss["fp32"], rel=1e-2)  # ...but compute the same thing


@pytest.mark.parametrize("model_config", [
    {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
    {"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
     "shared_expert_intermediate_size": 64},
])
def test_moe_aux_loss_is_hf_load_balancing_loss_times_coef(model_config):
    spec = {**TINY_MODEL, "hidden_size": 64, "intermediate_size": 128, **model_config}
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=100, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    moe = moe_spec(config, coef=0.05)
    assert (moe.num_experts, moe.top_k, moe.coef) == (4, 2, 0.05)
    assert moe_spec(config).coef == config.router_aux_loss_coef and moe_spec(config, coef=0) is None
    batch = collate_padded([type("S", (), {"input_ids": list(range(1, n)), "loss_mask": [1] * (n - 1), "task_id": 0})()
                            for n in (9, 6)], 0)
    hf = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
    out = run_decoder(model, batch, output_router_logits=True)
    aux = router_aux_loss(out.router_logits, moe, batch.attention_mask)
    assert aux.item() == pytest.approx(0.05 * hf.aux_loss.item(), rel=1e-6)
    aux.backward()
    router = [p for n, p in model.named_parameters() if n.endswith("gate.weight")][0]
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_moe_training_adds_the_aux_loss(tmp_path):
    mixtral = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
               "max_position_embeddings": 256}
    cfg = engine_config(tmp_path, model_config=mixtral, router_aux_loss_coef=0.1, max_train_steps=1,
                        per_device_train_batch_size=4)
    train(cfg)
    rec = read_metrics(cfg.output_dir, "train")[0]
    assert rec["aux_loss"] > 0.1  # 0.1 x a load-balancing loss that is about top_k = 2 near balance


def test_evaluation_accuracy_early_stopping_and_best_kept(tmp_path, monkeypatch):
    # Accuracy is counted by the fused loss in its own pass (no logits built for it): checked below
    # against argmax of the HF model's logits.
    # lr 0: the weights never change, so no evaluation after the first improves: stall 1, 2 -> stop at 3.
    cfg = engine_config(tmp_path / "out", learning_rate=0.0, min_lr=0.0, max_train_steps=10, evaluation_steps=1,
                        checkpointing_steps=1, early_stopping_stall_num=2, saving_limit=1)
    final = train(cfg)
    valid = read_metrics(cfg.output_dir, "valid")
    assert [r["step"] for r in valid] == [1, 2, 3]
    assert sorted(n for n in os.listdir(cfg.output_dir) if n.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-3"]
    assert json.load(open(tmp_path / "out" / "checkpoint-3" / "trainer_state.json"))["early_stopped"] is True
    # Per-task loss and accuracy against plain transformers logits of the (unchanged) model.
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = load_tokenizer(cfg)
    batch = collate_padded(load_tasks(cfg, tok, tok.eos_token_id).valid, tok.eos_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    valid_tok = batch.labels != -100
    for task_id, name in enumerate(("python_funcs", "sql_queries", "shell_commands")):
        sel = valid_tok & (batch.task_ids == task_id)
        acc = (logits[sel].argmax(-1) == batch.labels[sel]).float().mean().item()
        ce = torch.nn.functional.cross_entropy(logits[sel], batch.labels[sel]).item()
        assert valid[-1]["task_accuracy"][name] == pytest.approx(acc, abs=1e-6)
        assert valid[-1]["task_loss"][name] == pytest.approx(ce, rel=1e-5)
        assert valid[-1]["task_tokens"][name] == sel.sum().item()


def test_non_finite_steps_are_skipped_counted_and_too_many_stop_the_run(tmp_path, monkeypatch):
    real, calls = loss_model_module.batch_loss, [0]

    def poisoned(*args, **kwargs):  # one micro-batch per step: call n is step n
        calls[0] += 1
        out = real(*args, **kwargs)
        if calls[0] == 2 or calls[0] >= 5:
            return out._replace(loss=out.loss * float("nan"))
        if calls[0] == 3:
            return out._replace(loss=InfGradient.apply(out.loss))
        return out

    monkeypatch.setattr(loss_model_module, "batch_loss", poisoned)  # what the trainer's LossModel calls
    cfg = engine_config(tmp_path / "out", max_train_steps=10, checkpointing_steps=4, max_consecutive_nonfinite=2)
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss .*checkpoint-7"):
        train(cfg)
    records = read_metrics(cfg.output_dir, "train")
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2, 3, 4, 5]
    assert math.isnan(records[1]["loss"]) and math.isfinite(records[2]["loss"])  # step 3: infinite gradient
    # Steps 5-7 were skipped: checkpoint-7 holds exactly the weights and optimizer state of checkpoint-4.
    out = tmp_path / "out"
    assert all(torch.equal(a, b) for a, b in zip(tensors(out / "checkpoint-4").values(),
                                                  tensors(out / "checkpoint-7").values()))
    opt4 = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    opt7 = torch.load(out / "checkpoint-7" / "optimizer.pt", weights_only=True)["state"]
    assert opt4[0]["step"] == opt7[0]["step"] == 2  # AdamW stepped at steps 1 and 4 only
    assert torch.equal(opt4[0]["exp_avg"], opt7[0]["exp_avg"])


def test_skips_are_counted_on_logging_and_checkpoint_steps_only(tmp_path, monkeypatch):
    """log_interval 3: the skip codes stay on the device until a logging step (3, 6) or a checkpoint (8)
    reads them; the counts and the stop are those of every step, not only of the steps that read them."""
    real, calls = loss_model_module.batch_loss, [0]

    def poisoned(*args, **kwargs):  # steps 2 and 5 onwards: a NaN loss
        calls[0] += 1
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if calls[0] == 2 or calls[0] >= 5 else out

    monkeypatch.setattr(loss_model_module, "batch_loss", poisoned)
    cfg = engine_config(tmp_path / "out", max_train_steps=12, checkpointing_steps=8, log_interval=3,
                        max_consecutive_nonfinite=2)
    with pytest.raises(TrainingError, match="4 steps in a row had a non-finite loss .*last at step 8.*checkpoint-8"):
        train(cfg)
    assert [(r["step"], r["skipped_steps"]) for r in read_metrics(cfg.output_dir, "train")] == [(3, 1), (6, 3)]
    with open(tmp_path / "out" / "checkpoint-8" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["skips"] == [[2, "loss"], [5, "loss"], [6, "loss"], [7, "loss"], [8, "loss"]]
    assert state["skipped_steps"] == 5 and state["nonfinite_in_a_row"] == 4


def test_fp16_overflow_skips_the_update_lowers_the_scale_and_never_stops_the_run(tmp_path, monkeypatch):
    """A loss scale of 2**40 overflows the fp16 backward: those updates are skipped, the scaler halves its
    scale each time until the gradients fit, and none of it counts as a non-finite step."""
    class HugeScaler(torch.amp.GradScaler):
        def __init__(self, device):
            super().__init__(device, init_scale=2.0 ** 40)

    monkeypatch.setattr(train_module.torch.amp, "GradScaler", HugeScaler)
    cfg = engine_config(tmp_path / "out", mixed_precision="fp16", max_train_steps=40, checkpointing_steps=40,
                        per_device_train_batch_size=2, max_consecutive_nonfinite=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    # A skipped update still advances the schedule, on purpose: torch's warning about the order is muted.
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    with open(tmp_path / "out" / "checkpoint-40" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["skipped_steps"] == 0 and state["nonfinite_in_a_row"] == 0
    assert 1 < state["overflow_steps"] < 40, state  # some updates overflowed, and then training went on
    scale = torch.load(tmp_path / "out" / "checkpoint-40" / "scaler.pt", weights_only=True)["scale"]
    assert scale <= 2.0 ** (40 - state["overflow_steps"])
    losses = [r["loss"] for r in read_metrics(cfg.output_dir, "train")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_metrics_throughput_mfu_memory_and_task_tokens(tmp_path):
    cfg = engine_config(tmp_path / "out", max_train_steps=2, peak_tflops=0.5, weighted_loss_mode="selfpaced",
                        selfpaced_history_length=1)
    train(cfg)
    first = read_metrics(cfg.output_dir, "train")[0]
    assert first["tokens_per_s"] > 0 and first["memory_gb"] > 0
    assert first["mfu"] == pytest.approx(first["tflops"] / 0.5, rel=1e-9)
    assert set(first["task_weight"]) == {"python_funcs", "sql_queries", "shell_commands"}
    tok = load_tokenizer(cfg)
    data = load_tasks(cfg, tok, tok.eos_token_id)
    from mftcore.data import StepLoader

    step1 = next(iter(StepLoader(data.train, batch_size=8, accumulation=1, pad_id=tok.eos_token_id, seed=cfg.seed)))[1]
    labels, tasks = step1[0].labels, step1[0].task_ids
    assert first["task_tokens"] == {n: float(((labels != -100) & (tasks == i)).sum())
                                    for i, n in enumerate(("python_funcs", "sql_queries", "shell_commands"))
                                    if ((labels != -100) & (tasks == i)).any()}


def test_flop_count_of_the_tiny_llama():
    config = AutoConfig.for_model(**{**TINY_MODEL, "vocab_size": 1000})
    model = AutoModelForCausalLM.from_config(config)
    per_layer = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 256  # q, o; k, v (2 kv heads); gate, up, down
    p_all = 2 * per_layer + 1000 * 128  # + LM head; the input embedding is a lookup
    assert matmul_params(model) == (p_all, p_all)
    assert attention_width(model) == (2, 128)
    # one document of 10 tokens: 6 * p per token (all trained) + 6 * layers * d * L^2
    assert step_flops(matmul_params(model), attention_width(model), 10, 100) == 10 * 6 * p_all + 6 * 2 * 128 * 100


def test_weights_only_from_safetensors_and_no_remote_code(tmp_path):
    base = save_tiny_pretrained(tmp_path / "base")
    binary = tmp_path / "bin_only"
    shutil.copytree(base, binary)
    sd = tensors(binary)
    os.remove(binary / "model.safetensors")
    torch.save(sd, binary / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pretrained_model_path: .*bin_only.*safetensors"):
        train(engine_config(tmp_path / "o1", pretrained_model_path=str(binary), model_config=None))

    custom = tmp_path / "custom"
    shutil.copytree(base, custom)
    config = json.load(open(custom / "config.json"))
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    json.dump(config, open(custom / "config.json", "w"))
    marker = tmp_path / "ran"
    (custom / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert engine_config(tmp_path).trust_remote_code is False
    with pytest.raises(ConfigError, match="trust_remote_code"):
        train(engine_config(tmp_path / "o2", pretrained_model_path=str(custom), model_config=None))
    assert not marker.exists()


@pytest.mark.parametrize("updates,message", [
    ({"peft_type": "prefix"}, "peft_type: 'prefix' is not supported"),
    ({"peft_type": "qlora"}, "peft_type: qlora adapts a pretrained model"),
    ({"quantization": "8bit"}, "quantization: '8bit' is not supported"),
    ({"quantization": "4bit"}, "quantization: .* set peft_type to \"qlora\""),
    ({"weighted_loss_mode": "coba", "task_weights": [1, 2, 3]}, "task_weights: .*'coba' computes"),
    ({"mixed_precision": "fp8"}, "mixed_precision: 'fp8' is not supported"),
    ({"saving_limit": 0}, "saving_limit: must be a positive integer"),
    ({"coba_history_length": 0}, "coba_history_length: must be a positive integer"),
])
def test_engine_config_errors_name_the_key(tmp_path, updates, message):
    with pytest.raises(ConfigError, match=message):
        engine_config(tmp_path, **updates)


def test_dynamic_weighting_needs_validation_data(tmp_path):
    with pytest.raises(ConfigError, match="data_split: weighted_loss_mode 'self-paced' needs validation data"):
        train(engine_config(tmp_path, weighted_loss_mode="self-paced", data_split="100,0,0"))
