"""pytest plugin: a real STAC API (stac-fastapi-pgstac on PostgreSQL + PostGIS).

Use with ``pytest_plugins = ["tests.pgstac_fixture"]`` in conftest.py.

Fixtures (session-scoped, started lazily on first use, always stopped at the end,
also on failures and KeyboardInterrupt):

* ``pgstac_server``               read-only API (like Planetary Computer / Earth Search)
* ``pgstac_server_transactions``  a second server with the Transactions extension
                                  (POST/PUT/DELETE of collections and items)

Neither loads data; tests call ``server.load_catalog(path_to_catalog_json)``
(idempotent: items are upserted). The servers are shared by the whole session,
so tests should use collection ids of their own.

Outside pytest: ``srv = start_pgstac(Path("/tmp/x")); ...; srv.stop()``.
Everything is done by ``infra/stac-api/install.sh`` and ``infra/stac-api/pgstac.sh``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra" / "stac-api"
INSTALL_SH = INFRA / "install.sh"
PGSTAC_SH = INFRA / "pgstac.sh"
DEFAULT_VENV = REPO_ROOT / ".venv-stac-api"

_INSTALL_TIMEOUT_S = 1200  # cold: apt (postgres + postgis) + pip; warm: < 1 s
_UP_TIMEOUT_S = 180


def _run(args: list[str], what: str, timeout: float) -> str:
    env = dict(os.environ)
    env.setdefault("DEBIAN_FRONTEND", "noninteractive")
    try:
        proc = subprocess.run(
            ["bash", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        out = e.output.decode() if isinstance(e.output, bytes) else (e.output or "")
        raise RuntimeError(f"{what} timed out after {timeout:.0f} s:\n{out}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}")
    return proc.stdout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_stac_api(venv: Path = DEFAULT_VENV) -> None:
    """Install PostgreSQL/PostGIS (apt, if missing) and the server venv (idempotent)."""
    _run([INSTALL_SH, venv], "infra/stac-api/install.sh", _INSTALL_TIMEOUT_S)


@dataclass
class PgstacServer:
    url: str
    workdir: Path
    pg_port: int
    api_port: int
    transactions: bool = False
    _stopped: bool = field(default=False, repr=False)

    def load_catalog(self, catalog_json: Path | str) -> None:
        """Load a static STAC catalog (catalog.json → collections → items); upserts."""
        _run(
            [PGSTAC_SH, "load", self.workdir, Path(catalog_json).resolve()],
            f"pgstac.sh load {catalog_json}",
            _UP_TIMEOUT_S,
        )

    def stop(self) -> None:
        """Stop uvicorn and postgres (idempotent)."""
        if self._stopped:
            return
        _run([PGSTAC_SH, "down", self.workdir], "pgstac.sh down", 120)
        self._stopped = True

    @property
    def env(self) -> dict[str, str]:
        """Contents of WORKDIR/env (STAC_API_URL, PG*, pids)."""
        out = {}
        for line in (self.workdir / "env").read_text().splitlines():
            k, _, v = line.partition("=")
            out[k] = v
        return out


def start_pgstac(workdir: Path, transactions: bool = False, venv: Path = DEFAULT_VENV) -> PgstacServer:
    """Install (if needed) and start a STAC API whose state lives in ``workdir``.

    ``workdir`` must be reachable by the ``postgres`` user when running as root
    (e.g. a 0755 directory under /tmp). Free TCP ports are picked here.
    """
    install_stac_api(venv)
    workdir = Path(workdir).resolve()
    last_err: RuntimeError | None = None
    for _attempt in range(3):  # a freshly picked free port may be taken in between
        pg_port, api_port = _free_port(), _free_port()
        if pg_port == api_port:
            continue
        args = [PGSTAC_SH, "up", workdir, "--pg-port", pg_port, "--api-port", api_port, "--venv", venv]
        if transactions:
            args.append("--transactions")
        try:
            _run(args, "pgstac.sh up", _UP_TIMEOUT_S)
        except RuntimeError as e:
            last_err = e
            if "already in use" in str(e):
                continue
            raise
        except BaseException:  # KeyboardInterrupt while starting: leave nothing behind
            subprocess.run(["bash", str(PGSTAC_SH), "down", str(workdir)], capture_output=True, timeout=120)
            raise
        return PgstacServer(
            url=f"http://127.0.0.1:{api_port}",
            workdir=workdir,
            pg_port=pg_port,
            api_port=api_port,
            transactions=transactions,
        )
    raise RuntimeError(f"could not start pgstac on free ports: {last_err}")


def _session_server(transactions: bool) -> Iterator[PgstacServer]:
    # /tmp (not pytest's tmp_path: it may live where postgres cannot reach it) and a
    # short path (the unix socket path limit is 107 bytes).
    workdir = Path(tempfile.mkdtemp(prefix="pgstac-", dir="/tmp"))
    workdir.chmod(0o755)
    server: PgstacServer | None = None
    try:
        server = start_pgstac(workdir, transactions=transactions)
        atexit.register(server.stop)  # belt and braces; stop() is idempotent
        yield server
    finally:
        try:
            if server is not None:
                server.stop()
        finally:
            stopped = server is None or server._stopped
            if stopped and not os.environ.get("PGSTAC_KEEP_WORKDIR"):
                shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pgstac_server() -> Iterator[PgstacServer]:
    """Read-only STAC API for the whole session (no data loaded)."""
    yield from _session_server(transactions=False)


@pytest.fixture(scope="session")
def pgstac_server_transactions() -> Iterator[PgstacServer]:
    """STAC API with the Transactions extension enabled, for the whole session."""
    yield from _session_server(transactions=True)
