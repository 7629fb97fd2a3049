"""A real S3-compatible server on 127.0.0.1 for the object-storage tests: moto in server mode (``moto_server``,
installed by ``make install`` with the dev extras), one per test module, with a bucket made through its S3 API.

The pipeline reaches it the way it reaches any S3-compatible store: ``AWS_ENDPOINT_URL`` and credentials in the
environment (``pipeline.storage``); :func:`s3_env` is that environment for the job processes a test starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BUCKET = "skysense-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables a process needs to use the server (moto accepts any key pair)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "skysense-test", "AWS_SECRET_ACCESS_KEY": "secret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """{"endpoint", "env", "bucket"}: a moto S3 server started for the module (stopped after it), its bucket
    made, and this process's environment pointed at it for the module's duration."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.skip(f"{exe} is missing: `make install` installs moto[server] with the dev extras")
    port = _free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=lf, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
    env = s3_env(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from pipeline import storage

        storage.filesystem(f"s3://{BUCKET}").mkdir(BUCKET)
        yield {"endpoint": endpoint, "env": env, "bucket": BUCKET}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)
