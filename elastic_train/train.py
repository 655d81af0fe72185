"""Entry point of a trainer worker: `torchrun ... -m elastic_train.train [--config F] [--k=v ...]`
or `elastic-train train ...` (a world of one without torchrun)."""

from __future__ import annotations

import argparse
import os
import sys

from elastic_train import config as config_lib
from elastic_train import exit_codes
from elastic_train.startup import gc_paused, torch_outside_tested_range


def run(config_path: str | None, overrides: dict[str, str]) -> int:
    try:
        config = config_lib.load(config_path, overrides)
    except config_lib.ConfigError as e:
        print(f"elastic-train: error: {e}", file=sys.stderr)
        return exit_codes.BAD_CONFIG
    # Imported here so that `--help` and config errors answer without loading torch.
    # On a cold start these are bulk imports (a warm fork has them already): see gc_paused.
    with gc_paused():
        import torch
        import torch.distributed as dist

        from checkpointing import CheckpointError, SaveFailed
        from elastic_train.trainer import Trainer

    if (warning := torch_outside_tested_range(torch.__version__)) and \
            os.environ.get("RANK", "0") == "0":
        print(f"elastic-train: {warning}", file=sys.stderr, flush=True)

    trainer = None
    try:
        trainer = Trainer(config)
        return trainer.run()
    except config_lib.ConfigError as e:
        print(f"elastic-train: error: {e}", file=sys.stderr)
        return exit_codes.BAD_CONFIG
    except (dist.DistError, RuntimeError) as e:
        if not _is_collective_failure(e):
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"elastic-train: collective failed ({first_line}); exiting for torchrun to "
              "re-form the world", file=sys.stderr, flush=True)
        # Exit now, without closing: a save in flight may wait on the dead peer in its own
        # collective for minutes, and it was never committed, so abandoning it loses nothing.
        os._exit(exit_codes.COLLECTIVE_TIMEOUT)
    except SaveFailed as e:
        print(f"elastic-train: checkpoint failed for good: {e}", file=sys.stderr)
        return exit_codes.CHECKPOINT_FAILED
    except CheckpointError as e:
        # Storage that failed for good, or no intact commit left to load: one line, no
        # traceback; a restart resumes from whatever is committed then.
        first_line = " ".join(str(e).split())
        print(f"elastic-train: checkpoint error: {first_line}", file=sys.stderr)
        return exit_codes.CHECKPOINT_FAILED
    finally:
        if trainer is not None:
            trainer.close()


def _is_collective_failure(error: BaseException) -> bool:
    """NCCL errors and timeouts arrive as DistError; gloo reports a vanished peer as a plain
    RuntimeError from its transport ("[gloo/transport/tcp/pair.cc] Connection closed by peer")."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return any(m in text for m in ("gloo", "Gloo", "Connection closed by peer",
                                   "Connection reset by peer", "Timed out"))


def _train_command(args: argparse.Namespace) -> int:
    try:
        overrides = config_lib.overrides_from(args, args.overrides)
    except config_lib.ConfigError as e:
        print(f"elastic-train: error: {e}", file=sys.stderr)
        return exit_codes.BAD_CONFIG
    return run(args.config, overrides)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train (under torchrun, or as a world of one)", description=DESCRIPTION,
        allow_abbrev=False,
    )
    config_lib.add_arguments(p)
    p.set_defaults(func=_train_command, accepts_overrides=True)


DESCRIPTION = ("Every key below is also a TOML key (sections as tables); give it as "
               "--section.key=value or --section.key value.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elastic_train.train",
                                     description=DESCRIPTION, allow_abbrev=False)
    config_lib.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    return _train_command(args)


if __name__ == "__main__":
    sys.exit(main())
