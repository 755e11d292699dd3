"""Chat formats -> tokens + loss mask -> cache -> packing or padding -> Batch.

render.py (records -> training strings with trainable segments), encode.py (lines -> token ids and
masks, in worker processes), cache.py (the memory-mapped tokenized cache), dataset.py (tasks, the
train/valid split, the start-up report), packing.py (C++ best-fit-decreasing and its reference),
batch.py (the Batch of DESIGN.md and its collators), loader.py (each optimizer step's micro-batches,
resumable, prefetched). Beyond MFTCoder's JSONL (issue 17): sources.py (parquet/arrow/csv/json files,
save_to_disk directories, Hub datasets through `datasets`), columns.py (column mapping), formats.py (a
record's samples: MFTCoder's string, the model's chat template of template.py, fim.py), sampling.py
(per-task sampling ratios), show.py (`prepare --show`). The names below are the package's public API.
"""

from mftcore.data.batch import IGNORE_INDEX, Batch, collate_packed, collate_padded, shift_labels
from mftcore.data.dataset import (
                                  Sample,
                                  SampleView,
                                  TaskData,
                                  epoch_order,
                                  load_tasks,
                                  micro_batches,
                                  report_lines,
)
from mftcore.data.loader import StepLoader
from mftcore.data.render import Segment, render_prompt, render_record, tokenize_segments
from mftcore.data.show import show_samples

__all__ = [
    "IGNORE_INDEX", "Batch", "collate_packed", "collate_padded", "shift_labels", "Sample", "SampleView", "TaskData",
    "epoch_order", "load_tasks", "micro_batches", "report_lines", "show_samples", "StepLoader",
    "Segment", "render_prompt", "render_record", "tokenize_segments",
]
