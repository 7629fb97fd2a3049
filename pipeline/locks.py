"""Run locks: one writer at a time for a product's state directory (``pipeline.refresh``) or a cube
(``pipeline.ingest``).

``fcntl.flock`` on a lock file: the kernel drops the lock when its holder dies, so a killed run never leaves a
stale lock. Works on local disks and on NFSv4 / most shared file systems (for several machines, the KubeRay
CronJob's ``concurrencyPolicy: Forbid`` is the first guard). The holder writes its pid and start time into the
file, and a run that finds the lock taken names them.
"""

from __future__ import annotations

import fcntl
import os
import time
from datetime import datetime, timezone
from pathlib import Path


class Busy(RuntimeError):
    """Another run holds the lock."""


class RunLock:
    """``with RunLock(path, wait_s, what):`` holds an exclusive lock on ``path`` (created if missing), waiting
    up to ``wait_s`` seconds for another holder to finish, then raising :class:`Busy` (or ``busy``, a subclass,
    for callers with their own error type). ``what`` names the run in the message."""

    def __init__(self, path: Path, wait_s: float = 0.0, what: str = "run", busy: type[Busy] = Busy):
        self.path, self.wait_s, self.what, self.busy, self.fd = Path(path), wait_s, what, busy, None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise self.busy(f"another {self.what} holds {self.path} ({holder or 'unknown holder'})") from None
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}".encode(),
                  0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
