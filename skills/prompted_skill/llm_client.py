"""The call to an LLM service's Dream `/respond`, with its failures turned into one typed error."""

from __future__ import annotations

from typing import Any

import requests
from pydantic import TypeAdapter, ValidationError

from common.lm_protocol import GenerationConfig, RespondResponse

_RESPOND_RESPONSE = TypeAdapter(RespondResponse)


class LLMCallError(RuntimeError):
    """The LLM did not answer usefully (unreachable, timed out, an error status, a malformed body)."""


class LLMClient:
    """Posts one dialog to an LLM `/respond` and returns its hypotheses."""

    def __init__(self, session: requests.Session | None = None):
        self.session = session or requests.Session()

    def respond(
        self,
        url: str,
        dialog_context: list[str],
        prompt: str,
        config: GenerationConfig,
        key_fields: dict[str, list[str]],
        timeout_seconds: float,
    ) -> list[str]:
        """The LLM's hypotheses for one dialog. `key_fields` are Dream's `{"<env var>s": [value]}`."""
        body: dict[str, Any] = {
            "dialog_contexts": [dialog_context],
            "prompts": [prompt],
            # Every key, defaults included: the LLM merges what it gets over its own default config,
            # so a key left out (do_sample: false) would silently become the LLM's (do_sample: true).
            "configs": [config.model_dump(mode="json", exclude_none=True)],
            **key_fields,
        }
        try:
            response = self._post(url, body, timeout_seconds)
        except requests.Timeout:
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

    def _post(self, url: str, body: dict[str, Any], timeout_seconds: float) -> requests.Response:
        """POST once more when the connection fails (not when it times out): a service name may stand
        for several replicas (Swarm's DNS round robin), and a fresh connection reaches a live one when
        the replica that held this one was killed or replaced mid-request."""
        try:
            return self.session.post(url, json=body, timeout=timeout_seconds)
        except requests.ConnectionError as error:
            if isinstance(error, requests.Timeout):
                raise
            return self.session.post(url, json=body, timeout=timeout_seconds)


def _error_message(response: requests.Response) -> str:
    try:
        error = response.json()["error"]
        return str(error.get("message") if isinstance(error, dict) else error)[:300]
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:300]
