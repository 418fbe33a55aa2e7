"""Model backends: how a model source becomes a `LoadedModel` (tokenizer, prompt renderer, engine).

Backends are not switched on by kind: each backend module has a `register_backends(register)`
hook, and `default_registry()` calls the hooks of the modules in `BACKEND_MODULES` that exist.
A backend states what it can do as class attributes (`supports_half_precision`,
`loads_gguf_natively`); `BackendRegistry.choose` picks one for `BACKEND=auto|<name>`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from common.model_sources import ModelSource, SourceKind, file_sha256
from common.validation import StartupError
from services.transformers_lm.engines import Engine
from services.transformers_lm.engines.grammar import GrammarError, GrammarTokenizer

logger = logging.getLogger(__name__)

# Modules whose `register_backends(register)` hook the default registry calls, when they exist.
BACKEND_MODULES = (
    "services.transformers_lm.backends.transformers_backend",
    "services.transformers_lm.backends.llama_cpp_backend",
)
AUTO = "auto"


class ModelLoadError(StartupError, RuntimeError):
    """The model cannot be loaded; the message is one line that says how to fix it."""


class UnknownBackendError(ModelLoadError):
    pass


def check_sha256_pin(path: Path, expected: str | None, actual: str | None = None) -> str:
    """The file's sha256; raise ModelLoadError when it differs from the pinned one (MODEL_SHA256)."""
    actual = actual or file_sha256(path)
    if expected and actual.lower() != expected.strip().lower():
        raise ModelLoadError(
            f"refusing to start: {path} has sha256 {actual}, but MODEL_SHA256 pins {expected.strip()} "
            "(replace the file or update the pin)"
        )
    return actual


@dataclass(frozen=True)
class LoadOptions:
    """What a backend needs besides the source: settings of the service, already validated."""

    device: str = "auto"  # cpu | cuda | auto
    half_precision: bool = False
    cache_dir: Path = Path(".cache/models")
    sha256: str | None = None  # the pinned sha256 of the model file; a mismatch refuses to load
    additional_eos_tokens: tuple[str, ...] = ()
    max_queue_size: int = 256
    threads: int | None = None  # CPU threads for backends that take a count; None: the cores this process may use
    max_batch_size: int = 16  # sequences a batching engine decodes together
    model_code: str = "auto"  # transformers backend: native | transformers | auto (native when it can)
    gguf_weights: str = "file"  # llama_cpp: the GGUF as it is ("file"), a cached copy ("q8_0", "bf16", "f16"), or "auto"
    context_length: int | None = None  # tokens per sequence, at most the model's window; None: the backend's default

    def window(self, model_window: int) -> int:
        """The context length a sequence gets: the model's window, lowered to the setting if it is lower."""
        return model_window if self.context_length is None else min(model_window, self.context_length)


@dataclass(frozen=True)
class ChatToolCall:
    """A tool call an assistant message made (OpenAI's `tool_calls[i]`); `arguments` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple[ChatToolCall, ...] = ()  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def template_message(self) -> dict:
        """The message as chat templates read it (transformers' convention: arguments as an object)."""
        message: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": _arguments_object(call.arguments)}}
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments_object(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


@dataclass
class ModelInfo:
    """What `/health` and `/v1/models` tell about the loaded model."""

    backend: str
    device: str
    dtype: str
    context_length: int
    eos_token_ids: tuple[int, ...]
    # EOS strings that are not one token of the vocabulary: cut in text instead.
    extra_stop_sequences: tuple[str, ...] = field(default_factory=tuple)
    # What computes the model: "native" (Parley's own code), "transformers", "llama.cpp".
    model_code: str = ""
    # Token ids lie in [0, vocab_size) (a request's eos_token_id is checked against it; 0: unknown).
    vocab_size: int = 0


class LoadedModel(ABC):
    """A model ready to serve: text <-> token ids, its chat template if any, and its engine."""

    info: ModelInfo
    engine: Engine

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as a prompt (with the tokenizer's BOS if it adds one)."""

    @abstractmethod
    def decode(self, token_ids: list[int], skip_special: bool = True) -> str:
        """Text of generated token ids; special tokens left out unless `skip_special` is False
        (Dream's replacement pairs may name one, e.g. `</s>` as a stand-in for a newline)."""

    @property
    @abstractmethod
    def has_chat_template(self) -> bool:
        """Whether `render_chat` can build prompts; without one the service uses Dream's plain format."""

    @abstractmethod
    def render_chat(self, messages: list[ChatMessage], tools: list[dict] | None = None) -> str:
        """The prompt text for `messages`, ending where the assistant's answer begins; `tools` (OpenAI's
        tool objects) go to templates that take them (`chat_template_takes_tools`)."""

    @property
    def chat_template_takes_tools(self) -> bool:
        """Whether the chat template lays tools out itself (it reads a `tools` variable)."""
        return False

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The vocabulary for constrained decoding (about a second to build; built once, then kept)."""
        cached = getattr(self, "_grammar_tokenizer", None)
        if cached is None:
            cached = self._grammar_tokenizer = self.make_grammar_tokenizer()
        return cached

    def make_grammar_tokenizer(self) -> GrammarTokenizer:
        """Build `grammar_tokenizer()`; a backend whose tokenizer llguidance cannot read raises GrammarError."""
        raise GrammarError(f"constrained decoding is not available on the {self.info.backend} backend")

    def close(self) -> None:
        self.engine.close()


class Backend(ABC):
    """Loads models of some sources; registered through a module's `register_backends` hook."""

    name: ClassVar[str]
    supports_half_precision: ClassVar[bool] = False
    loads_gguf_natively: ClassVar[bool] = False  # True: prefer it for .gguf sources under BACKEND=auto

    @classmethod
    def is_available(cls) -> bool:
        """Whether its libraries can be imported here."""
        return True

    @abstractmethod
    def load(self, source: ModelSource, options: LoadOptions) -> LoadedModel:
        """Load the model; raise ModelLoadError with a one-line fix when that is impossible."""


class BackendRegistry:
    """The backends this process knows, by name."""

    def __init__(self) -> None:
        self._backends: dict[str, type[Backend]] = {}

    def register(self, backend: type[Backend]) -> None:
        self._backends[backend.name] = backend

    def names(self) -> list[str]:
        return sorted(self._backends)

    def get(self, name: str) -> type[Backend]:
        try:
            return self._backends[name]
        except KeyError:
            raise UnknownBackendError(
                f"unknown BACKEND {name!r}: choose {AUTO} or one of {', '.join(self.names()) or '(none registered)'}"
            ) from None

    def choose(self, requested: str, source: ModelSource) -> type[Backend]:
        """The backend for `requested` (a name or `auto`): for auto, a GGUF file goes to a backend
        that reads GGUF natively when one is registered and importable, else to transformers."""
        if requested != AUTO:
            backend = self.get(requested)
            if not backend.is_available():
                raise ModelLoadError(f"BACKEND {requested!r} is registered but its libraries are not installed")
            return backend
        if source.kind is SourceKind.GGUF_FILE:
            for name in self.names():
                backend = self._backends[name]
                if backend.loads_gguf_natively and backend.is_available():
                    return backend
        return self.get("transformers")


def default_registry(modules: tuple[str, ...] = BACKEND_MODULES) -> BackendRegistry:
    """A registry filled by the `register_backends` hooks of the backend modules that exist here."""
    registry = BackendRegistry()
    for module_name in modules:
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        hook: Callable[[Callable[[type[Backend]], None]], None] = module.register_backends
        hook(registry.register)
    return registry
