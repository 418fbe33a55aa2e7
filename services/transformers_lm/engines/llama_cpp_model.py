"""A GGUF model loaded by llama.cpp (through llama-cpp-python's low-level API), and its vocabulary.

`LlamaCppModel` owns the `llama_model` pointer: it loads the file once, tokenizes and detokenizes
with the model's own vocabulary, and reads the GGUF metadata (chat template, context length, end
of generation tokens). Contexts that run the model (`LlamaCppEngine`) borrow the pointer.

Importing this module does not import llama_cpp; `load()` does, so the service can list the
backend and tell the user how to install it when the package is missing.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

_backend_lock = threading.Lock()
_backend_ready = False


class LlamaCppUnavailableError(ImportError):
    """llama-cpp-python is not installed; the message says how to install it."""


_log_callbacks: list = []  # ctypes callbacks must outlive every call llama.cpp makes to them
logger = logging.getLogger("llama_cpp")
# ggml's log levels (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.
_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5


def _forward_llama_log(llama_cpp: ModuleType):
    """A llama.cpp log callback passing warnings and errors to Python logging and dropping the rest.

    llama-cpp-python's own callback maps ggml's levels by an older numbering and prints hundreds of
    info lines for every model and context.
    """
    state = {"level": 0}

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, _user_data) -> None:
        if level != _GGML_CONT:
            state["level"] = level
        if state["level"] in (_GGML_WARN, _GGML_ERROR):
            message = text.decode("utf-8", errors="replace").rstrip()
            if message:
                logger.log(logging.ERROR if state["level"] == _GGML_ERROR else logging.WARNING, "%s", message)

    _log_callbacks.append(forward)
    return forward


def import_llama_cpp() -> ModuleType:
    """The low-level llama_cpp module, with llama.cpp's backend initialised once per process."""
    global _backend_ready
    try:
        import llama_cpp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise LlamaCppUnavailableError(
            "the llama_cpp backend needs llama-cpp-python: run `make install-llama-cpp` "
            "(or pip install 'parley[llama-cpp]'), or set BACKEND=transformers"
        ) from error
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_forward_llama_log(llama_cpp), ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


@dataclass(frozen=True)
class GgufMetadata:
    """What the service needs from a GGUF file's header."""

    architecture: str
    name: str
    context_length: int
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


class LlamaCppModel:
    """A loaded GGUF model with tokenizer functions; thread-safe for tokenizing, one owner for freeing."""

    def __init__(self, path: Path, llama_cpp: ModuleType, model_pointer: ctypes.c_void_p):
        self.path = path
        self.llama_cpp = llama_cpp
        self.pointer = model_pointer
        self.vocab = llama_cpp.llama_model_get_vocab(model_pointer)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.metadata = self._read_metadata()

    @classmethod
    def load(cls, path: str | Path) -> "LlamaCppModel":
        """Load a .gguf file on the CPU; raise ValueError when llama.cpp cannot read it."""
        llama_cpp = import_llama_cpp()
        path = Path(path)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        pointer = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not pointer:
            raise ValueError(f"llama.cpp could not load the GGUF file {str(path)!r}")
        return cls(path, llama_cpp, pointer)

    def close(self) -> None:
        if self.pointer:
            self.llama_cpp.llama_model_free(self.pointer)
            self.pointer = None

    # --- metadata ------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        """One GGUF metadata value as text, or None when the file has no such key."""
        size = 256
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = self.llama_cpp.llama_model_meta_val_str(self.pointer, key.encode(), buffer, size)
            if length < 0:
                return None
            if length < size:
                return buffer.raw[:length].decode("utf-8", errors="replace")
            size = length + 1

    def _read_metadata(self) -> GgufMetadata:
        architecture = self.meta("general.architecture") or ""
        context_length = self.meta(f"{architecture}.context_length")
        return GgufMetadata(
            architecture=architecture,
            name=self.meta("general.name") or self.path.stem,
            context_length=int(context_length) if context_length else self.llama_cpp.llama_model_n_ctx_train(self.pointer),
            chat_template=self.meta("tokenizer.chat_template"),
            bos_token=self.token_text(self.llama_cpp.llama_vocab_bos(self.vocab)),
            eos_token=self.token_text(self.llama_cpp.llama_vocab_eos(self.vocab)),
        )

    def quantization(self) -> str:
        """The weights' type as llama.cpp names it (the last word of its model description, e.g. Q4_1)."""
        buffer = ctypes.create_string_buffer(256)
        self.llama_cpp.llama_model_desc(self.pointer, buffer, 256)
        words = buffer.value.decode("utf-8", errors="replace").split()
        return words[-1] if words else "unknown"

    def end_of_generation_token_ids(self) -> tuple[int, ...]:
        """Every token llama.cpp's vocabulary marks as ending generation (EOS, EOT, ...)."""
        is_eog = self.llama_cpp.llama_vocab_is_eog
        return tuple(token for token in range(self.n_vocab) if is_eog(self.vocab, token))

    # --- tokenizer -----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) become their ids."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (self.llama_cpp.llama_token * capacity)()
        count = self.llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:  # the buffer was too small: -count is the size needed
            capacity = -count
            tokens = (self.llama_cpp.llama_token * capacity)()
            count = self.llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        return list(tokens[:count])

    def detokenize_bytes(self, token_ids: list[int] | tuple[int, ...], skip_special: bool = True) -> bytes:
        """The UTF-8 bytes of token ids (a token may hold half a character: decode the whole)."""
        if not token_ids:
            return b""
        tokens = (self.llama_cpp.llama_token * len(token_ids))(*token_ids)
        size = 8 * len(token_ids) + 16
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = self.llama_cpp.llama_detokenize(
                self.vocab, tokens, len(token_ids), buffer, size, skip_special, not skip_special
            )
            if length >= 0:
                return buffer.raw[:length]
            size = -length + 1

    def detokenize(self, token_ids: list[int] | tuple[int, ...], skip_special: bool = True) -> str:
        return self.detokenize_bytes(token_ids, skip_special).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str | None:
        """How a single (special) token is written, e.g. `<|im_end|>`; None for an invalid id."""
        if token_id < 0 or token_id >= self.n_vocab:
            return None
        buffer = ctypes.create_string_buffer(64)
        length = self.llama_cpp.llama_token_to_piece(self.vocab, token_id, buffer, 64, 0, True)
        if length < 0:
            buffer = ctypes.create_string_buffer(-length)
            length = self.llama_cpp.llama_token_to_piece(self.vocab, token_id, buffer, -length, 0, True)
        return buffer.raw[:length].decode("utf-8", errors="replace")
