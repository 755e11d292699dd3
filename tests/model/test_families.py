"""Model families: every family of the table trains one step through our train_step / batch_loss."""

import pytest
import torch
import torch.nn.functional as F

from mftcore.config import TrainConfig
from mftcore.data import collate_padded, load_tasks
from mftcore.errors import ConfigError
from mftcore.model.families import (
    FAMILIES,
    check_loss_compatible,
    decoder_layer_class,
    get_family,
    lora_target_modules,
    loss_options,
    resolve_eos_token,
)
from mftcore.model.load import load_model, load_tokenizer
from mftcore.model.loss_model import LossModel, batch_loss
from mftcore.optim import build_optimizer, build_scheduler
from mftcore.parallel import Engine
from mftcore.train import train_step
from tests.helpers.paths import DATA
from tests.helpers.tiny_models import TINY_CONFIGS, TOKENIZER


# transformers has no sdpa attention for Gemma2 (padded rows default to sdpa): its eager attention, which
# also applies its attention-logit soft-cap.
FAMILY_UPDATES = {"gemma2": {"attn_implementation": "eager"}}


def family_config(model_type: str, **updates) -> TrainConfig:
    raw = {"data_paths": DATA, "tokenizer_path": TOKENIZER, "model_config": TINY_CONFIGS[model_type],
           "model_type": model_type, "seq_length": 128, "learning_rate": 1e-2, "min_lr": 1e-3,
           "num_warmup_steps": 0, "max_grad_norm": 1.0, **FAMILY_UPDATES.get(model_type, {}), **updates}
    return TrainConfig.from_dict(raw)


@pytest.fixture(scope="module")
def batch():
    """Six padded samples of the three sample tasks (rows of different lengths, so padding is exercised)."""
    cfg = family_config("llama")
    tokenizer = load_tokenizer(cfg)
    data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id)
    return collate_padded(data.train[:6], tokenizer.eos_token_id), len(tokenizer)


def test_the_table_covers_the_issue_families():
    assert set(FAMILIES) == set(TINY_CONFIGS) == {
        "llama", "code_llama", "deepseek", "mistral", "mixtral", "qwen2", "qwen2_moe", "starcoder2",
        "gpt_bigcode", "gpt_neox", "phi", "gemma", "gemma2", "cohere"}
    assert get_family("starcoder") is FAMILIES["gpt_bigcode"] and get_family("Qwen2") is FAMILIES["qwen2"]


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_family_trains_one_step(model_type, batch):
    b, vocab = batch
    cfg = family_config(model_type)
    torch.manual_seed(0)
    model = load_model(cfg, vocab)

    # Our decoder + fused loss scores exactly what the HF model's own logits score: a family's logit
    # transform (Gemma2's soft-cap, Cohere's scale) is applied by the fused loss, not missed.
    model.eval()
    with torch.no_grad():
        ours = batch_loss(model, b, 3, reduction="token_mean").loss
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        ref = F.cross_entropy(logits.flatten(0, 1).float(), b.labels.flatten(), ignore_index=-100)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)

    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    res = train_step(Engine(LossModel(model, 3), model, optimizer), [b], scheduler, cfg, 3, None)
    assert torch.isfinite(res.loss) and torch.isfinite(res.grad_norm) and res.grad_norm > 0 and res.skip == 0
    assert res.task_token_count.sum() == (b.labels != -100).sum()
    changed = [not torch.equal(p0, p) for p0, p in zip(before, model.parameters())]
    assert sum(changed) >= 0.9 * len(changed), f"{sum(changed)}/{len(changed)} parameters moved"
    model.eval()
    with torch.no_grad():
        after = batch_loss(model, b, 3, reduction="token_mean").loss
    assert after < ours, (model_type, ours.item(), after.item())


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_decoder_layer_and_lora_targets(model_type, batch):
    from peft import LoraConfig, get_peft_model

    model = load_model(family_config(model_type), batch[1])
    layer = decoder_layer_class(model, model_type)
    assert sum(isinstance(m, layer) for m in model.modules()) == 2
    assert layer.__name__ in model._no_split_modules  # the class FSDP wrapping would also find

    targets = set(lora_target_modules(model_type))
    linear = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert targets <= linear and "lm_head" not in targets
    # Every linear layer but the LM head is a target, except MoE routers (gates of size 1 or #experts).
    assert linear - targets - {"lm_head"} <= {"shared_expert_gate", "gate"}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=sorted(targets)))
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert wrapped == targets


def test_model_type_must_match_the_checkpoint(batch):
    cfg = family_config("mistral", model_config=TINY_CONFIGS["llama"])
    with pytest.raises(ConfigError, match="model_type: 'mistral' expects a mistral checkpoint.*'llama'"):
        load_model(cfg, batch[1])


def test_remote_code_families_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="model_type: 'chatglm2' is not supported: MFTCoder runs it from model code"):
        TrainConfig.from_dict({"data_paths": DATA, "tokenizer_path": TOKENIZER, "model_type": "chatglm2",
                               "model_config": TINY_CONFIGS["llama"]})


def test_unknown_family_gets_generic_defaults():
    assert get_family("qwen3") is None and lora_target_modules("qwen3") == "all-linear"


def test_logit_transforms_become_fused_loss_options():
    from transformers import AutoConfig

    assert loss_options(AutoConfig.for_model("gemma2")) == {"softcap": 30.0}
    assert loss_options(AutoConfig.for_model("cohere")) == {"logit_scale": 0.0625}
    assert loss_options(AutoConfig.for_model("granite", logits_scaling=8.0)) == {"logit_scale": 0.125}
    assert loss_options(AutoConfig.for_model("gemma")) == {} == loss_options(AutoConfig.for_model("llama"))
    for name in ("gemma2", "cohere", "granite", "gemma"):
        check_loss_compatible(AutoConfig.for_model(name))
    with pytest.raises(ConfigError, match="logit_scale=-1.0"):
        check_loss_compatible(AutoConfig.for_model("cohere", logit_scale=-1.0))


@pytest.mark.parametrize("model_type", ["gemma2", "cohere"])
def test_the_transform_is_what_makes_the_loss_match(model_type, batch):
    """Without its soft-cap / scale the fused loss would not be the HF model's (the tiny configs make the
    transforms bind): so the one-step test's equality proves the options reach the loss."""
    b, vocab = batch
    model = load_model(family_config(model_type), vocab).eval()
    assert loss_options(model.config)
    with torch.no_grad():
        hidden = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                             position_ids=b.position_ids).last_hidden_state
        plain = F.cross_entropy(model.lm_head(hidden).flatten(0, 1).float(), b.labels.flatten())
        ours = batch_loss(model, b, 3, reduction="token_mean").loss
    assert abs(ours.item() - plain.item()) > 10 * 1e-5 * plain.item()  # 10x test_family_trains_one_step's rel


@pytest.mark.parametrize("model_type", ["gemma2", "cohere"])
def test_generation_runs_for_the_logit_transform_families(model_type, tmp_path):
    from mftcore.commands.generate import Sampling, generate_ids, load_generator
    from transformers import AutoTokenizer

    from tests.helpers.tiny_models import build_tiny

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    build_tiny(model_type, len(tok), seed=1).save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    gen = load_generator(str(tmp_path))
    prompts = [tok("def add(a, b):")["input_ids"], tok("SELECT")["input_ids"]]
    sampling = Sampling(max_new_tokens=5)
    batched = generate_ids(gen, prompts, sampling)
    assert batched == [generate_ids(gen, [p], sampling)[0] for p in prompts]
    assert all(len(a) <= 5 for a in batched) and any(batched)


def test_eos_falls_back_to_the_family_token(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": ["<eos>"]})
    tok.eos_token = None
    assert tok.eos_token is None
    assert resolve_eos_token(tok, "gemma") == "<eos>"
    assert resolve_eos_token(tok, "llama") is None  # "</s>" is not in this vocabulary
    tok.save_pretrained(tmp_path)
    cfg = family_config("gemma", tokenizer_path=str(tmp_path))
    assert load_tokenizer(cfg).eos_token == "<eos>"


def test_lora_defaults_to_the_family_targets():
    """target_modules null: the trainer's LoRA uses the family's targets (MoE routers left out)."""
    from mftcore.model.lora import lora_targets

    assert lora_targets(family_config("qwen2_moe")) == list(get_family("qwen2_moe").lora_targets)
    assert lora_targets(family_config("llama", target_modules="[q_proj,v_proj]")) == ["q_proj", "v_proj"]
    assert lora_targets(TrainConfig.from_dict({"data_paths": DATA, "tokenizer_path": TOKENIZER,
                                               "model_config": TINY_CONFIGS["llama"]})) == "all-linear"
