"""A real HTTP proxy on 127.0.0.1 in front of a real STAC API that injects failures on a plan.

Used to test the client's retry behaviour against the real pgstac server: the proxy forwards every request
(method, path, query, body, Host header, so the API's links point back at the proxy) unless the plan says to
answer with an error status or to stall first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests


@dataclass(frozen=True)
class Fault:
    status: int | None = None  # answer this status instead of forwarding
    delay_s: float = 0.0  # stall this long before answering (a read timeout on the client)


# plan(method, path, n) -> Fault or None; n counts requests to that path, from 1.
Plan = Callable[[str, str, int], Fault | None]


@dataclass
class FaultyProxy:
    upstream: str
    plan: Plan
    log: list[tuple[str, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        proxy = self
        counts: dict[str, int] = {}
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                path_only = self.path.split("?", 1)[0]
                with lock:
                    counts[path_only] = counts.get(path_only, 0) + 1
                    n = counts[path_only]
                fault = proxy.plan(self.command, path_only, n)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if fault and fault.delay_s:
                    time.sleep(fault.delay_s)
                if fault and fault.status:
                    payload = b'{"code": "InjectedFault", "description": "injected by the test proxy"}'
                    status, ctype = fault.status, "application/json"
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length",)}
                    r = requests.request(
                        self.command, proxy.upstream + self.path, data=body or None, headers=headers, timeout=30
                    )
                    payload, status = r.content, r.status_code
                    ctype = r.headers.get("content-type", "application/json")
                with lock:
                    proxy.log.append((self.command, path_only, status))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) and retried

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def statuses(self, path: str) -> list[int]:
        return [s for _, p, s in self.log if p == path]
