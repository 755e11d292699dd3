"""`mftcore train | prepare | merge | generate | eval | export | bench`. User mistakes print one line and exit 2;
--debug shows the traceback.

This module only parses arguments and dispatches; the work lives in train.py and mftcore/commands/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from mftcore import __version__, mftcoder
from mftcore.errors import ConfigError, Interrupted, MftcoreError
from mftcore.quiet import silence_third_party


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train from a JSON or YAML config",
                       description="mftcore train CONFIG.json [key=value ...]; MFTCoder's spelling "
                                   "`--train_config CONFIG.json --data_paths ... --output_dir ...` works too.")
    p.add_argument("args", nargs="*", metavar="CONFIG.json [key=value]",
                   help="the config, then overrides of its keys (values read as JSON when they parse)")
    p.add_argument("--train_config", help="the config (MFTCoder's flag; then every positional is an override)")
    for flag in mftcoder.TRAIN_FLAGS:
        p.add_argument(f"--{flag}", type=int if flag == "micro_batch_size" else str,
                       help=f"overrides {' and '.join(mftcoder.TRAIN_FLAGS[flag])}")


def add_prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize the data into the cache that train reuses")
    p.add_argument("config", help="path to a JSON or YAML TrainConfig")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, as for train")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print the first N samples as JSON lines: task, text, input_ids, loss_mask")


def add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA/QLoRA adapter into its base model")
    p.add_argument("--base", "--base_model_or_path", dest="base", required=True, help="the base model directory")
    p.add_argument("--adapter", "--adaptor_path", dest="adapter", required=True, help="the PEFT adapter directory")
    p.add_argument("--out", "--merged_output_path", dest="out", required=True, help="where the merged model goes")
    p.add_argument("--model_type", default=None, help="the family (checked against the base; EOS fallback)")
    p.add_argument("--dtype", default="auto", help="auto (the base's), bfloat16, float16 or float32")
    p.add_argument("--trust_remote_code", action="store_true", help="allow code shipped with the model")


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer prompts in the training format")
    p.add_argument("--model", required=True, help="a model directory, e.g. OUTPUT_DIR/final or a merged model")
    p.add_argument("--adapter", default=None, help="a LoRA adapter to apply to --model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user turn; the answer streams to the terminal")
    src.add_argument("--file", help="prompts.jsonl: {\"prompt\", \"system\"?} or {\"chat_rounds\"} per line")
    p.add_argument("--system", default=None, help="a system turn for --prompt")
    p.add_argument("--output", default=None, help="write JSONL records {..., \"output\"} here (default: stdout)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch for --file")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    p.add_argument("--num_beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--seed", type=int, default=1234, help="seed for sampling")
    p.add_argument("--trust_remote_code", action="store_true", help="allow code shipped with the model")


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="pass@k of a model on a HumanEval- or MBPP-format benchmark, in a sandbox",
                       description="mftcore eval MODEL --benchmark FILE|hf:NAME[:CONFIG]: generates n completions "
                                   "per problem, runs each with its tests in the sandbox and prints pass@k.")
    p.add_argument("model", help="a model directory, e.g. OUTPUT_DIR/final or a merged model")
    p.add_argument("--adapter", default=None, help="a LoRA adapter to apply to the model")
    p.add_argument("--benchmark", required=True, help="a JSONL file, or hf:NAME[:CONFIG] (a Hugging Face dataset)")
    p.add_argument("--split", default=None, help="the split of a Hugging Face dataset (default: test)")
    p.add_argument("--name", default=None, help="the benchmark's name in the table (default: from the file)")
    p.add_argument("--output", default=None, help="results JSONL, one line per problem (default: NAME.results.jsonl)")
    p.add_argument("--prompt_format", default=None, choices=["training", "raw"],
                   help="training: the model's training format (default); raw: the code prompt (completion models)")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default 1: greedy)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="the k of pass@k (default 1; each <= n)")
    p.add_argument("--temperature", type=float, default=None, help="default: 0 for n=1, else 0.8")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling (default 0.95)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="longest completion (default 512)")
    p.add_argument("--batch_size", type=int, default=None, help="prompts per generation batch (default 8)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--tag", default=None, help="task tag of problems that have none")
    p.add_argument("--timeout", type=float, default=None, help="wall-clock seconds per completion (default 10)")
    p.add_argument("--memory_mb", type=int, default=None, help="address space per completion (default 1024)")
    p.add_argument("--workers", type=int, default=None, help="completions run at once (default: the CPU count)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 1234)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow code shipped with the model")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="turn a checkpoint (of any engine) into one HF model or PEFT adapter directory",
                       description="mftcore export CHECKPOINT OUT: rebuilds the model from the checkpoint's "
                                   "mftcore_config.json (run it where that config's paths resolve) and writes "
                                   "model.safetensors (or the adapter), the tokenizer and the config to OUT.")
    p.add_argument("checkpoint", help="a checkpoint-N directory (one process, ddp, fsdp or deepspeed)")
    p.add_argument("out", help="the directory to write")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow code shipped with the model to run (a trust_remote_code in the checkpoint's own "
                        "config is not enough)")


def add_bench_parser(sub) -> None:
    from mftcore.commands.bench import BENCHMARKS

    p = sub.add_parser("bench", help="run one benchmark of bench/ and print its table",
                       description="Runs bench/bench_NAME.py of the checkout (bench/ beside the mftcore package) or "
                                   "of MFTCORE_BENCH_DIR; exit code 1 if one of its gates failed.")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds, not the numbers")
    p.add_argument("--json", dest="out", metavar="PATH",
                   help="write the full results here (default without --quick: bench/results/<device>/NAME.json)")


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="write a run's training report: one self-contained HTML page of plots",
                       description="mftcore report OUTPUT_DIR: per-task train/valid loss, task weights, tokens per "
                                   "task, lr, throughput/MFU, memory, evaluation results, config and data report, "
                                   "from OUTPUT_DIR's metrics.jsonl, run.json and memory.json (train writes "
                                   "OUTPUT_DIR/report.html itself at its end).")
    p.add_argument("output_dir", help="a training run's output_dir")
    p.add_argument("--out", help="the HTML file to write (default: OUTPUT_DIR/report.html)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mftcore", description="Multi-task fine-tuning of code LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("--version", action="version", version=f"mftcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_prepare_parser(sub)
    add_merge_parser(sub)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_export_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    for subparser in sub.choices.values():  # `mftcore train c.json --debug` as well as `mftcore --debug train`
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show tracebacks for user errors")
    return parser


def train_config_and_overrides(args) -> tuple[str, list]:
    """The config path and the `key=value` overrides: MFTCoder's flags first, then the positionals."""
    positionals = list(args.args)
    if args.train_config is not None:
        path = args.train_config
    elif positionals and "=" not in positionals[0]:
        path = positionals.pop(0)
    else:
        raise ConfigError("train: give a config file (mftcore train CONFIG.json, or --train_config CONFIG.json)")
    overrides = []
    for flag, keys in mftcoder.TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:  # json.dumps: "123" stays a string, a path never turns into a number
            overrides += [f"{key}={json.dumps(value)}" for key in keys]
    return path, overrides + positionals


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (ours), not one per weight file
    if args.command == "train":
        from mftcore.config import TrainConfig
        from mftcore.train import train

        path, overrides = train_config_and_overrides(args)
        train(TrainConfig.from_file(path, overrides))
    elif args.command == "prepare":
        from mftcore.commands.prepare import prepare

        prepare(args.config, args.overrides, args.show)
    elif args.command == "merge":
        from mftcore.commands.merge import merge

        merge(args.base, args.adapter, args.out, args.model_type, args.dtype, args.trust_remote_code)
    elif args.command == "generate":
        from mftcore.commands.generate import Sampling, answer

        sampling = Sampling(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_p,
                            args.num_beams, args.seed)
        answer(args.model, args.adapter, prompt=args.prompt, system=args.system, file=args.file,
               output=args.output, sampling=sampling, batch_size=args.batch_size,
               trust_remote_code=args.trust_remote_code)
    elif args.command == "eval":
        from mftcore.commands.eval import evaluate_model

        options = {k: getattr(args, k) for k in ("split", "prompt_format", "n", "k", "temperature", "top_p",
                                                 "max_new_tokens", "batch_size", "limit", "tag", "timeout",
                                                 "memory_mb", "workers", "seed")}
        evaluate_model(args.model, args.benchmark, adapter=args.adapter, name=args.name, output=args.output,
                       trust_remote_code=args.trust_remote_code, **options)
    elif args.command == "export":
        from mftcore.commands.export import export_checkpoint

        print(export_checkpoint(args.checkpoint, args.out, trust_remote_code=args.trust_remote_code))
    elif args.command == "bench":
        from mftcore.commands.bench import run_benchmark

        return run_benchmark(args.name, args.device, args.quick, args.out)
    elif args.command == "report":
        from mftcore.commands.report import write_report

        print(write_report(args.output_dir, args.out))
    return 0


def raise_interrupted(signum, frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name}; what was being written was removed", signum)


@contextlib.contextmanager
def terminate_as_exception():
    """SIGTERM as an exception, so that it unwinds like Ctrl-C does: temporary files are removed and
    worker processes stopped on the way out (the training loop handles both signals itself)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def report(message: str) -> None:
    """The error line, on a line of its own: a progress bar still open would otherwise share it."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):
            with contextlib.suppress(Exception):
                bar.close()
    except ImportError:
        pass
    print(f"mftcore: error: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    silence_third_party()  # before any command imports DeepSpeed, bitsandbytes or peft
    args = build_parser().parse_args(argv)
    try:
        with terminate_as_exception():
            return run(args)
    except MftcoreError as e:
        if args.debug:
            raise
        report(one_line(e))
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        report("interrupted (Ctrl-C); what was being written was removed")
        return 130
    except BrokenPipeError:  # `mftcore generate ... | head`: the reader is gone, which is not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the system refused something: a path or device problem, not a bug of ours
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        report(f"{where}{e.strerror or one_line(e)}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
