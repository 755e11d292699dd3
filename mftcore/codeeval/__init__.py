"""Code evaluation: benchmarks (HumanEval and MBPP formats), prompts in the model's format, generation,
execution in mftcore.sandbox and pass@k, for `mftcore eval` and for `eval_benchmarks` during training."""
