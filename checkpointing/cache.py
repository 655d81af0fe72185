"""A node-local copy of the newest checkpoint, read on restart when it matches the remote commit.

Each rank writes the files it uploads to `{cache_dir}/{run id}/step_N/` as well. On load a file is
read from the cache only if the remote COMMIT.json lists it with exactly the cached size, and every
chunk read from it is checked against COMMIT.json's CRC-32s as it is read, exactly as a remote
read is (`dcp_io.ParallelReader`); a cached file that fails (stale, flipped, torn by a crash) is
read from the remote store instead, which is the truth.
The cache never fails a save or a load: its errors are logged and it is bypassed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

from checkpointing.commit import CommitInfo, parse_step_dir, step_dir
from checkpointing.storage import Storage

log = logging.getLogger(__name__)


class LocalCache:
    def __init__(self, cache_dir: str, run_url: str) -> None:
        # One subdirectory per run URI, so two runs sharing a cache_dir never mix files.
        run_id = hashlib.sha256(run_url.encode()).hexdigest()[:16]
        self.root = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), run_id)
        os.makedirs(self.root, exist_ok=True)
        self.storage = Storage(self.root, retry_timeout_s=0.0)

    def step_storage(self, step: int) -> Storage:
        return self.storage.child(step_dir(step))

    def sources_for(self, info: CommitInfo) -> dict[str, Storage]:
        """{file name: cache Storage} for every file cached with its committed size (its bytes
        are checked as they are read)."""
        found = {}
        base = os.path.join(self.root, step_dir(info.step))
        for name, rec in info.files.items():
            path = os.path.join(base, name)
            try:
                if os.path.getsize(path) != rec.size:
                    continue
            except OSError:
                continue
            found[name] = self.step_storage(info.step)
        return found

    def prune(self, keep_step: int) -> None:
        """Remove cached steps other than `keep_step` (errors ignored: another rank may race)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            step = parse_step_dir(name)
            if step is not None and step != keep_step:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
