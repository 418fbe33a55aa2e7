"""The token-level contract between the LLM service and the engines that run a model.

The service works in text (prompts, stop sequences, hypotheses); an engine works in token ids.
A request goes in as prompt token ids plus its own sampling settings, and comes back as a
`TokenStream` that yields new token ids as they are generated. Engines are free to schedule many
streams together (continuous batching); the service only submits, iterates and cancels.

Every engine (the plain transformers one, the continuous-batching one, llama.cpp) implements
`Engine` and feeds its streams through `TokenStream`, so the service code never depends on which
engine runs.
"""

from __future__ import annotations

import enum
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled; every row of a batch may have its own."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 turns top-k off
    repetition_penalty: float = 1.0
    # OpenAI's penalties: a token's logit loses frequency_penalty per time it was generated, and
    # presence_penalty once it was generated at all (the prompt's tokens do not count).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    # Token ids that end the sequence (the model's EOS and any additional EOS tokens).
    stop_token_ids: tuple[int, ...] = ()

    @property
    def uses_openai_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: the prompt's token ids and how to sample its continuation."""

    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token (or, decided by the service, a stop sequence)
    LENGTH = "length"  # max_new_tokens reached, or the context window is full
    CANCELLED = "cancelled"  # the caller cancelled (client gone, stop sequence seen)
    ERROR = "error"  # the engine failed; `TokenStream.error` holds the exception


class QueueFullError(RuntimeError):
    """The engine's queue is full; the HTTP layer answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after_seconds: float = 1.0):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class EngineError(RuntimeError):
    """Generation failed inside the engine."""


_END = object()


@dataclass
class TokenStream:
    """New token ids of one sequence, pushed by an engine thread and read by a request thread.

    Iterating blocks until the next token or the end; after the end `finish_reason` is set. A
    failed generation raises `EngineError` from the iterator. `cancel()` tells the engine to
    drop the sequence at its next step and free its slot.
    """

    request: GenerationRequest
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    _items: "queue.SimpleQueue[object]" = field(default_factory=queue.SimpleQueue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    # --- engine side -------------------------------------------------------------------------
    def push(self, token_id: int) -> None:
        self._items.put(token_id)

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.error = error
        self.finish_reason = reason
        self._items.put(_END)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- caller side -------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._items.get()
            if item is _END:
                if self.finish_reason is FinishReason.ERROR:
                    raise EngineError(str(self.error)) from self.error
                return
            yield item  # type: ignore[misc]

    def collect(self) -> list[int]:
        """All new token ids, blocking until the sequence ends."""
        return list(self)


class Engine(Protocol):
    """Runs generation for many concurrent callers. `submit` is thread-safe."""

    max_batch_size: int
    max_queue_size: int

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a sequence; raise QueueFullError when the queue is full."""
        ...

    def close(self) -> None:
        """Stop the engine's threads; pending streams finish with CANCELLED."""
        ...
