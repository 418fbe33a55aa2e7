"""A tiny real HTTP server on loopback that records every request and answers what a test tells it.

For tests about a caller's own logic (which URL it contacts, which fields it sends, how it handles
a hang or an error), where the point is to observe the connection itself.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    delay_seconds: float = 0.0
    # Close the connection without answering, as a server process that is killed mid-request does.
    drop_connection: bool = False
    # A plain-text body instead of `body` as JSON (e.g. Prometheus' text format).
    text: str | None = None


@dataclass
class RecordingServer:
    base_url: str
    requests: list[RecordedRequest] = field(default_factory=list)
    connections: int = 0
    # Given the request, what to answer; tests replace it.
    answer: Callable[[RecordedRequest], Reply] = lambda request: Reply(200, {})

    def url(self, path: str) -> str:
        return self.base_url + path


@contextlib.contextmanager
def recording_server(answer: Callable[[RecordedRequest], Reply] | None = None) -> Iterator[RecordingServer]:
    """Serve on a free loopback port until the block ends; every connection and request is recorded."""
    state: dict[str, RecordingServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            state["server"].connections += 1
            super().setup()

        def _handle(self) -> None:
            server = state["server"]
            length = int(self.headers.get("Content-Length") or 0)
            recorded = RecordedRequest(self.command, self.path, dict(self.headers), self.rfile.read(length))
            server.requests.append(recorded)
            reply = server.answer(recorded)
            if reply.delay_seconds:
                time.sleep(reply.delay_seconds)
            if reply.drop_connection:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            payload = json.dumps(reply.body).encode() if reply.text is None else reply.text.encode()
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json" if reply.text is None else "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the caller gave up waiting, which is what some tests are about

        do_GET = do_POST = _handle

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server = RecordingServer(f"http://127.0.0.1:{httpd.server_address[1]}")
    if answer is not None:
        server.answer = answer
    state["server"] = server
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
