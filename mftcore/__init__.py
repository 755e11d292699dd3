"""mftcore: multi-task fine-tuning of code LLMs, kernel first."""

__version__ = "0.1.0"
