"""A standalone c10d rendezvous store: `python -m chaos.rdzv_store [--port N]`.

Every node of the local cluster is a torchrun agent started with `--rdzv-conf is_host=false`, so
none of them hosts the store and any of them may die without taking the rendezvous with it. This
process hosts it instead. It prints `PORT <n>` on stdout once it listens and then serves until it
receives SIGTERM or SIGINT (or its parent closes stdin, so it never outlives a crashed harness).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.rdzv_store")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args(argv)

    from elastic_train.node.rendezvous import host_store

    store = host_store(args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the harness that started us is gone
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(f"PORT {store.port}", flush=True)
    stop.wait()
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
