"""Writes the chat-format tokenizers of examples/tokenizers/<format>/ (committed; rerun only to change them):

    python examples/make_chat_tokenizers.py

Each is the repo's small byte-level BPE (examples/tokenizer/, 945 tokens) plus the special tokens and the
chat template of one published format, written by the team from the formats' public descriptions:

- chatml          ChatML as Qwen2.5-Coder-Instruct uses it: `<|im_start|>{role}\\n{content}<|im_end|>\\n`, a
                  default system prompt when the conversation has none, EOS `<|im_end|>`, and Qwen's FIM tokens
                  `<|fim_prefix|>`, `<|fim_suffix|>`, `<|fim_middle|>`.
- llama3          Llama-3-Instruct: `<|begin_of_text|>`, then per message
                  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>`; EOS `<|eot_id|>`.
- mistral         Mistral-Instruct v0.3: `<s>[INST] {user}[/INST] {assistant}</s>`, the system prompt put before
                  the last user message (so a later turn moves it: not prefix-consistent); [INST]/[/INST] are
                  control tokens.
- deepseek_coder  DeepSeek-Coder-Instruct: BOS, a default system prompt when none is given,
                  `### Instruction:\\n{user}\\n` and `### Response:\\n{assistant}\\n<|EOT|>\\n`; EOS `<|EOT|>`, and
                  its FIM tokens `<｜fim▁begin｜>`, `<｜fim▁hole｜>`, `<｜fim▁end｜>`.

The vocabulary is shared, so these tokenizers split ordinary text exactly as examples/tokenizer/ does; only
the special tokens (ids 945 and up) differ. They exist for the tests and for trying `chat_template: "model"`
with the tiny model; they are not the released tokenizers (whose vocabularies are far larger).
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

CHATML = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = 'You are a helpful assistant.' -%}{%- set rest = messages -%}{%- endif -%}"
    "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- for message in rest -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{ raise_exception('ChatML: roles are system (first only), user and assistant') }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.index0 == ns.last_user and system_message is defined -%}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + message['content'] + '[/INST]' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + message['content'] | trim + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

DEEPSEEK_CODER = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{%- set ns = namespace(found=false) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{%- set ns.found = true -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{bos_token}}"
    "{%- if not ns.found -%}"
    "{{'You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, "
    "and you only answer questions related to computer science. For politically sensitive questions, security "
    "and privacy issues, and other non-computer science questions, you will refuse to answer\\n'}}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- else %}"
    "{%- if message['role'] == 'user' %}{{'### Instruction:\\n' + message['content'] + '\\n'}}"
    "{%- else %}{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{'### Response:'}}{% endif %}"
)

# format -> (special tokens in id order, tokenizer_config entries, chat template)
FORMATS = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
                "<|fim_suffix|>", "<|fim_pad|>"],
               {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, CHATML),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}, LLAMA3),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}, MISTRAL),
    "deepseek_coder": (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|EOT|>", "<｜fim▁hole｜>",
                        "<｜fim▁begin｜>", "<｜fim▁end｜>"],
                       {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<|EOT|>",
                        "pad_token": "<｜end▁of▁sentence｜>"}, DEEPSEEK_CODER),
}


def write_format(name: str, specials: list, entries: dict, template: str) -> None:
    with open(os.path.join(HERE, "tokenizer", "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    base = tok["added_tokens"][0]["content"]  # <|endoftext|>, id 0 of the base vocabulary
    added, next_id = [], len(vocab)
    for content in specials:
        if content == base:
            token_id = vocab[base]
        else:
            token_id, next_id = next_id, next_id + 1
        added.append({"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    tok["added_tokens"] = sorted(added, key=lambda t: t["id"])
    out = os.path.join(HERE, "tokenizers", name)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=None, separators=(",", ":"))
    config = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "model_max_length": 1 << 20,
              **{k: v for k, v in entries.items() if v is not None}, "chat_template": template}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")


def main() -> None:
    for name, (specials, entries, template) in FORMATS.items():
        write_format(name, specials, entries, template)
        print(f"wrote examples/tokenizers/{name}/")


if __name__ == "__main__":
    main()
