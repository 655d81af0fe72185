"""What torchrun starts for each rank on our nodes: `python -m elastic_train.node.worker ARGS`.

It hands the rank to the node's prefork server (the socket in ELASTIC_TRAIN_PREFORK), whose warm
fork runs `python -m elastic_train.train ARGS`, and stands in for that fork until it ends (see
`elastic_train.node.prefork`). Without the variable, or when no server answers, it runs
`elastic_train.train` here, cold. Either way this process exits as the trainer did: the same code,
or death by the same signal.

Plain torchrun (no prefork server) starts `-m elastic_train.train` itself; this module is how a
node with a server starts it. It imports only the prefork client before it knows which way the
trainer runs, so a warm start loads neither torch nor the trainer here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from elastic_train.node import prefork
from elastic_train.node.contract import PREFORK_SOCKET_ENV

TRAINER_ENTRY = ("-m", "elastic_train.train")
"""How `python` runs the trainer: torchrun's entry without a prefork server, and the command this
module hands to the server (or runs cold)."""
WORKER_ENTRY = ("-m", "elastic_train.node.worker")
"""torchrun's entry on a node with a prefork server: this module, with the trainer's arguments."""


def main(argv: Sequence[str] | None = None) -> None:
    """Run the trainer with `argv` (default: this process's arguments), warm if the node's server
    answers, else here; leave this process as the trainer left its own (exit code or signal).
    Raises SystemExit (as the trainer does), or whatever a cold trainer lets escape."""
    command = [*TRAINER_ENTRY, *(sys.argv[1:] if argv is None else argv)]
    socket_path = os.environ.get(PREFORK_SOCKET_ENV)
    if socket_path:
        code = prefork.run_through_server(socket_path, command)
        if code is not None:
            prefork.exit_like(code)
    prefork.run_as_main(command)


if __name__ == "__main__":
    main()
