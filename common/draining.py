"""Requests in progress on a service, and draining: how a service stops without dropping one.

A replica that is told to stop (SIGTERM: `docker service scale` down, a rolling update, `docker stack
rm`) must not cut the requests it holds, and must not take new ones it could not finish. `Drain`
counts the requests in progress (`ongoing`, what an autoscaler reads from `/health`); once
`begin()` is called, every request but the observation routes (`/health`, `/ping`,
`/openapi.json`, `/metrics`) is refused with `DrainingError` (a 503, so a caller posts it again to
another replica) while those in progress finish. `common/gunicorn_worker.py` calls `begin()` when
gunicorn tells its worker to stop, and lets the worker stop once `wait_idle` returns.

`install_drain(app)` wraps the app's WSGI callable (the count ends when the server closes the
response, so a streamed answer counts until its last byte) and registers the refusal as a
`before_request` hook: the service's own error handler shapes the 503 (Dream's or OpenAI's).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from flask import Flask, request
from werkzeug.wsgi import ClosingIterator

from common.dream_errors import NotReadyError

# Routes that only observe the service: served while draining, and not counted as requests in progress.
OBSERVATION_PATHS = frozenset({"/health", "/ping", "/openapi.json", "/metrics"})
EXTENSION = "drain"


class DrainingError(NotReadyError):
    """The service is stopping: it finishes the requests it has and takes no new one (503)."""

    def __init__(self) -> None:
        super().__init__("this replica is stopping and takes no new requests; send it to another replica")


class Drain:
    """The requests a service has in progress, and whether it is draining (thread-safe)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._ongoing = 0
        self._draining = False

    @property
    def ongoing(self) -> int:
        """Requests in progress: received and not yet answered to their last byte."""
        return self._ongoing

    @property
    def draining(self) -> bool:
        return self._draining

    def enter(self) -> None:
        with self._changed:
            self._ongoing += 1

    def leave(self) -> None:
        with self._changed:
            self._ongoing -= 1
            self._changed.notify_all()

    def begin(self) -> None:
        """From now on new requests are refused; those in progress go on."""
        with self._changed:
            self._draining = True
            self._changed.notify_all()

    def wait_idle(self, timeout_seconds: float) -> bool:
        """Wait until no request is in progress; False when `timeout_seconds` passed first."""
        deadline = time.monotonic() + timeout_seconds
        with self._changed:
            while self._ongoing > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True


def counts(path: str) -> bool:
    """Whether a request to `path` is work (counted, refused while draining), not an observation."""
    return path.rstrip("/") not in OBSERVATION_PATHS


class _CountingMiddleware:
    """Counts each work request from its arrival until the server closes its response."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], drain: Drain):
        self.wsgi_app = wsgi_app
        self.drain = drain

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not counts(environ.get("PATH_INFO", "")):
            return self.wsgi_app(environ, start_response)
        self.drain.enter()
        try:
            body = self.wsgi_app(environ, start_response)
        except BaseException:
            self.drain.leave()
            raise
        return ClosingIterator(body, self.drain.leave)


def install_drain(app: Flask) -> Drain:
    """Count the app's requests in progress and refuse new ones while it drains; the Drain is
    `app.extensions["drain"]`, where the gunicorn worker finds it."""
    drain = Drain()
    app.extensions[EXTENSION] = drain
    app.wsgi_app = _CountingMiddleware(app.wsgi_app, drain)  # type: ignore[method-assign]

    @app.before_request
    def refuse_new_work_while_draining() -> None:
        if drain.draining and counts(request.path):
            raise DrainingError()

    return drain


def drain_of(app: Any) -> Drain | None:
    """The Drain `install_drain` gave a Flask app, if any."""
    extensions = getattr(app, "extensions", None)
    found = extensions.get(EXTENSION) if isinstance(extensions, dict) else None
    return found if isinstance(found, Drain) else None
