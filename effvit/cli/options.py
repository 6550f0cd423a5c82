"""Options that more than one command takes, added in one place so that they read the same everywhere."""

from __future__ import annotations

import argparse


def add_run_options(p: argparse.ArgumentParser, default_output: str) -> None:
    """Where a training run goes (``--output``, ``--name``, ``--overwrite``) and what it runs on
    (``--amp``, ``--device``): ``effvit train`` and ``effvit rotation train``."""
    p.add_argument("--output", metavar="DIR", help=f"runs folder (default {default_output})")
    p.add_argument("--name", help="run folder name under --output (a folder holding files is refused unless "
                   "--resume or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in the folder")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"])
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1")
