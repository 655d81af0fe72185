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


TESTED_TORCH = ">=2.13,<2.14"
"""The torch releases this code is tested with: the rendezvous handler and DCP I/O reach private
torch names that move between releases. pyproject.toml requires the same range."""


def torch_outside_tested_range(version: str) -> str | None:
    """One line saying that torch `version` is outside `TESTED_TORCH`, or None when it is
    inside (a local build suffix such as +cpu or +cu126 is ignored). An unparsable version is
    reported as outside."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(Version(version).base_version)
    except InvalidVersion:
        release = None
    if release is not None and release in SpecifierSet(TESTED_TORCH):
        return None
    return (f"warning: torch {version} is outside the tested range torch{TESTED_TORCH}; "
            "rendezvous and checkpoint I/O use private torch names that may have moved")
