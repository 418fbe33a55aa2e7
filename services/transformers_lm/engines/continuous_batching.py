"""Continuous (iteration-level) batching: concurrent requests share every forward pass of the model.

One scheduler thread owns the model. Each step it drops cancelled rows, admits waiting requests
into free slots, runs ONE forward pass over a packed sequence — one token for every decoding row
plus the prompt of every joining row, less the beginning found in the prefix cache
(`prefix_cache.py`) — and gives every row its next token, chosen with that
row's own sampling settings. A row leaves the batch as soon as it hits one of its stop tokens, its
`max_new_tokens`, the context window or a cancel; the next waiting request takes its slot at the
next step, without waiting for the longest row. See `slot_cache.py` for how rows at different
positions share a pass without padding. A row with a grammar (`grammar.py`) has the tokens its grammar
forbids set to -inf in its logits before its token is chosen, and ends when the grammar is complete.

The engine runs a `PackedModel`: `native_llama.NativeLlama` for the Llama family, or any
transformers causal LM through `slot_attention.TransformersPackedModel` (a plain `torch.nn.Module`
handed in is wrapped so).

Why not transformers' own `ContinuousBatchingManager` (`model.init_continuous_batching()`,
`generate_batch`)? It was studied and measured (bench/, docs in the module below); it does not do
the job here:
- per-request sampling is limited to temperature/top-k/top-p, and only when the model's generation
  config enabled those processors at start-up; `do_sample`, seeds, repetition penalty and
  `min_new_tokens` are one setting for the whole manager, so requests with different settings
  cannot share a batch;
- a full input queue blocks the caller (up to 10 s, then raises `queue.Full`) instead of refusing at
  once, so a service cannot answer 429 with Retry-After;
- its paged cache is sized up front from a fraction of free memory, which on a CPU host means
  guessing and often allocating gigabytes for a 135M model.
What this engine adds: per-row settings of every kind, bounded queue with an immediate
`QueueFullError`, cancel at the next step, a failing step that fails only its rows' streams (the
engine keeps serving), and a cache that grows with the longest row.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from common.metrics import EngineLoad
from services.transformers_lm.engines import (
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    TokenStream,
)
from services.transformers_lm.engines.grammar import StepMasks, advance, is_complete
from services.transformers_lm.engines.beam_search import BeamSearch
from services.transformers_lm.engines.row_sampling import RowSampler, choose_next_tokens
from services.transformers_lm.engines.prefix_cache import DEFAULT_BUDGET_BYTES, PrefixCache
from services.transformers_lm.engines.slot_cache import SlotBatch, SlotKVCache

logger = logging.getLogger(__name__)

# Prompt tokens admitted per step beyond the first joining row: bounds how long one step (and so
# every decoding row's next token) can be delayed by a burst of long prompts.
DEFAULT_MAX_PREFILL_TOKENS_PER_STEP = 2048


class PackedModel(Protocol):
    """A causal LM that runs one packed step over a `SlotKVCache` (see `slot_cache.py`)."""

    vocab_size: int
    max_positions: int
    dtype: torch.dtype
    device: torch.device

    def new_cache(self, num_slots: int, max_positions: int) -> SlotKVCache: ...

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, batch: SlotBatch, logit_indices: torch.Tensor
    ) -> torch.Tensor:
        """The float32 logits [len(logit_indices), vocab] of the step's tokens at `logit_indices`."""


def as_packed_model(model) -> PackedModel:
    """`model` itself when it runs packed steps; a transformers model wrapped so (slot attention)."""
    if isinstance(model, torch.nn.Module):
        from services.transformers_lm.engines.slot_attention import TransformersPackedModel

        return TransformersPackedModel(model)
    return model


@dataclass(eq=False)
class _Row:
    """One sequence in (or waiting for) the batch: a request's own, or one beam of a beam search."""

    request: GenerationRequest
    sampler: RowSampler | None  # None for a beam: its group chooses the tokens
    submitted_at: float
    stream: TokenStream | None = None  # None for a beam: its group holds the streams
    group: "_BeamGroup | None" = None
    counts_as_request: bool = True  # a beam search counts once in the stats, through one of its rows
    slot: int = -1
    length: int = 0  # positions already in the slot's KV cache
    cached_prefix: int = 0  # prompt tokens copied from the prefix cache when the row joined
    next_input: int | None = None  # the last chosen token, fed at the next step
    new_token_ids: list[int] = field(default_factory=list)
    matcher: object | None = None  # the row's grammar state (llguidance), None when unconstrained

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def cancelled(self) -> bool:
        return self.group.cancelled if self.group is not None else self.stream.cancelled

    @property
    def finished(self) -> bool:
        streams = self.group.streams if self.group is not None else [self.stream]
        return all(stream.finish_reason is not None for stream in streams)

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        for stream in self.group.streams if self.group is not None else [self.stream]:
            stream.finish(reason, error)


@dataclass(eq=False)
class _BeamGroup:
    """A beam search: its rows (one per beam, all in the batch together) and the streams it fills at the end."""

    streams: list[TokenStream]
    search: BeamSearch
    rows: list[_Row] = field(default_factory=list)  # rows[i] runs search.running[i]; the rest wait for a beam

    @property
    def cancelled(self) -> bool:
        return any(stream.cancelled for stream in self.streams)

    @property
    def lead(self) -> _Row:
        return self.rows[0]


class ContinuousBatchingEngine:
    """An `Engine` that schedules concurrent `GenerationRequest`s together on one causal LM.

    Given a transformers model, the engine takes it over: it switches the model's attention to slot
    attention, so the model should not be used for anything else (plain `generate` would fail on it).
    """

    def __init__(
        self,
        model: PackedModel | torch.nn.Module,
        *,
        context_length: int | None = None,
        max_batch_size: int = 16,
        max_queue_size: int = 64,
        max_prefill_tokens_per_step: int = DEFAULT_MAX_PREFILL_TOKENS_PER_STEP,
        prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES,
        warm_up: bool = True,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue_size < 0:
            raise ValueError("max_queue_size must not be negative")
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step
        self.model = as_packed_model(model)
        self.max_context_tokens = int(context_length or self.model.max_positions)
        self.vocab_size = self.model.vocab_size
        self.device = self.model.device
        self._cache = self.model.new_cache(max_batch_size, self.max_context_tokens)
        self._prefixes = PrefixCache(prefix_cache_bytes)
        self._masks: StepMasks | None = None  # made when the first constrained row arrives
        self.stats = EngineStats()
        self._active: list[_Row] = []  # row i sits in slot i
        self._waiting: collections.deque[_Row | _BeamGroup] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        if warm_up:
            self._warm_up()
        self._thread = threading.Thread(target=self._run, name="continuous-batching", daemon=True)
        self._thread.start()

    # --- the caller's side -------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a sequence; raise QueueFullError when `max_queue_size` requests already wait.

        Raises ValueError for a request the model cannot run (empty prompt, a token id outside the
        vocabulary, a prompt that fills the context window).
        """
        if request.beam is not None:
            raise ValueError("a beam search goes through submit_beam_search")
        self._validate(request)
        stream = TokenStream(request)
        # The grammar's matcher is copied here, on the caller's thread: the scheduler only advances it.
        matcher = request.grammar.matcher() if request.grammar is not None else None
        row = _Row(request, RowSampler(request.sampling, request.prompt_token_ids), time.monotonic(), stream, matcher=matcher)
        self._enqueue(row)
        return stream

    def submit_beam_search(self, request: GenerationRequest) -> list[TokenStream]:
        """Queue a beam search: its `num_beams` rows join the batch together, when that many slots are free."""
        beam = request.beam
        if beam is None:
            raise ValueError("submit_beam_search needs request.beam")
        self._validate(request)
        if beam.num_beams > self.max_batch_size:
            raise ValueError(f"{beam.num_beams} beams do not fit in {self.max_batch_size} batch slots")
        room = self.max_context_tokens - len(request.prompt_token_ids)
        search = BeamSearch(beam, request.sampling, request.prompt_token_ids, min(request.sampling.max_new_tokens, room))
        group = _BeamGroup([TokenStream(request) for _ in range(beam.num_return_sequences)], search)
        now = time.monotonic()
        group.rows = [
            _Row(request, None, now, group=group, counts_as_request=index == 0) for index in range(beam.num_beams)
        ]
        self._enqueue(group)
        return list(group.streams)

    def _enqueue(self, item: "_Row | _BeamGroup") -> None:
        with self._wake:
            if self._closing:
                raise RuntimeError("the engine is closed")
            waiting_for_a_slot = len(self._waiting) + len(self._active) >= self.max_batch_size
            if waiting_for_a_slot and len(self._waiting) >= self.max_queue_size:
                raise QueueFullError(
                    f"the generation queue is full ({self.max_queue_size} requests wait for "
                    f"{self.max_batch_size} batch slots); retry later",
                    retry_after_seconds=self._retry_after_seconds(),
                )
            self._waiting.append(item)
            self._wake.notify()

    def close(self) -> None:
        """Stop the scheduler; streams still waiting or running finish with CANCELLED."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=60)
        with self._wake:
            for item in [*self._waiting, *self._active]:
                (item.lead if isinstance(item, _BeamGroup) else item).finish(FinishReason.CANCELLED)
            self._waiting.clear()
            self._active.clear()

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    @property
    def num_active(self) -> int:
        return len(self._active)

    def load(self) -> EngineLoad:
        active = list(self._active)  # a copy: the scheduler thread may change the list meanwhile
        capacity = self.max_batch_size * self.max_context_tokens
        return EngineLoad(len(active), len(self._waiting), sum(row.length for row in active) / capacity)

    def _validate(self, request: GenerationRequest) -> None:
        prompt = request.prompt_token_ids
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if len(prompt) >= self.max_context_tokens:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; the model's context window holds {self.max_context_tokens}"
            )
        if request.sampling.max_new_tokens < 0:
            raise ValueError("max_new_tokens must not be negative")
        stop_ids = request.sampling.stop_token_ids
        if stop_ids and (min(stop_ids) < 0 or max(stop_ids) >= self.vocab_size):
            raise ValueError(f"stop token ids must lie in [0, {self.vocab_size})")

    def _retry_after_seconds(self) -> float:
        """How long until a slot is likely free: the queue ahead, at the recent time per request."""
        per_request = self.stats.request_seconds_ema or 1.0
        rounds_ahead = (len(self._waiting) + 1) / self.max_batch_size
        return max(1.0, math.ceil(per_request * rounds_ahead))

    # --- the scheduler thread ----------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closing and not self._waiting and not self._active:
                        self._wake.wait()
                    if self._closing:
                        return
                self._step()

    def _step(self) -> None:
        started = time.perf_counter()
        self._drop_cancelled()
        joining = self._admit()
        decoding = [row for row in self._active if row.next_input is not None and row not in joining]
        if not decoding and not joining:
            return
        rows = decoding + joining
        try:
            logits = self._forward(decoding, joining)
            sampled_at = time.perf_counter()
            own = [index for index, row in enumerate(rows) if row.group is None]
            own_rows = [rows[index] for index in own]
            own_logits = logits if len(own) == len(rows) else logits[own]
            self._apply_grammars(own_logits, own_rows)  # a beam search has no grammar (the service keeps them apart)
            token_ids = choose_next_tokens(own_logits, [row.sampler for row in own_rows])
            self.stats.sampling_seconds += time.perf_counter() - sampled_at
        except Exception as error:  # noqa: BLE001 - a failed step fails its rows, never the engine
            logger.exception("generation step failed; failing %d rows", len(rows))
            for row in rows:
                row.finish(FinishReason.ERROR, error)
            self._release([row for row in self._active if row.finished])
            return
        for row in decoding:
            row.length += 1
        for row in joining:
            row.length = len(row.prompt)
            self.stats.requests_admitted += 1
            self.stats.prompt_tokens += len(row.prompt)
            self.stats.prompt_tokens_from_cache += row.cached_prefix
            self.stats.prompt_tokens_computed += len(row.prompt) - row.cached_prefix
            if row.prompt not in self._prefixes:  # a repeated prompt is not copied again
                self._prefixes.add(row.prompt, self._cache.tensor[:, :, row.slot, :, : row.length].clone())
        finished = [rows[index] for index, token_id in zip(own, token_ids) if self._advance(rows[index], token_id)]
        if len(own) < len(rows):
            finished += self._advance_beam_searches(rows, logits)
        self._release(finished)
        self.stats.count_step(len(rows))
        self.stats.step_seconds += time.perf_counter() - started

    def _advance_beam_searches(self, rows: list[_Row], logits: torch.Tensor) -> list[_Row]:
        """One beam-search step for every group in this step; the rows of the searches that ended."""
        sampled_at = time.perf_counter()
        index_of = {id(row): index for index, row in enumerate(rows)}
        groups = list({id(row.group): row.group for row in rows if row.group is not None}.values())
        finished: list[_Row] = []
        for group in groups:
            running = group.rows[: len(group.search.running)]
            try:
                group_logits = logits[[index_of[id(row)] for row in running]].float().cpu().numpy()
                steps = group.search.step(group_logits)
            except Exception as error:  # noqa: BLE001 - a failed search fails its own streams only
                logger.exception("beam search step failed")
                group.lead.finish(FinishReason.ERROR, error)
                finished += group.rows
                continue
            self.stats.tokens_generated += len(running)
            if group.search.done:
                self._deliver(group)
                finished += group.rows
                continue
            # The first child of a beam keeps its slot; a second child gets the slot of a beam that
            # no child continues, with the parent's keys and values copied in. No slot that is
            # copied from is written before the copies are done.
            children: list[_Row | None] = [None] * len(steps)
            kept: set[int] = set()
            for position, (parent, _) in enumerate(steps):
                if parent not in kept:
                    kept.add(parent)
                    children[position] = running[parent]
            spare = [row for index, row in enumerate(running) if index not in kept] + group.rows[len(running) :]
            for position, (parent, _) in enumerate(steps):
                if children[position] is None:
                    row, source = spare.pop(0), running[parent]
                    self._cache.move_slot(source.slot, row.slot, source.length)
                    row.length = source.length
                    children[position] = row
            for row, (_, token_id) in zip(children, steps, strict=True):
                row.next_input = token_id
            group.rows = [*children, *spare]
        self.stats.sampling_seconds += time.perf_counter() - sampled_at
        return finished

    @staticmethod
    def _deliver(group: _BeamGroup) -> None:
        """Hand the best hypotheses to the group's streams, best first, and end them."""
        hypotheses = group.search.hypotheses()
        for index, stream in enumerate(group.streams):
            if index >= len(hypotheses):
                stream.finish(FinishReason.LENGTH)
                continue
            for token_id in hypotheses[index].token_ids:
                stream.push(token_id)
            stream.finish(FinishReason.STOP if hypotheses[index].ended_by_stop_token else FinishReason.LENGTH)

    def _drop_cancelled(self) -> None:
        with self._wake:
            cancelled_waiting = [item for item in self._waiting if item.cancelled]
            for item in cancelled_waiting:
                self._waiting.remove(item)
                (item.lead if isinstance(item, _BeamGroup) else item).finish(FinishReason.CANCELLED)
        cancelled = [row for row in self._active if row.cancelled]
        for row in cancelled:
            row.finish(FinishReason.CANCELLED)
            if row.counts_as_request:
                logger.info(
                    "sequence cancelled after %d of %d new tokens; its batch slot is free",
                    len(row.new_token_ids), row.sampling.max_new_tokens,
                )
        self._release(cancelled)

    def _admit(self) -> list[_Row]:
        """Move waiting requests into free slots, up to the prefill budget of one step.

        A beam search joins with all its rows at once: the first computes the prompt, the others
        wait in their slots for the first step's beams (which copy the prompt's keys and values).
        """
        joining: list[_Row] = []
        prefill_tokens = 0
        with self._wake:
            while self._waiting and len(self._active) < self.max_batch_size:
                item = self._waiting[0]
                rows = item.rows if isinstance(item, _BeamGroup) else [item]
                if len(self._active) + len(rows) > self.max_batch_size:
                    break
                row = rows[0]
                cached, prefix_kv = self._prefixes.longest_prefix(row.prompt)
                if joining and prefill_tokens + len(row.prompt) - cached > self.max_prefill_tokens_per_step:
                    break
                self._waiting.popleft()
                if row.sampling.max_new_tokens == 0:
                    row.finish(FinishReason.LENGTH)
                    continue
                row.slot = len(self._active)
                self._active.append(row)
                joining.append(row)
                for stream in item.streams if isinstance(item, _BeamGroup) else [row.stream]:
                    stream.mark_admitted(cached)
                if cached:
                    self._cache.ensure_capacity(len(row.prompt))
                    self._cache.tensor[:, :, row.slot, :, :cached] = prefix_kv[:, :, :, :cached]
                row.cached_prefix = cached
                prefill_tokens += len(row.prompt) - cached
                for waiting_beam in rows[1:]:
                    waiting_beam.slot = len(self._active)
                    self._active.append(waiting_beam)
        return joining

    def _forward(self, decoding: list[_Row], joining: list[_Row]) -> torch.Tensor:
        """One packed forward pass; the logits of each decoding row, then of each joining row's last prompt token."""
        forward_started = time.perf_counter()
        token_ids: list[int] = [row.next_input for row in decoding]  # type: ignore[misc]
        positions: list[int] = [row.length for row in decoding]
        logit_indices: list[int] = list(range(len(decoding)))
        prefills: list[tuple[int, int, int, int]] = []
        for row in joining:
            offset, start = len(token_ids), row.cached_prefix
            token_ids.extend(row.prompt[start:])
            positions.extend(range(start, len(row.prompt)))
            prefills.append((row.slot, offset, start, len(row.prompt) - start))
            logit_indices.append(len(token_ids) - 1)

        attended = max([row.length + 1 for row in decoding] + [len(row.prompt) for row in joining])
        self._cache.ensure_capacity(attended)
        decode_positions = torch.tensor(positions[: len(decoding)], dtype=torch.long, device=self.device)
        decode_mask = None
        if decoding:
            # Rows are in slots 0..n-1 but decoding rows may not be all of them: joining rows sit in
            # the last slots, after every decoding row, because they were appended this step.
            key_positions = torch.arange(attended, device=self.device)
            decode_mask = (key_positions[None, :] <= decode_positions[:, None])[:, None, None, :]
        batch = SlotBatch(
            cache=self._cache,
            num_decoding=len(decoding),
            decode_positions=decode_positions,
            decode_mask=decode_mask,
            prefills=prefills,
        )
        logits = self.model.forward(
            torch.tensor(token_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            batch,
            torch.tensor(logit_indices, dtype=torch.long, device=self.device),
        )
        self.stats.model_seconds += time.perf_counter() - forward_started
        return logits

    def _apply_grammars(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Forbid, in each constrained row's logits, every token its grammar does not allow now."""
        constrained = [(index, row.matcher) for index, row in enumerate(rows) if row.matcher is not None]
        if not constrained:
            return
        if self._masks is None:
            self._masks = StepMasks(logits.shape[-1], self.max_batch_size)
        self._masks.fill([matcher for _, matcher in constrained])
        for mask_index, (row_index, _) in enumerate(constrained):
            self._masks.apply_torch(mask_index, logits[row_index])

    def _advance(self, row: _Row, token_id: int) -> bool:
        """Give the row its new token; True when the row is finished."""
        sampling = row.sampling
        if token_id in sampling.stop_token_ids:
            row.stream.finish(FinishReason.STOP)
            return True
        if row.matcher is not None and not advance(row.matcher, token_id):
            row.stream.finish(FinishReason.ERROR, EngineError(f"the grammar refused token {token_id}"))
            return True
        row.sampler.note_token(token_id)
        row.new_token_ids.append(token_id)
        row.stream.push(token_id)
        self.stats.tokens_generated += 1
        if row.matcher is not None and is_complete(row.matcher):
            row.stream.finish(FinishReason.STOP)  # the grammar is complete: nothing may follow
            return True
        if len(row.new_token_ids) >= sampling.max_new_tokens or row.length + 1 >= self.max_context_tokens:
            row.stream.finish(FinishReason.LENGTH)
            return True
        row.next_input = token_id
        return False

    def _release(self, rows: list[_Row]) -> None:
        """Free the rows' slots, moving the last rows down so that active rows stay in slots 0..n-1."""
        if not rows:
            return
        now = time.monotonic()
        for row in sorted(rows, key=lambda row: row.slot, reverse=True):
            if row.slot < 0:
                continue
            last = self._active.pop()
            if last is not row:
                self._cache.move_slot(last.slot, row.slot, last.length)
                last.slot = row.slot
                self._active[row.slot] = last
            row.slot = -1
            if row.counts_as_request:
                self.stats.count_finished(now - row.submitted_at)

    def _warm_up(self) -> None:
        """Run one tiny generation through the same path, so the first real request is not the slow one."""
        with torch.inference_mode():
            request = GenerationRequest((0, 1, 2), SamplingParams(max_new_tokens=2))
            stream = TokenStream(request)
            row = _Row(request, RowSampler(request.sampling, request.prompt_token_ids), time.monotonic(), stream)
            with self._wake:
                self._waiting.append(row)
            while stream.finish_reason is None:
                self._step()
        self.reset_stats()
        self._prefixes = PrefixCache(self._prefixes.budget_bytes)
