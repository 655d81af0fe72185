"""The `elastic-train` command.

Each concern registers its own subcommands with a `register(subparsers)` function that adds
parsers and sets `func` (called with the parsed namespace; returns the exit code). Packages that
`elastic_train` must not import (chaos) register through the `elastic_train.commands` entry point.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from elastic_train.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from checkpointing import cli as ckpt_cli
    from checkpointing import export
    from elastic_train import data, train
    from elastic_train.goodput import report
    from elastic_train.node import sky_render

    parser = argparse.ArgumentParser(
        prog="elastic-train",
        description="Train PyTorch models on preemptible capacity without losing work.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, data, ckpt_cli, export, sky_render, report):
        module.register(subparsers)
    for ep in entry_points(group="elastic_train.commands"):
        ep.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"elastic-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
