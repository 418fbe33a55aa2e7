"""The prompted skill's work: choose prompt and LLM for a dialog, ask the LLM, score its hypotheses.

Security rules that Dream's universal prompted skill lacks:
- a turn's `lm_service_url` is used only if it is an allowed endpoint (LLM_ENDPOINTS or the default
  GENERATIVE_SERVICE_URL); any other URL is never contacted and the reply's attributes say why;
- an API key goes only to an endpoint whose LLM_ENDPOINTS entry lists that key's env var;
- keys are never logged and never returned.
Each call to an LLM carries the skill's own API key (PARLEY_API_KEYS) and the request's traceparent.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from common import tracing
from common.lm_protocol import GenerationConfig, load_generation_config
from common.validation import RequestValidationError, validate
from skills.prompted_skill.llm_client import LLMCallError, LLMClient
from skills.prompted_skill.protocol import Dialog, DialogReply, Hypothesis
from skills.prompted_skill.settings import Settings

logger = logging.getLogger(__name__)

COMPLETE_CONFIDENCE = 0.9
INCOMPLETE_CONFIDENCE = 0.7
# A sentence is complete when it ends with terminal punctuation, maybe followed by closing quotes or brackets.
_COMPLETE_SENTENCE = re.compile(r"[.!?…][\"'”’)\]]*$")
# Dream puts a space before punctuation in some annotated texts; the LLM should not see it.
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+(?=[.,:;!?])")


def confidence_of(text: str) -> float:
    """0.9 for a complete sentence, 0.7 for text that was cut off."""
    return COMPLETE_CONFIDENCE if _COMPLETE_SENTENCE.search(text) else INCOMPLETE_CONFIDENCE


def dialog_context(dialog: Dialog, prompt: str, default_prompt: str, n_utterances: int) -> list[str]:
    """The texts the LLM sees: the last `n_utterances`, cut where the user's prompt last changed."""
    utterances = dialog.utterances or dialog.human_utterances[-1:]
    texts = [_SPACE_BEFORE_PUNCTUATION.sub("", u.text) for u in utterances]
    # Utterances alternate and the last is the user's: walk the user's turns back while their prompt
    # is the current one, so a dialog that changed prompt does not feed the old persona to the new one.
    keep = len(texts)
    for index in range(len(utterances) - 1, -1, -2):
        turn_prompt = utterances[index].attributes.get("prompt") or default_prompt
        if turn_prompt != prompt:
            keep = len(texts) - index - 2  # from that old turn's answer on, exclusive
            break
    return texts[-min(keep, n_utterances):] if keep else []


class PromptedSkill:
    """Answers dialogs with an LLM; its settings and LLM client come through the constructor."""

    def __init__(self, settings: Settings, llm_client: LLMClient | None = None, *,
                 outbound_headers: Callable[[], dict[str, str]] = dict):
        self.settings = settings
        self.llm_client = llm_client or LLMClient()
        # The skill's key and the request's traceparent, for each LLM call (read in the request's context).
        self.outbound_headers = outbound_headers
        self._allowed_urls = settings.allowed_urls()
        # The generation keys the skill's settings give each endpoint (as written in its file); an
        # endpoint with none gets no config, so the LLM's own default config applies.
        self._configs: dict[str, dict[str, Any]] = {}
        for url in self._allowed_urls:
            path = settings.generative_config_path(url)
            if path is not None:
                setting = "GENERATIVE_SERVICE_CONFIG" if url == settings.generative_service_url else "LLM_ENDPOINTS"
                self._configs[url] = _set_keys(load_generation_config(path, setting=setting))

    def respond(self, dialogs: list[Dialog]) -> list[DialogReply]:
        """One reply per dialog, in order; dialogs of a batch are answered concurrently."""
        if len(dialogs) == 1:
            return [self.respond_to(dialogs[0])]
        with ThreadPoolExecutor(max_workers=min(8, len(dialogs))) as pool:
            futures = [tracing.submit_in_context(pool, self.respond_to, dialog) for dialog in dialogs]
            return [future.result() for future in futures]

    def respond_to(self, dialog: Dialog) -> DialogReply:
        """Hypotheses for one dialog; an LLM that fails or times out gives none, with the reason."""
        attributes = dialog.human_utterances[-1].attributes
        prompt = _text_attribute(attributes, "prompt") or self.settings.prompt
        requested_url = _text_attribute(attributes, "lm_service_url")
        url = requested_url or self.settings.generative_service_url
        if not url:
            return _no_hypothesis("no_llm", "no LLM configured: set GENERATIVE_SERVICE_URL or send lm_service_url")
        if url not in self._allowed_urls:
            # Never contacted: only the distribution's own LLMs may receive dialogs (and keys).
            logger.warning("refused lm_service_url %r: not one of the distribution's LLM endpoints", url)
            return _no_hypothesis(
                "lm_service_url_refused",
                f"lm_service_url {url!r} is not an LLM endpoint of this distribution; "
                f"allowed: {', '.join(self._allowed_urls) or 'none'}",
            )
        try:
            config = self._config_for(url, attributes.get("lm_service_config"))
        except RequestValidationError as error:
            return _no_hypothesis("lm_service_config_invalid", error.message)

        context = dialog_context(dialog, prompt, self.settings.prompt, self.settings.n_utterances_context)
        if not context:
            return _no_hypothesis("empty_dialog", "the dialog has no utterance to answer")
        key_fields = self._key_fields(url, attributes)
        logger.info(
            "asking %s: %d utterances of context, keys sent: %s",
            url, len(context), sorted(key_fields) or "none",
        )
        try:
            texts = self.llm_client.respond(url, context, prompt, config, key_fields, self.settings.generative_timeout,
                                            headers=self.outbound_headers())
        except LLMCallError as error:
            logger.warning("no hypothesis: %s", error)
            return _no_hypothesis("lm_error", str(error))
        hypotheses = [
            Hypothesis(
                text=text,
                confidence=confidence_of(text),
                attributes={"can_continue": "no", "lm_service_url": url},
            )
            for text in (t.strip() for t in texts)
            if text
        ]
        if not hypotheses:
            return _no_hypothesis("lm_empty", f"the LLM at {url} answered only empty text")
        return DialogReply(hypotheses=hypotheses)

    def _config_for(self, url: str, turn_config: Any) -> dict[str, Any] | None:
        """The generation keys to send: the endpoint's config from the skill's settings, with a turn's
        `lm_service_config` (Dream's dict) over it; None when neither sets a key, so that the LLM's own
        default config applies whole. The LLM merges what it gets over its default config."""
        keys = dict(self._configs.get(url, {}))
        if turn_config is not None:
            if not isinstance(turn_config, dict):
                raise RequestValidationError("lm_service_config must be an object of generation keys", "lm_service_config")
            # Dream lets a turn set the LLM timeout here; ours is the skill's GENERATIVE_TIMEOUT.
            overrides = {key: value for key, value in turn_config.items() if key != "timeout"}
            keys.update(_set_keys(validate(GenerationConfig, overrides, prefix="lm_service_config")))
        return keys or None

    def _key_fields(self, url: str, attributes: dict[str, Any]) -> dict[str, list[str]]:
        """Dream's key fields (`{"openai_api_keys": [value]}`) for exactly the env vars `url` may receive.

        A key the user sent with the turn wins over the skill's own environment.
        """
        endpoint = self.settings.llm_endpoints.get(url)
        if endpoint is None:
            return {}
        turn_keys = _turn_keys(attributes)
        fields = {}
        for name in endpoint.key_env_vars:
            value = turn_keys.get(name.upper())
            if value is None and name in self.settings.env_keys:
                value = self.settings.env_keys[name].get_secret_value()
            if value:
                fields[f"{name.lower()}s"] = [value]
        return fields


def _set_keys(config: GenerationConfig) -> dict[str, Any]:
    """The keys a config sets explicitly, as JSON: what a file or a turn said, and nothing else."""
    return config.model_dump(mode="json", exclude_unset=True)


def _turn_keys(attributes: dict[str, Any]) -> dict[str, str]:
    """Keys a turn carries, by upper-case env var name: fields of Dream's `lm_service_kwargs`, of the
    attributes themselves, then of the `api_keys` object our agent puts them in (the last wins). Only
    those an endpoint's `key_env_vars` name are ever sent."""
    keys: dict[str, str] = {}
    for source in (attributes.get("lm_service_kwargs"), attributes, attributes.get("api_keys")):
        if isinstance(source, dict):
            keys.update({str(k).upper(): v for k, v in source.items() if isinstance(v, str) and v})
    return keys


def _text_attribute(attributes: dict[str, Any], name: str) -> str | None:
    value = attributes.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _no_hypothesis(reason: str, message: str) -> DialogReply:
    return DialogReply(attributes={"no_hypothesis_reason": reason, "no_hypothesis_message": message})
