"""What a node's agent and its workers agree on: the environment variables the agent sets for the
workers it starts, and the rendezvous-store keys of the join protocol. Both sides import this
module and nothing else of the other; it imports nothing but the standard library, so a worker
that reads it loads no agent code.

The join protocol (saving before a node joins), per round of the rendezvous, under
`round_key(run_id, round)`:
- `listening`: set by the world's rank 0 once it can save on request.
- `asked`: set by an agent that sees a node waiting to join.
- `saved`: set by rank 0 once a checkpoint at or after the asked step has committed.
- `expected`: set by the agents that let nodes in: the node count the next round completes at.
- `process_group`: the prefix under which the world's workers build their process group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

RDZV_STORE_ENV = "ELASTIC_TRAIN_RDZV_STORE"
"""Set by the agent for its workers: host:port of the rendezvous store."""
JOIN_KEY_ENV = "ELASTIC_TRAIN_JOIN_KEY"
"""Set by the agent for its workers: `round_key` of the round that formed their world."""
TIMER_FILE_ENV = "TORCHELASTIC_TIMER_FILE"
"""The FIFO of a node's step timers: workers arm them, the agent's hang watchdog serves them."""
PREFORK_SOCKET_ENV = "ELASTIC_TRAIN_PREFORK"
"""Path of the node's prefork socket; unset = every worker starts cold."""
AGENT_PID_ENV = "ELASTIC_TRAIN_AGENT_PID"
"""Set in a forked worker: its agent's pid (the worker's parent is the server, not the agent)."""
AGENT_TAG_ENV = "ELASTIC_TRAIN_AGENT_TAG"
"""Set on each agent a node starts, inherited by its workers: finds them after the agent died."""
NOTICE_FILE_ENV = "ELASTIC_TRAIN_NOTICE_FILE"
"""A file whose existence is this node's preemption notice (written by the YAML's hook)."""
FINAL_WEIGHTS = "final/model.safetensors"
"""Where, under the run's URI, rank 0 writes the final weights: a node that finds the job ended
looks there to tell a finished run from an abandoned one."""

LISTENING, ASKED, SAVED, EXPECTED, PROCESS_GROUP = (
    "listening", "asked", "saved", "expected", "process_group")


def round_key(run_id: str, round_: int | str) -> str:
    """The store key prefix of one round: its join requests, the nodes it expects, and the
    process group of the world it formed."""
    return f"elastic_train/join/{run_id}/{round_}"


def world_store(env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """In a worker: (host:port of the rendezvous store, this world's key prefix), as its agent
    set them; None when the agent is not `c10d-fast`, or when the variables were left in the
    environment by another run (their key names a run other than torchrun's
    TORCHELASTIC_RUN_ID: e.g. a process that hosted a handler started this torchrun)."""
    env = os.environ if env is None else env
    endpoint, key = env.get(RDZV_STORE_ENV, ""), env.get(JOIN_KEY_ENV, "")
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if not endpoint or not run_id or not key.startswith(round_key(run_id, "")):
        return None
    return endpoint, key
