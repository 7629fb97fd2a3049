"""Run locks: one writer at a time for a product's state directory (``pipeline.refresh``) or a cube
(``pipeline.ingest``).

- :class:`RunLock`, local paths: ``fcntl.flock`` on a lock file: the kernel drops the lock when its holder dies,
  so a killed run never leaves a stale lock. Works on local disks and on NFSv4 / most shared file systems (for
  several machines, the KubeRay CronJob's ``concurrencyPolicy: Forbid`` is the first guard). The holder writes
  its pid and start time into the file, and a run that finds the lock taken names them.
- :class:`ObjectLock`, ``s3://`` locations (nodes that share no disk): a lease object made with an S3
  conditional write (``If-None-Match: *``: of two runs exactly one creates it), renewed by its holder while it
  runs (``If-Match``: only while it still holds it), deleted at the end. An object store has no kernel to drop
  a dead holder's lock, so the lease expires instead: a run killed on another machine blocks the next one for at
  most :attr:`ObjectLock.LEASE_S` (one killed on the same machine not at all: its pid is gone), and the next run
  then takes the lock over with a conditional write on the dead holder's lease (two runs taking over at once: one
  wins). Needs a store with conditional writes (AWS S3 since 2024,
  MinIO, Ceph RGW, moto); the lease's clock is the holders' wall clock, so nodes need NTP-synchronised time.

:func:`run_lock` picks the right one for a location.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline import storage


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


class ObjectLock:
    """``with ObjectLock(url, wait_s, what):`` holds the lease object ``url`` (``s3://bucket/key``), waiting up to
    ``wait_s`` seconds for another holder to finish or for its lease to expire, then raising :class:`Busy` (or
    ``busy``). The object is JSON: ``holder`` (pid, host, start) and ``expires`` (Unix time). A thread renews the
    lease every ``lease_s / 3`` s; if a renewal finds the lease taken over (this run was stalled past its lease),
    :attr:`lost` is set and the thread stops (the holder may check it; the work itself is idempotent per tile)."""

    LEASE_S = 120.0  # [ours] a killed holder blocks the next run this long at most; renewed every 40 s

    def __init__(self, url: str, wait_s: float = 0.0, what: str = "run", busy: type[Busy] = Busy,
                 lease_s: float | None = None):
        self.url, self.wait_s, self.what, self.busy = storage.check_url(url), wait_s, what, busy
        self.lease_s = float(lease_s or self.LEASE_S)
        self.bucket, _, self.key = storage.object_key(self.url).partition("/")
        self.fs = storage.filesystem(self.url)
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.holder = f"pid {os.getpid()} on {socket.gethostname()} since " \
                      f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}"

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.lease_s}).encode()

    @staticmethod
    def _holder_gone(doc: dict) -> bool:
        """Whether the lease's holder is known to be dead: its lease ran out, or it ran on this host and its
        process is gone (a run killed on a laptop: the next run need not wait for the lease)."""
        if float(doc.get("expires", 0)) < time.time():
            return True
        if doc.get("host") != socket.gethostname() or not isinstance(doc.get("pid"), int):
            return False
        try:
            os.kill(doc["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _put(self, **condition) -> str | None:
        """PUT the lease under ``condition`` (IfNoneMatch / IfMatch); its ETag, or None when the condition
        failed (HTTP 412: the lock is someone else's)."""
        try:
            r = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(),
                                ContentType="application/json", **condition)
        except (FileExistsError, FileNotFoundError):  # 412 on If-None-Match; 404: the If-Match object is gone
            return None
        except OSError as e:
            # s3fs's translation of 412 Precondition Failed on If-Match; AWS answers 409 to a write that races
            # another conditional write of the same key
            if e.errno == errno.EINVAL or "ConditionalRequestConflict" in str(e):
                return None
            raise
        return r["ETag"]

    def _current(self) -> tuple[dict, str] | None:
        """The lease object now (its JSON, its ETag), or None when there is none."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:  # body and ETag of one GET: the same version of the object
            r = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            return await r["Body"].read(), r["ETag"]

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(data)
        except ValueError:  # not our JSON: treated as a lease without an end, never taken over
            doc = {"holder": "an object that is not a lease", "expires": float("inf")}
        return doc, etag

    def __enter__(self) -> ObjectLock:
        deadline = time.monotonic() + self.wait_s
        while True:
            self.etag = self._put(IfNoneMatch="*")
            if self.etag is not None:
                break
            cur = self._current()
            if cur is None:
                continue  # released between our PUT and our GET: try again
            doc, etag = cur
            if self._holder_gone(doc):  # take the lease over (conditional: of two runs, one wins)
                self.etag = self._put(IfMatch=etag)
                if self.etag is not None:
                    break
                continue  # another run took it over first
            if time.monotonic() >= deadline:
                raise self.busy(f"another {self.what} holds {self.url} ({doc.get('holder', 'unknown holder')}; "
                                f"its lease runs until "
                                f"{datetime.fromtimestamp(float(doc.get('expires', 0)), timezone.utc):%H:%M:%S} "
                                "UTC unless renewed)")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="ObjectLock-renew", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                etag = self._put(IfMatch=self.etag)
            except OSError:
                continue  # a network blip: the next renewal tries again, within the lease
            if etag is None:
                self.lost = True
                return
            self.etag = etag

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self.etag is not None and not self.lost:
            cur = self._current()
            if cur is not None and cur[1] == self.etag:  # still ours (not taken over after an expiry)
                with contextlib.suppress(FileNotFoundError):
                    self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
            self.etag = None


def run_lock(location: str | Path, wait_s: float = 0.0, what: str = "run", busy: type[Busy] = Busy):
    """The lock for ``location`` (the lock file or object itself): :class:`ObjectLock` for an ``s3://`` URL,
    else :class:`RunLock`."""
    if storage.is_remote(location):
        return ObjectLock(str(location), wait_s, what, busy)
    return RunLock(Path(location), wait_s, what, busy)
