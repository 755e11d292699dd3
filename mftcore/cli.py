"""`mftcore train | generate`. User mistakes print one line and exit 2; --debug shows the traceback."""

from __future__ import annotations

import argparse
import sys

from mftcore.errors import MftcoreError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mftcore", description="Multi-task fine-tuning of code LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a JSON config")
    p.add_argument("config", help="path to a JSON TrainConfig")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys; values are read as JSON when they parse, else as strings")

    p = sub.add_parser("generate", help="answer a prompt in the training format")
    p.add_argument("--model", required=True, help="a model directory, e.g. OUTPUT_DIR/final")
    p.add_argument("--prompt", required=True, help="the user turn")
    p.add_argument("--system", default=None, help="an optional system turn")
    p.add_argument("--max_new_tokens", type=int, default=128)
    return parser


def run(args) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (ours), not one per weight file
    if args.command == "train":
        from mftcore.config import TrainConfig
        from mftcore.train import train

        train(TrainConfig.from_file(args.config, args.overrides))
    elif args.command == "generate":
        from mftcore.generate import generate

        print(generate(args.model, args.prompt, args.max_new_tokens, args.system))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except MftcoreError as e:
        if args.debug:
            raise
        print(f"mftcore: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
