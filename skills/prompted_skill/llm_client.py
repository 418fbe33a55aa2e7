"""The call to an LLM service's Dream `/respond`, with its failures turned into one typed error."""

from __future__ import annotations

import logging
import time
from typing import Any

import requests
from pydantic import TypeAdapter, ValidationError

from common.lm_protocol import RespondResponse

_RESPOND_RESPONSE = TypeAdapter(RespondResponse)
logger = logging.getLogger(__name__)

# A replica that is gone should fail a connect in seconds; reading the answer has the whole timeout.
CONNECT_TIMEOUT_SECONDS = 3.0
# Pauses before the retries after a dropped connection: long enough for a dead replica's address to
# leave the service's DNS answer, short against a generation's timeout.
RETRY_PAUSES_SECONDS = (0.2, 1.0)
# What a replica answers when it cannot take a request now (stopping, or loading its model).
REPLICA_UNAVAILABLE = 503


class LLMCallError(RuntimeError):
    """The LLM did not answer usefully (unreachable, timed out, an error status, a malformed body)."""


class LLMClient:
    """Posts one dialog to an LLM `/respond` and returns its hypotheses.

    Every call opens a connection of its own, with its own DNS lookup, and none is kept alive. A
    service name may stand for several replicas (Swarm's DNS round robin): pooled connections would
    pin the calls to the replicas they were opened to, so a replica the autoscaler adds would get
    nothing while the load lasts, and one being scaled away would keep getting calls. A connection
    costs a millisecond; a generation, seconds.
    """

    def respond(
        self,
        url: str,
        dialog_context: list[str],
        prompt: str,
        config: dict[str, Any] | None,
        key_fields: dict[str, list[str]],
        timeout_seconds: float,
        headers: dict[str, str] | None = None,
    ) -> list[str]:
        """The LLM's hypotheses for one dialog. `config` holds the generation keys the skill sets (None:
        the LLM's own default config applies); `key_fields` are Dream's `{"<env var>s": [value]}`;
        `headers` go with the request (the skill's API key, the request's traceparent)."""
        body: dict[str, Any] = {
            "dialog_contexts": [dialog_context],
            "prompts": [prompt],
            "configs": [config],
            **key_fields,
        }
        try:
            response = self._post(url, body, timeout_seconds, headers or {})
        except requests.ReadTimeout:
            raise LLMCallError(f"the LLM at {url} did not answer within {timeout_seconds:g}s") from None
        except requests.RequestException as error:
            # The exception's text names the URL only, never the body (which may carry keys).
            raise LLMCallError(f"the LLM at {url} could not be reached: {type(error).__name__}") from None
        if response.status_code != 200:
            raise LLMCallError(f"the LLM at {url} answered {response.status_code}: {_error_message(response)}")
        try:
            hypotheses = _RESPOND_RESPONSE.validate_json(response.content)
        except ValidationError:
            raise LLMCallError(f"the LLM at {url} answered a body that is not [[hypothesis, ...]]") from None
        if len(hypotheses) != 1:
            raise LLMCallError(f"the LLM at {url} answered {len(hypotheses)} dialogs for 1")
        return hypotheses[0]

    def _post(self, url: str, body: dict[str, Any], timeout_seconds: float, headers: dict[str, str]) -> requests.Response:
        """POST, and again on a fresh connection when the connection fails or the replica answers 503
        (not when the answer times out).

        A service name may stand for several replicas (Swarm's DNS round robin). When the replica
        that held the connection is killed or replaced mid-request, the retry opens a new
        connection, after a short pause, with a fresh DNS lookup that reaches a live replica. A
        replica that is stopping (scaled down, updated) answers 503 to what it will not finish, as
        one still loading its model does: that request too goes to another replica. The connect
        timeout is short, so an address that no longer answers costs seconds, not the whole
        budget, before the next address of the name is tried. After the last retry a 503 is
        returned as it is, a connection failure raised.
        """
        deadline = time.monotonic() + timeout_seconds
        timeout = (min(CONNECT_TIMEOUT_SECONDS, timeout_seconds), timeout_seconds)
        failure: requests.Response | requests.ConnectionError
        for pause in (0.0, *RETRY_PAUSES_SECONDS):
            if pause:
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
                logger.warning("the LLM at %s %s; retrying on a new connection", url, _failure_text(failure))
            try:
                with requests.Session() as connection:  # a connection of its own, closed after
                    response = connection.post(url, json=body, timeout=timeout, headers=headers)
                if response.status_code != REPLICA_UNAVAILABLE:
                    return response
                failure = response
            except requests.ConnectionError as error:  # includes ConnectTimeout: the request never left
                failure = error
        if isinstance(failure, requests.Response):
            return failure
        raise failure


def _failure_text(failure: requests.Response | requests.ConnectionError) -> str:
    if isinstance(failure, requests.Response):
        return f"answered 503 ({_error_message(failure)})"
    return f"dropped the connection ({type(failure).__name__})"


def _error_message(response: requests.Response) -> str:
    try:
        error = response.json()["error"]
        return str(error.get("message") if isinstance(error, dict) else error)[:300]
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:300]
