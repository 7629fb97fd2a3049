"""Run locks against real servers: the lease object of an ``s3://`` cube on the local S3-compatible server
(moto, ``tests/s3_server.py``) -- exclusive, renewed, released, taken over after its holder died -- and an
ingest into an ``s3://`` cube refused while another holds it. The local file lock is covered by
``tests/test_bad_input.py`` (a held lock, the job's message)."""

from __future__ import annotations

import json
import threading
import time
from datetime import date
from pathlib import Path

import pytest
import shapely

from pipeline import storage
from pipeline.locks import Busy, ObjectLock, run_lock


def _lease(url: str) -> dict:
    return json.loads(storage.read_bytes(url))


def test_object_lock_is_exclusive_renewed_and_released(s3_server):
    url = f"s3://{s3_server['bucket']}/locks/exclusive.lock"
    assert isinstance(run_lock(url), ObjectLock)
    with ObjectLock(url, what="ingest into this cube", lease_s=1.5) as held:
        first = _lease(url)
        assert "pid" in first["holder"] and first["expires"] > time.time()
        with pytest.raises(Busy, match=r"another ingest into this cube holds .*exclusive\.lock \(pid \d+ on "):
            with ObjectLock(url, wait_s=0.3, what="ingest into this cube"):
                pass
        time.sleep(2.5)  # past the first lease: the holder's thread renewed it
        assert not held.lost and _lease(url)["expires"] > first["expires"]
        with pytest.raises(Busy):  # still held: renewal, not expiry
            with ObjectLock(url, wait_s=0.0):
                pass
    assert not storage.exists(url)  # released
    with ObjectLock(url, wait_s=0.0):  # and free for the next run at once
        pass


def test_object_lock_of_a_dead_holder_expires_and_is_taken_over_by_one_run(s3_server):
    url = f"s3://{s3_server['bucket']}/locks/dead-holder.lock"
    dead = ObjectLock(url, lease_s=1.0)
    dead.__enter__()
    dead._stop.set()  # the holder "dies": no more renewals, no release
    dead._renewer.join()
    with pytest.raises(Busy):
        with ObjectLock(url, wait_s=0.0):  # its lease has not run out yet
            pass
    # two runs wait for the lease to run out; exactly one takes it over, the other stays busy
    won, busy = [], []

    def contender():
        try:
            with ObjectLock(url, wait_s=2.5, lease_s=30):
                won.append(time.monotonic())
                time.sleep(3.0)
        except Busy:
            busy.append(time.monotonic())

    runs = [threading.Thread(target=contender) for _ in range(2)]
    for r in runs:
        r.start()
    for r in runs:
        r.join()
    assert len(won) == 1 and len(busy) == 1, (won, busy)
    assert not storage.exists(url)


def test_ingest_into_an_s3_cube_waits_for_its_lease_then_says_who_holds_it(s3_server):
    from pipeline.ingest import IngestBusy, run_ingest

    cube = f"s3://{s3_server['bucket']}/locks/held.zarr"
    with ObjectLock(f"s3://{s3_server['bucket']}/locks/.held.zarr.lock", what="ingest into this cube"):
        t0 = time.monotonic()
        with pytest.raises(IngestBusy, match=r"another ingest into this cube holds .*\.held\.zarr\.lock \(pid "):
            run_ingest("no-catalog-is-read-before-the-lock", shapely.box(9.0, 45.0, 9.01, 45.01), date(2024, 5, 1),
                       date(2024, 6, 1), cube, wait_s=1.0, progress=None)
        assert time.monotonic() - t0 >= 1.0  # it waited for the lock as asked
    assert not storage.exists(cube)  # nothing written


def test_object_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(s3_server, tmp_path):
    """A run killed on this machine (SIGKILL: no release, no expiry yet) does not make the next run wait for its
    lease: the lease names the host and pid, and that pid is gone."""
    import os
    import signal
    import subprocess
    import sys

    url = f"s3://{s3_server['bucket']}/locks/killed.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.locks import "
         "ObjectLock; ObjectLock(sys.argv[2]).__enter__(); print('held', flush=True); time.sleep(600)",
         str(Path(__file__).resolve().parents[1]), url],
        env={**os.environ, **s3_server["env"]}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Busy):  # alive: busy
        with ObjectLock(url, wait_s=0.0):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert _lease(url)["expires"] > time.time() + 60  # its lease (LEASE_S) has not run out ...
    t0 = time.monotonic()
    with ObjectLock(url, wait_s=0.0):  # ... and yet the lock is free at once
        assert _lease(url)["pid"] == os.getpid()
    assert time.monotonic() - t0 < 10
