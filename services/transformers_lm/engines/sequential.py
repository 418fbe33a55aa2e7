"""The simplest correct engine: one worker thread generates one sequence at a time.

Each step is a forward pass over the new token with the key/value cache, so tokens stream out
as they are made and a cancelled stream stops at the next step. Requests wait in a bounded queue.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading

import torch

from services.transformers_lm.engine import (
    FinishReason,
    GenerationRequest,
    QueueFullError,
    TokenStream,
)
from services.transformers_lm.engines.sampling import make_generator, next_token

logger = logging.getLogger(__name__)

_SHUTDOWN = object()


def cache_argument_name(model: torch.nn.Module) -> str:
    """The key/value cache's argument (and output) name: `cache` in recent transformers, else the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SequentialEngine:
    """Runs a transformers causal LM for many callers, one sequence after another."""

    max_batch_size = 1

    def __init__(self, model: torch.nn.Module, *, context_length: int, max_queue_size: int = 256):
        self.model = model
        self.context_length = context_length
        self.max_queue_size = max_queue_size
        self.device = next(model.parameters()).device
        self._cache_argument = cache_argument_name(model)
        self._pending: "queue.Queue[object]" = queue.Queue()
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._run, name="sequential-engine", daemon=True)
        self._worker.start()

    def submit(self, request: GenerationRequest) -> TokenStream:
        if self._closed.is_set():
            raise RuntimeError("the engine is closed")
        if self._pending.qsize() >= self.max_queue_size:
            raise QueueFullError(f"{self.max_queue_size} sequences are already waiting", retry_after_seconds=1.0)
        stream = TokenStream(request)
        self._pending.put(stream)
        return stream

    def close(self) -> None:
        self._closed.set()
        self._pending.put(_SHUTDOWN)
        self._worker.join(timeout=30)
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, TokenStream):
                item.finish(FinishReason.CANCELLED)

    # --- worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._pending.get()
            if item is _SHUTDOWN or self._closed.is_set():
                if isinstance(item, TokenStream):
                    item.finish(FinishReason.CANCELLED)
                return
            stream: TokenStream = item  # type: ignore[assignment]
            try:
                stream.finish(self._generate(stream))
            except Exception as error:  # noqa: BLE001 - handed to the caller through the stream
                logger.error("generation failed: %r", error)
                stream.finish(FinishReason.ERROR, error)

    @torch.inference_mode()
    def _generate(self, stream: TokenStream) -> FinishReason:
        params = stream.request.sampling
        prompt = list(stream.request.prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt has no tokens")
        generator = make_generator(params)
        stop_ids = set(params.stop_token_ids)
        generated: list[int] = []
        step_input = torch.tensor([prompt], device=self.device)
        cache = None
        for step in range(params.max_new_tokens):
            if stream.cancelled:
                return FinishReason.CANCELLED
            if len(prompt) + step >= self.context_length:
                return FinishReason.LENGTH
            output = self.model(
                input_ids=step_input, use_cache=True, logits_to_keep=1, **{self._cache_argument: cache}
            )
            cache = getattr(output, self._cache_argument)
            previous = torch.tensor(prompt + generated) if params.repetition_penalty != 1.0 else None
            generated_ids = torch.tensor(generated, dtype=torch.long) if params.uses_openai_penalties else None
            token = next_token(
                output.logits[0, -1].to("cpu"),
                params,
                previous,
                generator,
                forbid_stop_tokens=step < params.min_new_tokens,
                generated_token_ids=generated_ids,
            )
            if token in stop_ids:
                return FinishReason.STOP
            generated.append(token)
            stream.push(token)
            step_input = torch.tensor([[token]], device=self.device)
        return FinishReason.LENGTH
