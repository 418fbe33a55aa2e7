"""Engines, and the token-level contract between the LLM service and them (this module).

The service works in text (prompts, stop sequences, hypotheses); an engine works in token ids.
A request goes in as prompt token ids plus its own sampling settings, and comes back as a
`TokenStream` that yields new token ids as they are generated. Engines are free to schedule many
streams together (continuous batching); the service only submits, iterates and cancels.

Every engine (`continuous_batching.py` for transformers models, `llama_cpp_engine.py` for GGUF
files on llama.cpp) implements `Engine` and feeds its streams through `TokenStream`, so the service
code never depends on which engine runs.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

if TYPE_CHECKING:
    from services.transformers_lm.engines.grammar import Grammar

from common.metrics import EngineLoad


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
    # Token ids that end the sequence (the model's EOS, any additional EOS tokens, a request's eos_token_id).
    stop_token_ids: tuple[int, ...] = ()
    # transformers': a token that would complete an n-gram of this size already in the prompt or
    # the output is never chosen (0 turns it off).
    no_repeat_ngram_size: int = 0
    # transformers' locally typical sampling: keep the tokens whose surprise is closest to the
    # distribution's entropy, up to this probability mass (1.0 turns it off; sampling only).
    typical_p: float = 1.0

    @property
    def uses_openai_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class BeamSearchParams:
    """Beam search over `num_beams` sequences at once, as transformers' `generate` runs it.

    The best `num_return_sequences` finished hypotheses come back; a hypothesis's score is its
    summed log-probability divided by its length to the power `length_penalty`; `early_stopping`
    is transformers' (False: stop when no running beam can beat the finished ones by a heuristic,
    True: as soon as `num_beams` hypotheses finished, "never": only when none can improve).
    With `SamplingParams.do_sample`, the beams' continuations are sampled (transformers' beam sample).
    """

    num_beams: int
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if self.num_beams < 2:
            raise ValueError("beam search needs at least 2 beams")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError("num_return_sequences must be between 1 and num_beams")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError('early_stopping must be true, false or "never"')


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: the prompt's token ids and how to sample its continuation.

    With a `grammar`, every token is chosen among those the grammar allows, and the sequence ends
    (STOP) when the grammar is complete (`engines/grammar.py`).
    """

    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    grammar: "Grammar | None" = None
    # Set for a beam search (`Engine.submit_beam_search`): one request, several sequences.
    beam: BeamSearchParams | None = None


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
    drop the sequence at its next step and free its slot. The engine notes when the sequence joined
    the batch and how much of its prompt came from the prefix cache (`mark_admitted`), for the
    service's metrics (queue time, prefix cache hits).
    """

    request: GenerationRequest
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    cached_prompt_tokens: int = 0
    _items: "queue.SimpleQueue[object]" = field(default_factory=queue.SimpleQueue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    # --- engine side -------------------------------------------------------------------------
    def mark_admitted(self, cached_prompt_tokens: int) -> None:
        """The sequence joined the batch, `cached_prompt_tokens` of its prompt copied from the prefix cache."""
        self.cached_prompt_tokens = cached_prompt_tokens
        self.admitted_at = time.monotonic()

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


@dataclass
class EngineStats:
    """Counters of an engine's scheduler, for logs and the benchmark: `engine.stats`, zeroed by
    `engine.reset_stats()`. Both engines keep them the same way; a counter an engine has no use
    for stays 0 (only llama.cpp defers an admission)."""

    steps: int = 0  # scheduler steps: one model call each
    requests_admitted: int = 0
    requests_finished: int = 0
    admissions_deferred: int = 0  # admissions that waited for a shared prefix being prefilled
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    prompt_tokens_from_cache: int = 0  # of those, copied from a cached prefix
    prompt_tokens_computed: int = 0  # of those, computed (prefilled)
    tokens_generated: int = 0
    rows_per_step_sum: int = 0  # sequences in each step, summed
    max_rows_in_step: int = 0
    model_seconds: float = 0.0  # in the model's forward pass (llama_decode on llama.cpp)
    sampling_seconds: float = 0.0  # logits to tokens, tokens to streams
    step_seconds: float = 0.0  # whole steps: scheduling, model and sampling
    request_seconds_ema: float = 0.0  # recent time from submit to finish (a moving average)

    def count_step(self, rows: int) -> None:
        self.steps += 1
        self.rows_per_step_sum += rows
        self.max_rows_in_step = max(self.max_rows_in_step, rows)

    def count_finished(self, seconds: float) -> None:
        self.requests_finished += 1
        ema = self.request_seconds_ema
        self.request_seconds_ema = seconds if ema == 0 else 0.8 * ema + 0.2 * seconds

    def as_dict(self) -> dict[str, float | int]:
        """The counters, and per-step means in milliseconds."""
        steps = max(self.steps, 1)
        return {
            **asdict(self),
            "mean_rows_per_step": self.rows_per_step_sum / steps,
            "model_ms_per_step": 1000 * self.model_seconds / steps,
            "sampling_ms_per_step": 1000 * self.sampling_seconds / steps,
            "scheduling_ms_per_step": 1000 * (self.step_seconds - self.model_seconds - self.sampling_seconds) / steps,
            "step_ms": 1000 * self.step_seconds / steps,
        }


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading token ids two sequences share (both engines' prefix caches ask it)."""
    limit = min(len(first), len(second))
    index = 0
    while index < limit and first[index] == second[index]:
        index += 1
    return index


class Engine(Protocol):
    """Runs generation for many concurrent callers. `submit` is thread-safe."""

    max_batch_size: int
    max_queue_size: int
    stats: EngineStats

    def load(self) -> EngineLoad:
        """Sequences running and waiting, and the share of KV positions in use: read from any
        thread when Prometheus scrapes, so cheap (no lock, no copy of the cache)."""
        ...

    def reset_stats(self) -> None:
        """Zero `stats` (a benchmark measures one phase at a time)."""
        ...

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a sequence; raise QueueFullError when the queue is full."""
        ...

    def submit_beam_search(self, request: GenerationRequest) -> list[TokenStream]:
        """Queue a beam search (`request.beam` set): its `num_beams` sequences take that many batch
        slots together. The streams, best hypothesis first, get their tokens all at once when the
        search ends (a beam's words are not final before). Cancelling any of them ends the search."""
        ...

    def close(self) -> None:
        """Stop the engine's threads; pending streams finish with CANCELLED."""
        ...
