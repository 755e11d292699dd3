"""attn_implementation="mftcore_varlen" in HF models (CPU: the op's PyTorch reference; the same path on
the Triton kernels runs in tests/kernels/), and the config's attn_implementation resolution."""

import copy
import importlib.util
import json
import os

import pytest
import torch
import transformers.masking_utils
from transformers import AutoConfig, AutoModelForCausalLM

import mftcore.model.attention as attention
from mftcore.config import TrainConfig
from mftcore.data import Sample, collate_padded
from mftcore.data.batch import Batch
from mftcore.errors import ConfigError
from mftcore.model.decoder import decoder, hidden_states
from mftcore.model.load import resolve_attn_implementation

VOCAB = 97
FAMILIES = {  # tiny configs; rotary everywhere (GPT-NeoX: on a quarter of each head), GQA where the family has it
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "gpt_neox": dict(),
}


WINDOWED = {  # families with sliding windows (4 tokens, counting the current one) and Gemma2's logit softcap
    "mistral": dict(num_key_value_heads=2, sliding_window=4),
    "qwen2": dict(num_key_value_heads=2, sliding_window=4, use_sliding_window=True, max_window_layers=1,
                  num_hidden_layers=3),  # layers 1-2 slide, layer 0 attends fully
    "starcoder2": dict(num_key_value_heads=2, sliding_window=4),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=4, attn_logit_softcapping=2.0,
                   query_pre_attn_scalar=16, num_hidden_layers=3),  # layer_types: sliding, full, sliding
}


def make_models(family, other="sdpa", **overrides):
    """The same weights twice: mftcore_varlen and `other`."""
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    config = AutoConfig.for_model(family, **{**sizes, **FAMILIES.get(family, {}), **overrides})
    torch.manual_seed(0)
    # from_config keeps the config object: each model needs its own, or the second backend wins for both
    varlen = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="mftcore_varlen").eval()
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation=other).eval()
    sdpa.load_state_dict(varlen.state_dict())
    assert (varlen.config._attn_implementation, sdpa.config._attn_implementation) == ("mftcore_varlen", other)
    return varlen, sdpa


def packed_batch(docs) -> Batch:
    """One packed row, as the packing collator lays it out: positions restart at each document."""
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
    return Batch(ids, ids, ids, pos, cu, max(len(d) for d in docs))


def logits(model, batch):
    return model.lm_head(hidden_states(model, batch))


CASES = [(family, None) for family in FAMILIES] + [(family, "eager") for family in WINDOWED]


@pytest.mark.parametrize("family, other", CASES, ids=[f"{f}-{o or 'sdpa'}" for f, o in CASES])
def test_packed_row_gives_each_document_its_own_logits_and_gradients(family, other):
    """A packed row on mftcore_varlen against each document alone on sdpa, or, for the windowed families
    (windows of 4 tokens, documents up to 17) and Gemma2's softcap, on eager, which builds HF's own
    sliding-window masks per layer: outputs and parameter gradients."""
    varlen, sdpa = make_models(family, other or "sdpa", **WINDOWED.get(family, {}) if other else {})
    if family == "gemma2":
        assert varlen.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    torch.manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,)) for n in (9, 1, 17, 5)]
    packed = logits(varlen, packed_batch(docs))[0]
    probe = torch.randn_like(packed)
    start = 0
    for i, doc in enumerate(docs):
        part = slice(start, start + len(doc))
        if other:  # HF's own masks (sliding per layer): run_decoder's block-diagonal mask knows no window
            alone = sdpa.lm_head(decoder(sdpa)(input_ids=doc[None]).last_hidden_state)[0]
        else:
            alone = logits(sdpa, packed_batch([doc]))[0]
        torch.testing.assert_close(packed[part], alone, atol=1e-5, rtol=1e-5)
        # this document's loss alone, inside the packed row and outside: the same parameter gradients
        g_packed = torch.autograd.grad((packed[part] * probe[part]).sum(), list(varlen.parameters()),
                                       retain_graph=True, allow_unused=True)
        g_alone = torch.autograd.grad((alone * probe[part]).sum(), list(sdpa.parameters()), allow_unused=True)
        for a, b in zip(g_packed, g_alone):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{family} doc {i}: {m}")
        start += len(doc)


def test_padded_batch_matches_sdpa_with_its_mask():
    varlen, sdpa = make_models("llama")
    samples = [Sample(list(range(3, 3 + n)), [1] * n, task_id=0) for n in (12, 4, 9)]
    batch = collate_padded(samples, pad_id=0)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(hidden_states(varlen, batch)[real], hidden_states(sdpa, batch)[real])


def test_batch_segments_reach_every_layer_without_a_mask_or_host_reads(monkeypatch):
    """Each layer gets the Batch's own cu_seqlens tensor and host int; transformers builds no mask and
    never runs its packed-sequence detection (which reads a tensor on the host)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a mask or packed-sequence detection was computed")

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", refuse)
    monkeypatch.setattr(transformers.masking_utils, "sdpa_mask", refuse)
    calls = []
    real_op = attention.varlen_attention
    monkeypatch.setattr(attention, "varlen_attention", lambda q, k, v, cu, max_len, **kw: (
        calls.append((cu, max_len)), real_op(q, k, v, cu, max_len, **kw))[1])
    varlen, _ = make_models("qwen2")
    batch = packed_batch([torch.arange(7), torch.arange(11)])
    hidden_states(varlen, batch)
    assert len(calls) == 2 and all(cu is batch.cu_seqlens and n == 11 for cu, n in calls)


@pytest.mark.parametrize("family, other, overrides", [("mistral", "sdpa", {}),
                                                       ("gemma2", "eager", WINDOWED["gemma2"])])
def test_without_segments_a_row_is_one_sequence_and_decoding_keeps_the_window(family, other, overrides):
    """No Batch: each row is one causal sequence; generating with a KV cache gives sdpa's / eager's tokens:
    Llama-like decoding on SDPA, Gemma2's (window 4, softcap) on the kernel's separate q/k segments."""
    varlen, sdpa = make_models(family, other, **overrides)
    ids = torch.randint(0, VOCAB, (2, 10))
    torch.testing.assert_close(varlen(ids).logits, sdpa(ids).logits)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(varlen.generate(ids[:1], **kwargs), sdpa.generate(ids[:1], **kwargs))


def test_attention_dropout_is_a_config_error():
    varlen, _ = make_models("llama", attention_dropout=0.1)
    hidden_states(varlen, packed_batch([torch.arange(4)]))  # eval: no dropout
    with pytest.raises(ConfigError, match="attn_implementation: mftcore_varlen has no attention dropout"):
        hidden_states(varlen.train(), packed_batch([torch.arange(4)]))


BASE = {"data_paths": ["a"], "tokenizer_path": "t", "model_config": {"model_type": "llama"}}


def test_attn_implementation_resolution(monkeypatch):
    """The config keeps what the user wrote (null = auto); the model loader resolves it for the run."""
    assert TrainConfig.from_dict(BASE).attn_implementation is None
    assert resolve_attn_implementation(None, "padding") == "sdpa"
    assert TrainConfig.from_dict({**BASE, "attn_implementation": "mftcore_varlen"}).attn_implementation == \
        "mftcore_varlen"
    assert resolve_attn_implementation(None, "pack") == resolve_attn_implementation("auto", "pack") == \
        "mftcore_varlen"
    assert resolve_attn_implementation("auto", "padding") == "sdpa"
    assert resolve_attn_implementation("eager", "pack") == "eager"
    with pytest.raises(ConfigError, match="attn_implementation: 'flash' is not supported"):
        TrainConfig.from_dict({**BASE, "attn_implementation": "flash"})
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else
                        real_find_spec(name, *a))
    # MFTCoder's configs ask for FA2: without flash_attn they run on mftcore_varlen (same exact attention).
    with pytest.warns(UserWarning, match="flash_attn is not installed; using mftcore_varlen"):
        assert resolve_attn_implementation("flash_attention_2", "padding") == "mftcore_varlen"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else
                        real_find_spec(name, *a))
    assert resolve_attn_implementation("flash_attention_2", "padding") == "flash_attention_2"


@pytest.mark.slow
def test_training_losses_equal_sdpa_on_padded_batches(tiny_config):
    """Same seed, same data: mftcore_varlen keeps the sdpa run's losses (it changes no numerics)."""
    from mftcore.train import train

    losses = {}
    for attn in ("sdpa", "mftcore_varlen"):
        path, cfg = tiny_config(attn_implementation=attn, max_train_steps=3, log_interval=1,
                                output_dir=tiny_config()[1]["output_dir"] + "-" + attn)
        train(TrainConfig.from_file(path))
        with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
            losses[attn] = [json.loads(line)["loss"] for line in f]
    assert len(losses["sdpa"]) == 3
    assert losses["mftcore_varlen"] == pytest.approx(losses["sdpa"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_packed_decoder_runs_the_kernels_without_host_syncs():
    """bf16 Llama on the Triton kernels: per-document outputs as under SDPA alone, and a forward plus
    backward through every layer with torch's sync debug mode set to error (inputs_embeds: the embedding
    backward is outside the attention path and not ours)."""
    from mftcore.model.decoder import decoder

    varlen, sdpa = (m.to("cuda", torch.bfloat16) for m in make_models("llama", hidden_size=256))
    docs = [torch.randint(0, VOCAB, (n,), device="cuda") for n in (300, 1, 77, 150)]
    batch = packed_batch([d.cpu() for d in docs]).to("cuda")
    packed = hidden_states(varlen, batch)[0]
    start = 0
    for doc in docs:
        alone = hidden_states(sdpa, packed_batch([doc.cpu()]).to("cuda"))[0]
        torch.testing.assert_close(packed[start:start + len(doc)].float(), alone.float(), atol=5e-2, rtol=5e-2)
        start += len(doc)
    embeds = varlen.get_input_embeddings()(batch.input_ids).detach().requires_grad_()

    def step():
        out = decoder(varlen)(inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False,
                              **attention.varlen_kwargs(batch)).last_hidden_state
        out.float().square().sum().backward()

    step()  # compiles the kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
