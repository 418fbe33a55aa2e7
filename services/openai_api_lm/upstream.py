"""The client of the OpenAI-compatible upstream: one chat completion, within a deadline, errors as types.

It speaks plain HTTP (requests) so that it controls every timeout and every byte it logs: the key
goes only into the Authorization header, and any upstream text that is passed on (an error
message) has the key cut out first.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable

import requests
import urllib3

from common import tracing

logger = logging.getLogger(__name__)

# An answer larger than this is not a chat completion we asked for.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# Connecting never gets more than this, so a black-holed host fails fast even with a long timeout.
MAX_CONNECT_SECONDS = 10.0
# How much of an upstream's error text is passed on to the caller.
MAX_ERROR_TEXT = 300
REDACTED = "[redacted]"


class UpstreamError(RuntimeError):
    """The upstream did not give a usable answer (the service answers 502)."""


class UpstreamUnreachableError(UpstreamError):
    """No connection to the upstream (refused, unknown host, TLS failure)."""


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not answer within the deadline (the service answers 504)."""


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an HTTP error status (401 bad key, 429, 500, ...)."""

    def __init__(self, message: str, upstream_status: int):
        super().__init__(message)
        self.upstream_status = upstream_status


class UpstreamResponseError(UpstreamError):
    """The upstream answered 2xx with something that is not a chat completion."""


class _DroppedConnectionError(UpstreamUnreachableError):
    """The connection closed before any answer (reset, or a kept-alive connection closed by the upstream)."""


@dataclass(frozen=True)
class Credentials:
    """What authenticates one call; `repr` never shows the key."""

    api_key: str | None = None
    organization: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(api_key={'set' if self.api_key else None}, organization={self.organization!r})"

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.organization:
            headers["OpenAI-Organization"] = self.organization
        return headers


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret replaced, so upstream text can be shown and logged safely."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class ChatCompletionsClient:
    """POSTs chat completion requests to one upstream URL, each within a deadline."""

    def __init__(self, url: str, session: requests.Session | None = None):
        self.url = url
        # The environment's proxy and CA bundle settings apply (a hosted upstream may need them).
        self.session = session or requests.Session()

    def create(self, body: dict[str, Any], credentials: Credentials, deadline: float) -> dict[str, Any]:
        """The upstream's JSON answer to `body`; UpstreamError (or a subclass) when there is none.

        `deadline` is a `time.monotonic()` value: the call fails with UpstreamTimeoutError once it passes.
        A connection that the upstream drops before answering is tried once more on a fresh one:
        that is how a kept-alive connection looks when the upstream closed it just as it was reused.
        """
        secrets = (credentials.api_key,)
        started = time.monotonic()
        try:
            status, raw = self._exchange(body, credentials, deadline)
        except _DroppedConnectionError:
            logger.info("upstream %s dropped the connection before answering; asking once more", self.url)
            try:
                status, raw = self._exchange(body, credentials, deadline)
            except _DroppedConnectionError as error:
                raise UpstreamUnreachableError(
                    f"the upstream at {self.url} closed the connection without answering: {redact(str(error), secrets)}"
                ) from None
        logger.info("upstream %s answered %s in %.2fs (%d bytes)", self.url, status, time.monotonic() - started, len(raw))
        if not 200 <= status < 300:
            detail = redact(_error_text(raw), secrets)
            raise UpstreamStatusError(f"the upstream answered {status}: {detail}", upstream_status=status)
        try:
            answer = json.loads(raw)
        except ValueError:
            raise UpstreamResponseError("the upstream's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise UpstreamResponseError("the upstream's answer is not a JSON object")
        return answer

    def _exchange(self, body: dict[str, Any], credentials: Credentials, deadline: float) -> tuple[int, bytes]:
        """One POST: the status and the whole body, or a typed error."""
        secrets = (credentials.api_key,)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeoutError("the upstream was not asked: the request's time was already spent")
        try:
            with self.session.post(
                self.url,
                json=body,
                # The upstream's own key, and the request's traceparent (an upstream that traces joins the trace).
                headers={**credentials.headers(), **tracing.outbound_headers()},
                timeout=(min(remaining, MAX_CONNECT_SECONDS), remaining),
                stream=True,
                # A redirect could carry the Authorization header elsewhere; the card names the URL.
                allow_redirects=False,
                # Headers as given: without this, a ~/.netrc entry would replace our Authorization.
                auth=_headers_as_given,
            ) as response:
                return response.status_code, _read_within(response, deadline)
        except requests.ConnectTimeout:
            raise UpstreamTimeoutError(f"connecting to the upstream at {self.url} timed out") from None
        except requests.ReadTimeout:
            raise UpstreamTimeoutError(f"the upstream at {self.url} did not answer within {remaining:.1f}s") from None
        except requests.ConnectionError as error:
            if _has_arg(error, urllib3.exceptions.ReadTimeoutError):  # a timeout while reading the body
                raise UpstreamTimeoutError(f"the upstream at {self.url} did not answer within {remaining:.1f}s") from None
            if _has_arg(error, urllib3.exceptions.ProtocolError):
                raise _DroppedConnectionError(_reason(error)) from None
            raise UpstreamUnreachableError(
                f"cannot reach the upstream at {self.url}: {redact(_reason(error), secrets)}"
            ) from None
        except requests.RequestException as error:
            raise UpstreamError(f"request to the upstream at {self.url} failed: {redact(_reason(error), secrets)}") from None

def _headers_as_given(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


def _read_within(response: requests.Response, deadline: float) -> bytes:
    """The whole body, unless it is too large or the deadline passes while it trickles in."""
    chunks = []
    size = 0
    for chunk in response.iter_content(chunk_size=64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise UpstreamResponseError(f"the upstream's answer is larger than {MAX_RESPONSE_BYTES} bytes")
        if time.monotonic() > deadline:
            raise requests.ReadTimeout("deadline passed while reading the answer")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_text(raw: bytes) -> str:
    """OpenAI's `error.message` when the body has one, else the body's start."""
    text = raw.decode("utf-8", errors="replace")
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        text = error["message"]
    elif isinstance(error, str):
        text = error
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_TEXT:
        text = text[:MAX_ERROR_TEXT] + "..."
    return text or "(empty body)"


def _has_arg(error: requests.ConnectionError, kind: type[BaseException]) -> bool:
    return any(isinstance(arg, kind) for arg in error.args)


def _reason(error: BaseException) -> str:
    """A requests error, short: 'Connection refused', 'Name or service not known', or its first words."""
    text = str(error)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "certificate verify failed"):
        if marker in text:
            return marker
    return " ".join(text.split())[:MAX_ERROR_TEXT]
