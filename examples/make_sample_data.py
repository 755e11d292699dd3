"""Writes the sample multi-task chatML data (examples/data/<task>/*.jsonl) and trains the tiny
byte-level BPE tokenizer on it (examples/tokenizer/). Both outputs are committed; rerun this only to
change them:

    python examples/make_sample_data.py

Three tasks, written for this project from templates: Python functions, SQL queries, shell commands.
Some conversations are multi-turn, some start with a system turn. Deterministic (seeded).
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
EOS = "<|endoftext|>"

PY_OPS = [
    ("sum", "returns the sum of {a} and {b}", "return {a} + {b}"),
    ("difference", "returns {a} minus {b}", "return {a} - {b}"),
    ("product", "returns the product of {a} and {b}", "return {a} * {b}"),
    ("maximum", "returns the larger of {a} and {b}", "return max({a}, {b})"),
    ("minimum", "returns the smaller of {a} and {b}", "return min({a}, {b})"),
    ("average", "returns the average of {a} and {b}", "return ({a} + {b}) / 2"),
    ("power", "raises {a} to the power {b}", "return {a} ** {b}"),
    ("remainder", "returns the remainder of {a} divided by {b}", "return {a} % {b}"),
]
PY_LIST_OPS = [
    ("count_even", "counts the even numbers in {xs}", "return sum(1 for x in {xs} if x % 2 == 0)"),
    ("squares", "returns the squares of the numbers in {xs}", "return [x * x for x in {xs}]"),
    ("largest", "returns the largest number in {xs}", "return max({xs})"),
    ("total", "returns the total of {xs}", "return sum({xs})"),
    ("reverse", "returns {xs} in reverse order", "return list(reversed({xs}))"),
    ("unique", "returns the unique items of {xs} in order", "return list(dict.fromkeys({xs}))"),
]
ARGS = ["a", "b", "x", "y", "m", "n", "left", "right", "first", "second"]
LISTS = ["values", "items", "numbers", "data", "scores", "counts"]

TABLES = {
    "users": ["id", "name", "email", "age", "country"],
    "orders": ["id", "user_id", "amount", "status", "created_at"],
    "products": ["id", "title", "price", "stock", "category"],
    "employees": ["id", "name", "salary", "department", "hired_at"],
    "books": ["id", "title", "author", "year", "pages"],
}
SQL_NUMERIC = {"age", "amount", "price", "stock", "salary", "year", "pages", "user_id"}

FILES = ["app.log", "data.csv", "notes.txt", "main.py", "report.md", "config.yaml", "server.log"]
DIRS = ["src", "logs", "build", "docs", "tests", "data"]
SHELL = [
    ("How do I count the lines in {f}?", "wc -l {f}"),
    ("Show the first {k} lines of {f}.", "head -n {k} {f}"),
    ("Show the last {k} lines of {f}.", "tail -n {k} {f}"),
    ("Find every line containing '{w}' in {f}.", "grep '{w}' {f}"),
    ("Count the lines containing '{w}' in {f}.", "grep -c '{w}' {f}"),
    ("List the files in {d} sorted by size.", "ls -lS {d}"),
    ("Create the directory {d} with its parents.", "mkdir -p {d}"),
    ("Delete the directory {d} and everything in it.", "rm -r {d}"),
    ("Copy {f} into {d}.", "cp {f} {d}/"),
    ("Find all files named {f} under {d}.", "find {d} -name '{f}'"),
    ("Show the disk usage of {d}.", "du -sh {d}"),
    ("Sort the lines of {f} and remove duplicates.", "sort -u {f}"),
]
WORDS = ["error", "warning", "TODO", "user", "timeout", "failed", "import"]

SYSTEMS = [
    "You are a careful coding assistant. Answer with code only.",
    "You are an expert programmer who writes short, correct answers.",
    "You help developers. Keep answers brief.",
]


def python_conversation(rng: random.Random) -> list:
    if rng.random() < 0.6:
        name, desc, body = rng.choice(PY_OPS)
        a, b = rng.sample(ARGS, 2)
        fn = f"{name}_of" if rng.random() < 0.5 else name
        question = f"Write a Python function {fn}({a}, {b}) that {desc.format(a=a, b=b)}."
        code = f"def {fn}({a}, {b}):\n    {body.format(a=a, b=b)}"
        follow_up = (f"Add type hints for integers.",
                     f"def {fn}({a}: int, {b}: int):\n    {body.format(a=a, b=b)}")
    else:
        name, desc, body = rng.choice(PY_LIST_OPS)
        xs = rng.choice(LISTS)
        question = f"Write a Python function {name}({xs}) that {desc.format(xs=xs)}."
        code = f"def {name}({xs}):\n    {body.format(xs=xs)}"
        follow_up = (f"Add a docstring.",
                     f'def {name}({xs}):\n    """{desc.format(xs=xs).capitalize()}."""\n    {body.format(xs=xs)}')
    rounds = [{"role": "human", "content": question}, {"role": "bot", "content": f"```python\n{code}\n```"}]
    if rng.random() < 0.35:
        rounds += [{"role": "human", "content": follow_up[0]},
                   {"role": "bot", "content": f"```python\n{follow_up[1]}\n```"}]
    return rounds


def sql_conversation(rng: random.Random) -> list:
    table = rng.choice(list(TABLES))
    cols = TABLES[table]
    pick = rng.choice(cols[1:])
    where = rng.choice([c for c in cols if c != pick])
    if where in SQL_NUMERIC:
        k = rng.randint(1, 500)
        op, op_text = rng.choice([(">", "greater than"), ("<", "less than"), ("=", "equal to")])
        cond, cond_text = f"{where} {op} {k}", f"{where} is {op_text} {k}"
    else:
        v = rng.choice(["'active'", "'books'", "'alice'", "'FR'", "'sales'", "'done'"])
        cond, cond_text = f"{where} = {v}", f"{where} is {v}"
    question = f"Table {table} has columns {', '.join(cols)}. Write a SQL query that selects {pick} where {cond_text}."
    answer = f"SELECT {pick} FROM {table} WHERE {cond};"
    rounds = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        rounds += [{"role": "user", "content": f"Now sort the result by {pick}."},
                   {"role": "assistant", "content": f"SELECT {pick} FROM {table} WHERE {cond} ORDER BY {pick};"}]
    if rng.random() < 0.2:
        rounds += [{"role": "user", "content": "How many rows is that?"},
                   {"role": "assistant", "content": f"SELECT COUNT(*) FROM {table} WHERE {cond};"}]
    return rounds


def shell_conversation(rng: random.Random) -> list:
    q, a = rng.choice(SHELL)
    fill = dict(f=rng.choice(FILES), d=rng.choice(DIRS), k=rng.randint(2, 50), w=rng.choice(WORDS))
    rounds = [{"role": "human", "content": q.format(**fill)}, {"role": "bot", "content": a.format(**fill)}]
    if rng.random() < 0.25:
        q2, a2 = rng.choice(SHELL)
        fill2 = dict(f=rng.choice(FILES), d=rng.choice(DIRS), k=rng.randint(2, 50), w=rng.choice(WORDS))
        rounds += [{"role": "human", "content": "And: " + q2.format(**fill2)},
                   {"role": "bot", "content": a2.format(**fill2)}]
    return rounds


TASKS = {"python_funcs": python_conversation, "sql_queries": sql_conversation, "shell_commands": shell_conversation}


def write_data(per_task: int = 160, seed: int = 20261128) -> list:
    rng = random.Random(seed)
    texts = []
    for task, make in TASKS.items():
        out_dir = os.path.join(HERE, "data", task)
        os.makedirs(out_dir, exist_ok=True)
        # Two files per task: tasks are directories of any number of JSONL files.
        files = [open(os.path.join(out_dir, f"part-{i}.jsonl"), "w", encoding="utf-8") for i in range(2)]
        for i in range(per_task):
            rounds = make(rng)
            if rng.random() < 0.3:
                rounds = [{"role": "system", "content": rng.choice(SYSTEMS)}] + rounds
            record = {"id": i, "data_name": task, "chat_rounds": rounds}
            files[i % 2].write(json.dumps(record, ensure_ascii=False) + "\n")
            texts += [r["content"] for r in rounds]
        for f in files:
            f.close()
    return texts


def train_tokenizer(texts: list, vocab_size: int = 2048) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    markers = ["<s>system\n", "<s>human\n", "<s>bot\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + markers * 200, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(os.path.join(HERE, "tokenizer"))


if __name__ == "__main__":
    train_tokenizer(write_data())
    print("wrote examples/data and examples/tokenizer")
