"""Chat formats -> tokens + loss mask -> cache -> packing or padding -> Batch."""

from mftcore.data.batch import IGNORE_INDEX, Batch, collate_packed, collate_padded, shift_labels
from mftcore.data.dataset import (Sample, SampleView, TaskData, data_rank, epoch_order, load_tasks, micro_batches,
                                  report_lines, show_samples)
from mftcore.data.loader import StepLoader
from mftcore.data.render import Segment, render_prompt, render_record, tokenize_segments

__all__ = [
    "IGNORE_INDEX", "Batch", "collate_packed", "collate_padded", "shift_labels", "Sample", "SampleView", "TaskData",
    "data_rank", "epoch_order", "load_tasks", "micro_batches", "report_lines", "show_samples", "StepLoader",
    "Segment", "render_prompt", "render_record", "tokenize_segments",
]
