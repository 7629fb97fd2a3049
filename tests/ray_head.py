"""A Ray head for `ray job submit` tests: `ray start --head --block` on free ports, stopped by signalling its
own process group (never `ray stop`, which would stop every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@contextmanager
def ray_head(log_dir: Path, num_cpus: int = 2) -> Iterator[tuple[str, dict]]:
    """-> (dashboard URL for `ray job submit --address`, environment for the client). Logs in log_dir/head.log."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = log_dir / "head.log"
    proc = subprocess.Popen(
        [
            ray_bin(), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats",
            "--include-dashboard=true", f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        env=env, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{dash}"
    import requests

    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/api/version", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.5)
    else:
        raise RuntimeError("ray head did not come up:\n" + log.read_text())
    try:
        yield url, env
    finally:
        # `ray start` records the head in /tmp/ray/ray_current_cluster and only `ray stop` removes it: remove
        # our own record so nothing attaches to a dead head.
        record = Path("/tmp/ray/ray_current_cluster")
        if record.exists() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
