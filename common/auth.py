"""API keys: every route of a service needs one (when the service has keys), but for an allow-list.

Guarded by default: a route a service adds later needs the key without anyone thinking of it; only
`GET /health` and `GET /ping` are public everywhere (orchestrators and Dream's checks ask them), and
a service may name a few more public routes of its own (the agent's chat page: the HTML, CSS and
script that ask for the key; they hold no data). A key comes as `Authorization: Bearer <key>` or
`X-Api-Key: <key>`; it is compared with every configured key in constant time (the SHA-256 digests,
so not even the length shows in the timing), so a timing attack learns nothing, and every key is
compared, so neither does the position of the one that matched. A missing or wrong key is a 401
in the API's own error shape: OpenAI's (`authentication_error`) under /v1, Dream's elsewhere; the
presented value is never echoed or logged.

A service calls others with `Authorization: Bearer <its first key>` (`ApiKeys.outbound_headers`):
every service of a distribution reads the same PARLEY_API_KEYS.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from typing import Iterable, Mapping

from flask import Flask, Response, jsonify, request

# (method, Flask rule) pairs that answer without a key in every service. HEAD is checked as GET.
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({("GET", "/health"), ("GET", "/ping")})
API_KEY_HEADER = "X-Api-Key"
OPENAI_PREFIX = "/v1/"


class ApiKeys:
    """The keys a service accepts; empty: every route is open."""

    def __init__(self, keys: Iterable[str]):
        self._keys = tuple(keys)
        self._digests = tuple(hashlib.sha256(key.encode()).digest() for key in self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:  # never the keys themselves
        return f"ApiKeys({len(self._keys)} keys)"

    def accepts(self, presented: str | None) -> bool:
        """Whether `presented` is one of the keys; every key is compared, each in constant time."""
        if presented is None or not self._digests:
            return False
        candidate = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    def outbound_headers(self) -> dict[str, str]:
        """What this service sends to the services it calls: its first key, or nothing when it has none."""
        return {"Authorization": f"Bearer {self._keys[0]}"} if self._keys else {}


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>`, else `X-Api-Key: <key>`."""
    scheme, _, value = (headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (headers.get(API_KEY_HEADER) or "").strip() or None


def unauthorized(path: str, has_key: bool) -> Response:
    """The 401 in the API's shape: OpenAI's under /v1, Dream's elsewhere."""
    if has_key:
        message = "the API key is not one of this service's keys (PARLEY_API_KEYS)"
    else:
        message = f"an API key is needed: send `Authorization: Bearer <key>` or `{API_KEY_HEADER}: <key>`"
    if path.startswith(OPENAI_PREFIX):
        body = {"error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
    else:
        body = {"error": {"message": message, "field": "Authorization"}}
    response = jsonify(body)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer realm="parley"'
    return response


def is_public(method: str, rule: str | None, public_routes: frozenset[tuple[str, str]]) -> bool:
    method = "GET" if method == "HEAD" else method
    return rule is not None and (method, rule) in public_routes


def init_auth(app: Flask, keys: ApiKeys, extra_public_routes: Iterable[tuple[str, str]] = ()) -> None:
    """Guard every route of `app` but the public ones; a route unknown to the app is guarded too
    (without the key, a client cannot tell which routes exist)."""
    public = PUBLIC_ROUTES | frozenset(extra_public_routes)
    app.extensions["api_keys"] = keys
    app.extensions["public_routes"] = public
    if not keys:
        return

    @app.before_request
    def require_api_key():
        rule = request.url_rule.rule if request.url_rule is not None else None
        if is_public(request.method, rule, public):
            return None
        presented = presented_key(request.headers)
        if keys.accepts(presented):
            return None
        return unauthorized(request.path, presented is not None)


def warn_when_open(logger: logging.Logger, keys: ApiKeys, host: str, port: int) -> None:
    """Without keys on an address others can reach, say so at start, naming the setting that fixes it."""
    if keys or _is_loopback(host):
        return
    logger.warning(
        "listening on %s:%d without PARLEY_API_KEYS: anyone who reaches this port may use every route; "
        "set PARLEY_API_KEYS (`parley secrets init` writes a random key) or SERVICE_HOST=127.0.0.1",
        host, port,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
