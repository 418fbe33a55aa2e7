"""How many requests a replica has in progress: its running and waiting requests, as it reports them.

From its Prometheus `/metrics` when it serves the gauges `parley:num_requests_running` and
`parley:num_requests_waiting` (vLLM's names under Parley's prefix; summed over their label sets),
else from its `/health` (`ongoing_requests`: requests received and not yet answered, the LLM
service's own count, common/draining.py). The API key, when the stack has one, goes in an
`Authorization: Bearer` header; it is never logged.
"""

from __future__ import annotations

import re

import requests
from pydantic import SecretStr

RUNNING, WAITING = "parley:num_requests_running", "parley:num_requests_waiting"
# One sample of the Prometheus text format: `name{labels} value [timestamp]`.
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)")


class LoadUnknownError(RuntimeError):
    """The replica did not say how busy it is (unreachable, an error status, no count in its answer)."""


def gauges_from_metrics(text: str, names: tuple[str, ...] = (RUNNING, WAITING)) -> dict[str, float] | None:
    """The sum of each named gauge over its samples; None when one of them is absent."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and match["name"] in names:
            try:
                found[match["name"]] = found.get(match["name"], 0.0) + float(match["value"])
            except ValueError:
                continue
    return found if all(name in found for name in names) else None


class LoadReader:
    """Asks replicas for their load over one HTTP session."""

    def __init__(self, timeout_seconds: float, api_key: SecretStr | None = None, session: requests.Session | None = None):
        self.timeout_seconds = timeout_seconds
        self.session = session or requests.Session()
        self.headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}

    def ongoing(self, base_url: str) -> int:
        """Requests in progress on the replica at `base_url` (http://address:port)."""
        try:
            metrics = self.session.get(base_url + "/metrics", headers=self.headers, timeout=self.timeout_seconds)
            if metrics.status_code == 200:
                gauges = gauges_from_metrics(metrics.text)
                if gauges is not None:
                    return round(gauges[RUNNING] + gauges[WAITING])
            health = self.session.get(base_url + "/health", headers=self.headers, timeout=self.timeout_seconds)
        except requests.RequestException as error:
            raise LoadUnknownError(f"{base_url} did not answer ({type(error).__name__})") from None
        try:
            return int(health.json()["ongoing_requests"])
        except (ValueError, KeyError, TypeError):
            raise LoadUnknownError(f"{base_url}/health answered {health.status_code} without ongoing_requests") from None
