"""chat_template "model" end to end: training, final/ (its tokenizer keeps the model's template, its
generation config stops at the end-of-turn token), and `mftcore generate` prompting through the same
rendering as training."""

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from mftcore.commands.generate import Generator, Sampling, generate_ids, generate_records, load_generator, prompt_ids
from mftcore.config import TrainConfig
from mftcore.data import load_tasks
from mftcore.train import train
from tests.helpers.paths import DATA, ROOT, TINY_MODEL

CHATML = os.path.join(ROOT, "examples", "tokenizers", "chatml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps on the sample data in ChatML, with EOS <|endoftext|> (as Qwen's base models have it), so
    that the end-of-turn token <|im_end|> is a stop token of its own."""
    out = tmp_path_factory.mktemp("chatml") / "out"
    cfg = TrainConfig.from_dict({"data_paths": DATA, "tokenizer_path": CHATML, "model_config": TINY_MODEL,
                                 "chat_template": "model", "eos_token": "<|endoftext|>", "seq_length": 256,
                                 "data_split": "98,2,0",
                                 "per_device_train_batch_size": 4, "max_train_steps": 2, "log_interval": 1,
                                 "evaluation_steps": 0, "checkpointing_steps": 0, "output_dir": str(out),
                                 "learning_rate": 1e-3, "min_lr": 1e-4, "num_warmup_steps": 1})
    return cfg, train(cfg)


def test_final_keeps_the_model_template_and_stops_at_its_end_of_turn(trained):
    cfg, final = trained
    source = json.load(open(os.path.join(CHATML, "tokenizer_config.json")))["chat_template"]
    assert AutoTokenizer.from_pretrained(final).chat_template == source
    tokenizer = AutoTokenizer.from_pretrained(final)
    eos_ids = json.load(open(os.path.join(final, "generation_config.json")))["eos_token_id"]
    assert eos_ids == [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    assert json.load(open(os.path.join(final, "mftcore_config.json")))["chat_template"] == "model"


def test_generate_prompts_as_training_tokenized_the_same_prefix(trained):
    cfg, final = trained
    gen = load_generator(final)
    assert gen.chat_format == "model" and gen.tokenizer.convert_tokens_to_ids("<|im_end|>") in gen.stop_ids
    record = {"prompt": "How do I count the lines in app.log?", "system": "Answer with a command."}
    messages = [{"role": "system", "content": record["system"]}, {"role": "user", "content": record["prompt"]}]
    ids = prompt_ids(gen, record)
    assert ids == gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    # The training sample of the same conversation starts with exactly these ids, then its trained answer.
    data_dir = os.path.join(os.path.dirname(final), "one")
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "x.jsonl"), "w") as f:
        f.write(json.dumps({**record, "answer": "wc -l app.log"}) + "\n")
    one = TrainConfig.from_dict({**cfg.to_dict(), "data_paths": [data_dir], "data_split": "1,0,0"})
    sample = load_tasks(one, gen.tokenizer, gen.tokenizer.eos_token_id, progress=False).train[0]
    mask = sample.loss_mask.tolist()
    assert sample.input_ids.tolist()[:mask.index(1)] == ids
    outputs = generate_records(gen, [record, {"messages": [{"role": "user", "content": "ls?"}]}],
                               Sampling(max_new_tokens=4), batch_size=2)
    assert all(isinstance(r["output"], str) for r in outputs)


def test_answers_end_at_the_first_stop_token(tokenizer):
    """EOS or an end-of-turn id ends the answer, whichever comes first."""
    class Model:
        def generate(self, input_ids, **kwargs):
            assert kwargs["eos_token_id"] == [0, 7]
            new = torch.tensor([[5, 6, 7, 8], [5, 0, 9, 9], [4, 4, 4, 4]])
            return torch.cat([input_ids, new], dim=1)

    gen = Generator(Model(), tokenizer, {}, torch.device("cpu"), "model", (0, 7))
    assert generate_ids(gen, [[1, 2], [3], [4]], Sampling()) == [[5, 6], [5], [4, 4, 4, 4]]
