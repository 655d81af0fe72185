"""How a process starts quickly: helpers that both a worker (a cold start) and the node's processes
(the agent, the prefork server) use. Standard library only, so that importing it loads nothing of
either side."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """For bulk imports: the objects they make live as long as the process, so collecting while
    importing is wasted work (a large share of the time `import elastic_train.trainer` takes).
    On the way out they are frozen into the permanent generation, where no later collection
    scans them, and forks keep sharing their memory pages.

    An exception inside the block propagates; the collector is still frozen and re-enabled (if it
    was enabled on entry)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
