"""A model folder's tokenizer read with the `tokenizers` library alone: what transformers' fast tokenizer does, without importing it.

A transformers fast tokenizer is a `tokenizers.Tokenizer` (the folder's `tokenizer.json`, whose
post-processor adds the special tokens of `add_special_tokens=True`) plus what
`tokenizer_config.json` and `chat_template.jinja` say: the special tokens' names, the chat template,
whether decoding cleans up spaces. `read_native_tokenizer` refuses (NativeTokenizerUnsupported) the
folders where transformers would do more than that — a slow-only tokenizer, flags that rewrite the
post-processor at load time — and the backend then uses transformers' tokenizer.
`tests/test_native_llama.py` checks both give the same ids, text and prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.transformers_lm.backends.chat_template import render_chat_template

# tokenizer_config.json keys that make transformers rebuild the post-processor when it loads.
_REWRITING_FLAGS = ("add_bos_token", "add_eos_token")


class NativeTokenizerUnsupported(ValueError):
    """This folder's tokenizer needs transformers (the message says why)."""


def _token_text(value) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken-like {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, config: dict) -> str | None:
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers' default is the one called "default"
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
    for spaced, joined in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text


@dataclass
class NativeTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    clean_up_spaces: bool

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    def token_id(self, token: str) -> int | None:
        """The id of `token` when it is one token of the vocabulary."""
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def tokenizer_json(self) -> str:
        """The `tokenizer.json` text, for llguidance."""
        return self.tokenizer.to_str()

    def decode(self, token_ids: list[int], skip_special: bool = True) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=skip_special)
        return _clean_up_tokenization(text) if self.clean_up_spaces else text

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return render_chat_template(
            self.chat_template or "", messages, bos_token=self.bos_token, eos_token=self.eos_token, tools=tools
        )


def read_native_tokenizer(directory: Path) -> NativeTokenizer:
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise NativeTokenizerUnsupported("the folder has no tokenizer.json")
    config_file = directory / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except ValueError as error:
        raise NativeTokenizerUnsupported(f"tokenizer_config.json is not JSON: {error}") from None
    flags = [flag for flag in _REWRITING_FLAGS if flag in config]
    if flags:
        raise NativeTokenizerUnsupported(f"tokenizer_config.json sets {', '.join(flags)}")
    from tokenizers import Tokenizer

    return NativeTokenizer(
        tokenizer=Tokenizer.from_file(str(tokenizer_file)),
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        chat_template=_chat_template(directory, config),
        clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
    )
