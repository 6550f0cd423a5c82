"""``effvit <command>``: one entry point; each command lives in its own module under effvit.cli."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# module name under effvit.cli -> each defines register(subparsers) and sets args.func
COMMANDS = ["info", "train", "eval", "predict", "demo", "bench", "export", "rotation", "straighten", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effvit", description="EfficientViT-M: build, train, benchmark, deploy")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"effvit.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"effvit {args.command}: warning: {message}", file=file or sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show  # one line per warning, without the source location
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError, ImportError) as e:
        # Our errors say what went wrong and what to do (a missing extra: how to install it); a traceback
        # would only bury that.
        print(f"effvit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a NaN/inf loss: the message names the last good checkpoint
        print(f"effvit {args.command}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"effvit {args.command}: interrupted", file=sys.stderr)
        return 130
