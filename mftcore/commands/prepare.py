"""`mftcore prepare CONFIG.json [key=value ...] [--show N]`: build (or find) the tokenized-data cache
that `train` reuses; the report goes to stderr, --show's JSON lines to stdout."""

from __future__ import annotations

import sys

from mftcore.config import TrainConfig
from mftcore.data import load_tasks, report_lines
from mftcore.data.show import show_samples
from mftcore.model.load import load_tokenizer
from mftcore.parallel.env import local_rank


def prepare(config: str, overrides: list, show: int) -> None:
    cfg = TrainConfig.from_file(config, overrides)
    tokenizer = load_tokenizer(cfg)
    data = load_tasks(cfg, tokenizer, tokenizer.eos_token_id, local_rank=local_rank())
    for line in report_lines(data, cfg):
        print(line, file=sys.stderr)
    for line in show_samples(data.train.store, show, tokenizer, data.valid.indices):
        print(line)
