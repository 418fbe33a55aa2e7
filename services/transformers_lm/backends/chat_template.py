"""A model's own chat template (a GGUF's `tokenizer.chat_template`, a folder's `chat_template.jinja`),
rendered the way transformers renders it.

transformers compiles a tokenizer's template with jinja2 in a sandbox, with `trim_blocks` and
`lstrip_blocks`, loop controls, `raise_exception`, `strftime_now` and a `tojson` that does not
escape HTML; it passes `messages`, `add_generation_prompt` and the special tokens. Doing the
same here lets the llama.cpp backend and the native tokenizer (`native_tokenizer.py`) build the
very prompt transformers builds for the same model, without loading transformers.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def template_takes_tools(source: str | None) -> bool:
    """Whether a chat template lays out tools itself: it reads the `tools` variable transformers passes."""
    return bool(source) and re.search(r"\btools\b", source) is not None


class ChatTemplateError(ValueError):
    """The template failed for these messages (it may refuse a role order, e.g. two system turns)."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)


def render_chat_template(
    source: str,
    messages: list[dict[str, str]],
    *,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> str:
    """The prompt text for `messages` (and `tools`, for a template that lays them out);
    ChatTemplateError when the template refuses them."""
    extra = {"tools": tools} if tools else {}
    try:
        return compile_chat_template(source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **extra,
        )
    except jinja2.exceptions.TemplateError as error:
        raise ChatTemplateError(f"the model's chat template refused these messages: {error}") from error
