"""Answer prompts with a trained model in its training format (`<s>human\\n{q}\\n<s>bot\\n` by default).

Prompts are tokenized exactly as training tokenized the same prefix (each segment on its own, EOS as
an id after earlier answers), with the role markers saved beside the model (or the adapter) by
`train` / `merge`. A model trained with `chat_template: "model"` is prompted through the same rendering
as training (mftcore/data/template.py: its tokenizer's template with the generation prompt, the whole
text tokenized at once), and generation stops at EOS or the template's end-of-turn tokens. Many
prompts run in batches, left-padded with EOS so every row ends where its answer starts; a single
prompt streams to the terminal.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

from mftcore.data.encode import parse_line, read_errors
from mftcore.data.render import DEFAULT_ROLE_MARKERS, RenderError, render_record, tokenize_segments
from mftcore.data.template import generation_prompt_ids, to_messages
from mftcore.errors import ConfigError, DataError
from mftcore.integrity import irregular_file, weights_problem
from mftcore.io import atomic_write_text, open_regular
from mftcore.model.chat_template import saved_chat_format, stop_token_ids
from mftcore.model.load import check_vocabulary, load_hf_tokenizer
from mftcore.outputs import check_output


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy (or beam search with num_beams > 1); > 0: sampling at this temperature."""
    top_p: float = 1.0
    num_beams: int = 1
    seed: int = 1234

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p: must lie in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ConfigError(f"--num_beams: must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ConfigError("--num_beams: beam search is deterministic; drop --temperature (or use --greedy)")

    def generate_kwargs(self) -> dict:
        if self.temperature > 0:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        return {"do_sample": False, "num_beams": self.num_beams}


@dataclass
class Generator:
    model: torch.nn.Module
    tokenizer: object
    markers: dict
    device: torch.device
    chat_format: str = "mftcoder"  # or "model": the tokenizer's own chat template
    stop_ids: tuple = ()  # EOS and the template's end-of-turn tokens


def load_generator(model_dir: str, adapter: str | None = None, trust_remote_code: bool = False) -> Generator:
    """The model (with its LoRA adapter applied, if any), its tokenizer and its training role markers."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(model_dir):
        raise ConfigError(f"--model: {model_dir}: not a directory")
    if adapter is not None and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise ConfigError(f"--adapter: {adapter}: no adapter_config.json (not a PEFT adapter directory)")
    if adapter is not None and weights_problem(adapter):
        raise ConfigError(f"--adapter: {adapter}: {weights_problem(adapter)}")
    tokenizer_dir = next((d for d in (adapter, model_dir)
                          if d is not None and os.path.isfile(os.path.join(d, "tokenizer_config.json"))), None)
    if tokenizer_dir is None:  # e.g. a checkpoint-N directory, which holds weights only
        raise ConfigError(f"--model: {model_dir}: no tokenizer_config.json beside the weights; "
                          "use OUTPUT_DIR/final or a merged model")
    tokenizer = load_hf_tokenizer(tokenizer_dir, "--adapter" if tokenizer_dir == adapter else "--model",
                                  trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"--model: {model_dir}: the tokenizer has no eos_token")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = irregular_file(model_dir) or weights_problem(model_dir)
    if problem:
        raise ConfigError(f"--model: {model_dir}: {problem}")
    from mftcore.commands.merge import apply_adapter, load_errors

    with load_errors(model_dir, "--model"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    if adapter is not None:
        model = apply_adapter(model, adapter, model_dir)
    model.to(device).eval()
    check_vocabulary(model, tokenizer, where="--model")
    chat_format, markers, _ = saved_chat_format(adapter, model_dir)
    try:
        stops = tuple(stop_token_ids(tokenizer, chat_format))
    except RenderError as e:
        raise ConfigError(f"--model: {model_dir}: {e}") from None
    return Generator(model, tokenizer, markers, device, chat_format, stops)


def prompt_rounds(record: dict) -> list:
    """A prompt record -> chat rounds ending with the user turn to answer.

    {"prompt": q, "system": s?} or {"chat_rounds" | "messages": [..., {"role": "user", ...}]}."""
    if not isinstance(record, dict):
        raise RenderError("each line must be a JSON object")
    if isinstance(record.get("prompt"), str):
        system = record.get("system")
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "human", "content": record["prompt"]}]
    rounds = record.get("chat_rounds", record.get("messages"))
    if isinstance(rounds, list) and rounds and isinstance(rounds[-1], dict) \
            and rounds[-1].get("role") in ("human", "user"):
        return rounds
    raise RenderError("expected a string 'prompt', or 'chat_rounds'/'messages' ending with a user turn")


def prompt_ids(gen: Generator, record: dict) -> list:
    """Token ids of the prompt, as training tokenized the same text."""
    if gen.chat_format == "model":
        return generation_prompt_ids(gen.tokenizer, to_messages(prompt_rounds(record)))
    segments = render_record({"chat_rounds": prompt_rounds(record)}, gen.markers)
    return tokenize_segments(segments, gen.tokenizer, gen.tokenizer.eos_token_id)[0]


def read_prompts(path: str) -> list:
    """prompts.jsonl -> records, through the guarded read path (a regular file) and the strict JSON
    reader of the training data; a bad line (invalid UTF-8 or JSON, no prompt) is a DataError naming
    file:line."""
    records = []
    with open_regular(path, DataError, missing=f"{path}: prompt file not found", what="prompt file") as f, \
            read_errors(path):
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = parse_line(raw)
                render_record({"chat_rounds": prompt_rounds(record)}, DEFAULT_ROLE_MARKERS)  # validates roles
            except RenderError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            records.append(record)
    if not records:
        raise DataError(f"{path}: no prompts")
    return records


@torch.no_grad()
def generate_ids(gen: Generator, id_lists: list, sampling: Sampling, streamer=None, **generate_kwargs) -> list:
    """New token ids for each prompt (one batch), left-padded with EOS; generation stops at EOS (or an
    end-of-turn token of the model's template). generate_kwargs go to model.generate (e.g. stop_strings with
    tokenizer, synced_gpus)."""
    eos = gen.tokenizer.eos_token_id
    stops = list(gen.stop_ids) or [eos]
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), eos, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for row, ids in enumerate(id_lists):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    out = gen.model.generate(input_ids=input_ids.to(gen.device), attention_mask=mask.to(gen.device),
                             max_new_tokens=sampling.max_new_tokens,
                             eos_token_id=stops[0] if len(stops) == 1 else stops, pad_token_id=eos,
                             streamer=streamer, **sampling.generate_kwargs(), **generate_kwargs)
    answers = []
    for row in out[:, width:].tolist():
        end = min((row.index(s) for s in stops if s in row), default=len(row))
        answers.append(row[:end])
    return answers


def generate_records(gen: Generator, records: list, sampling: Sampling, batch_size: int = 8) -> list:
    """Answer every record; batches hold prompts of similar length (less padding), order is kept."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"--batch_size: must be >= 1, got {batch_size}")
    torch.manual_seed(sampling.seed)
    ids = [prompt_ids(gen, r) for r in records]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers = [None] * len(ids)
    with tqdm(total=len(ids), desc="generate", unit="prompt", disable=len(ids) <= batch_size) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, new in zip(chunk, generate_ids(gen, [ids[i] for i in chunk], sampling)):
                answers[i] = gen.tokenizer.decode(new, skip_special_tokens=True)
            bar.update(len(chunk))
    return [{**r, "output": a} for r, a in zip(records, answers)]


def stream_answer(gen: Generator, record: dict, sampling: Sampling, stream=None) -> str:
    """Answer one prompt, printing the answer to `stream` as it is generated (beam search prints at
    the end: HF streams only single-sequence decoding)."""
    from transformers import TextStreamer

    stream = stream or sys.stdout
    torch.manual_seed(sampling.seed)
    ids = prompt_ids(gen, record)
    streamer = None
    if sampling.num_beams == 1:
        class Printer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                print(text, end="", flush=True, file=stream)

        streamer = Printer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
    answer = gen.tokenizer.decode(generate_ids(gen, [ids], sampling, streamer)[0], skip_special_tokens=True)
    if streamer is None:
        print(answer, end="", file=stream)
    print(file=stream, flush=True)
    return answer


def write_jsonl(path: str | None, records: list) -> None:
    """JSONL to `path` (written whole, then renamed) or, without a path, to stdout."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path is None:
        sys.stdout.write(lines)
        return
    atomic_write_text(path, lines)


def answer(model_dir: str, adapter: str | None = None, *, prompt: str | None = None, system: str | None = None,
           file: str | None = None, output: str | None = None, sampling: Sampling | None = None,
           batch_size: int = 8, trust_remote_code: bool = False) -> list:
    """`mftcore generate`: one --prompt (streamed; JSONL too with --output) or a --file of prompts (JSONL
    to --output or stdout). Returns the records with their "output"."""
    sampling = sampling or Sampling()
    sampling.check()
    if (prompt is None) == (file is None):
        raise ConfigError("generate: give exactly one of --prompt and --file")
    if system is not None and file is not None:
        raise ConfigError("--system: only with --prompt (put \"system\" in the lines of --file)")
    if output is not None:
        check_output(output, "--output", {"prompt file": file, "model": model_dir, "adapter": adapter}, file=True)
    for flag, text in (("--prompt", prompt), ("--system", system)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
            raise ConfigError(f"{flag}: not valid UTF-8 text") from None
    records = read_prompts(file) if file is not None else None
    gen = load_generator(model_dir, adapter, trust_remote_code)
    if prompt is not None:
        record = {"prompt": prompt, **({"system": system} if system else {})}
        results = [{**record, "output": stream_answer(gen, record, sampling)}]
        if output is not None:
            write_jsonl(output, results)
        return results
    results = generate_records(gen, records, sampling, batch_size)
    write_jsonl(output, results)
    return results
