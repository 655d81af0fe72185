"""`elastic-train ckpt ls|verify|gc|copy`: inspect and maintain checkpoints under a run URI.

Exit codes: 0 success; 1 the checkpoint is bad or missing (verify, copy); 2 bad input (an
unknown URI scheme, a bad number) or storage that failed for good. Errors are one line on stderr
naming the bad value; credentials never appear (they come from the environment or fsspec config).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from checkpointing.commit import committed_info, list_steps, verify_step
from checkpointing.errors import CheckpointError, CorruptCheckpoint, NoSuchCheckpoint
from checkpointing.retention import collect_garbage
from checkpointing.storage import Storage
from checkpointing.transfer import copy_checkpoints

PROG = "elastic-train ckpt"


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def positive(text: str) -> int:
    value = non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ckpt` command and its subcommands; each sets `func(args) -> exit code`."""
    ckpt = subparsers.add_parser("ckpt", help="list, verify, garbage-collect and copy checkpoints",
                                 description=__doc__)
    sub = ckpt.add_subparsers(dest="ckpt_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("ls", help="list committed and partial steps under URI")
    p.add_argument("uri", metavar="URI", help="s3://bucket/prefix, gs://..., file://... or a path")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=guarded(cmd_ls))

    p = sub.add_parser("verify", help="check a committed step's files against its COMMIT.json")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--step", type=non_negative, default=None, help="default: the newest")
    p.add_argument("--quick", action="store_true", help="sizes only, no checksums")
    p.set_defaults(func=guarded(cmd_verify))

    p = sub.add_parser("gc", help="keep the newest K committed steps, remove partial debris")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--keep", type=positive, required=True, metavar="K")
    p.set_defaults(func=guarded(cmd_gc))

    p = sub.add_parser("copy", help="copy committed steps to another URI, COMMIT.json last")
    p.add_argument("src", metavar="SRC_URI")
    p.add_argument("dst", metavar="DST_URI")
    p.add_argument("--step", type=non_negative, default=None, help="default: every committed")
    p.set_defaults(func=guarded(cmd_copy))


def guarded(fn: Callable[[argparse.Namespace], int], prog: str = PROG
            ) -> Callable[[argparse.Namespace], int]:
    """Turn our errors into one line on stderr (`prog: error: ...`) and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (NoSuchCheckpoint, CorruptCheckpoint) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        except (CheckpointError, ValueError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2

    return run


def storage_for(uri: str) -> Storage:
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        from fsspec.registry import known_implementations

        if scheme not in known_implementations:
            raise ValueError(f"unknown URI scheme {scheme!r} in {uri!r}")
    return Storage(uri, retry_timeout_s=30.0)


def cmd_ls(args: argparse.Namespace) -> int:
    storage = storage_for(args.uri)
    listing = list_steps(storage)
    rows = [{"step": c.step, "committed": True, **c.summary()} for c in listing.committed]
    rows += [{"step": s, "committed": False} for s in listing.partial]
    rows.sort(key=lambda r: r["step"])
    for row in rows:
        if args.json:
            print(json.dumps(row, sort_keys=True))
        elif row["committed"]:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["time"]))
            print(f"step {row['step']:>8}  committed  world={row['world_size']}  "
                  f"files={row['files']}  bytes={row['total_bytes']}  {when}  "
                  f"config={row['config_digest'] or '-'}")
        else:
            print(f"step {row['step']:>8}  partial (no COMMIT.json)")
    if not rows and not args.json:
        print(f"no checkpoints under {storage.url}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    storage = storage_for(args.uri)
    info = committed_info(storage, args.step)
    report = verify_step(storage, info, deep=not args.quick)
    print(("ok: " if report.ok else "BAD: ") + report.detail)
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace) -> int:
    removed = collect_garbage(storage_for(args.uri), args.keep)
    for url in removed:
        print(f"removed {url}")
    print(f"{len(removed)} file(s) removed")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    src, dst = storage_for(args.src), storage_for(args.dst)
    results = copy_checkpoints(src, dst, args.step)
    for r in results:
        what = "already there" if r.skipped else f"{r.copied_files} files, {r.copied_bytes} bytes"
        print(f"step {r.step}: {what}; verified at {dst.url}")
    if not results:
        print(f"no committed steps under {src.url}")
    return 0
