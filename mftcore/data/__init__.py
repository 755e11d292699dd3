"""Chat formats -> tokens + loss mask -> padding -> Batch."""

from mftcore.data.batch import IGNORE_INDEX, Batch, collate_padded, shift_labels
from mftcore.data.dataset import Sample, TaskData, epoch_order, load_tasks, micro_batches
from mftcore.data.loader import StepLoader
from mftcore.data.render import Segment, render_prompt, render_record, tokenize_segments

__all__ = [
    "IGNORE_INDEX", "Batch", "collate_padded", "shift_labels", "Sample", "TaskData", "epoch_order",
    "load_tasks", "micro_batches", "StepLoader", "Segment", "render_prompt", "render_record", "tokenize_segments",
]
