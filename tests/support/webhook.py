"""A webhook receiver for the tests: an HTTP server on a thread that keeps every JSON body POSTed to it, with the
time it arrived; `down` makes it answer 503 (a webhook that is not taking anything)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.received: list[dict] = []
        self.down = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.received.append({**json.loads(body), "_arrived": time.time(), "_path": self.path})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hooks/T0/B0/secret-token"

    def about(self, alert: str, since: float = 0.0) -> list[dict]:
        """The notices about one alert key (that arrived after `since`), in arrival order."""
        return [body for body in self.received if body.get("alert") == alert and body["_arrived"] >= since]

    def wait_for(self, predicate, timeout: float, what: str) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [body for body in list(self.received) if predicate(body)]
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout} s; received: {[b.get('text') for b in self.received]}")

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()
