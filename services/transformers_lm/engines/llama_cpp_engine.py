"""Continuous batching for GGUF models on llama.cpp: many sequences decoded together in one context.

Why this shape (measured on a 2-core CPU with SmolLM2-135M Q4_1, see bench/llama_cpp_steps.py):
- One `llama_decode` call per step for every active sequence costs ≈63 ms for 16 sequences against
  ≈8 ms for one, so 16 rows give about twice the tokens per second of one row; the high-level
  `Llama` object holds a single sequence, so the engine opens its own context on the loaded model
  with `n_seq_max` = slots and drives llama.cpp's batch API directly.
- Logits are requested only for each sequence's last token, and sampling runs per row: greedy as
  one numpy argmax on llama.cpp's logits buffer, sampling through a llama.cpp sampler chain per
  sequence (its own temperature, top-k, top-p and seed), the repetition penalty applied in place
  on the row's logits the way transformers applies it (once per distinct token of prompt and
  output).
- Prefill is what costs most end to end (≈3 ms per prompt token, 43 % of the time with 16
  clients), so the engine keeps every slot's KV after its request ends and reuses the longest
  cached prefix of a new prompt: from the slot's own cache, or copied from another sequence
  (`llama_memory_seq_cp`), which is how a system prompt shared by many requests is computed once.
  When a prompt shares a long prefix with a prompt that is being prefilled right now, its
  admission waits for that prefill to land and then copies it instead of computing it again.
- Every sequence has its own KV buffer (`kv_unified` off, the default). A decode then splits into
  chunks of consecutive sequence ids, so a new request takes the lowest free slot (gaps raised a
  16-way step from 62 ms to 74–88 ms), and a prefix copy moves the whole buffer (a few ms, far
  less than prefilling the prefix again). A unified buffer makes copies free, but a sequence's
  cells then lie in whatever order they were freed, attention sums them in that order, and
  greedy output drifts from the one-at-a-time output (tests/test_llama_cpp_engine.py shows it);
  it is kept as an option for measurements only.
- A request with a grammar (`grammar.py`) gets llguidance's token mask applied in place on its
  row of the logits buffer before the argmax or its sampler chain reads it; the masks of all
  constrained rows of a step are computed together, rows without a grammar are not touched.
- All llama.cpp calls happen on the scheduler thread; callers only queue requests and read
  `TokenStream`s, exactly as with the other engines.
- Speculative decoding with prompt-lookup drafts (the sequence's last 1–3 tokens found earlier in
  its prompt or output propose the tokens that followed, verified in the same decode) was measured
  and loses, so the engine does not draft (`make bench`'s `llama_cpp_draft_study`, BF16 default
  weights, the bench's questions, 32 tokens): drafts would be right so rarely that a step yields
  1.06–1.11 tokens, while a second row of one sequence costs 1.7–1.8× a one-row step (11.0–11.2 →
  18.8–20.4 ms; 4 rows 23–27 ms) and at 16 sequences each extra row costs about half a
  sequence's own row (39–44 ms for 16 rows, 100–114 ms for 64), more than the 6–11 % more
  tokens the drafts bring. Predicted gain, over three runs:
  0.73–0.79× at 1 client and 0.67–0.74× at 16 with 1-token tails, 0.97–0.99× and 0.95–0.97× with
  2-token tails (fewer, better drafts).
- A beam search (`submit_beam_search`) takes `num_beams` slots together: the first computes the
  prompt, the others get it by `llama_memory_seq_cp`; after each step `beam_search.BeamSearch`
  picks the new beams, the first child of a beam stays in its slot, and a second child's slot gets
  the parent's KV copied in (at most `num_beams - 1` copies a step, usually none or one).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from common.metrics import EngineLoad
from services.transformers_lm.engines import (
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    TokenStream,
    common_prefix_length,
)
from services.transformers_lm.engines.beam_search import BeamSearch
from services.transformers_lm.engines.grammar import StepMasks, advance, is_complete
from services.transformers_lm.engines.llama_cpp_model import LlamaCppModel
from services.transformers_lm.engines.no_repeat import NoRepeatNGrams

logger = logging.getLogger(__name__)


def default_threads() -> int:
    """The cores this process may run on (a container's CPU set), not the host's core count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class LlamaCppEngineConfig:
    """How the engine uses llama.cpp; the service fills it from its settings."""

    slots: int = 16  # sequences decoded together (llama.cpp's n_seq_max)
    context_per_slot: int = 2048  # KV positions one sequence may use (prompt + output)
    batch_tokens: int = 512  # tokens per llama_decode call: one per decoding row, the rest prefill
    threads: int = field(default_factory=default_threads)
    max_queue_size: int = 64  # requests waiting for a slot before submit() raises QueueFullError
    kv_unified: bool = False  # one KV buffer for all sequences: cheap copies, inexact (see above)
    share_prefixes: bool = True  # reuse cached prompt prefixes across sequences
    # A copied prefix shorter than this is not worth a copy (nor waiting for it).
    min_shared_prefix_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("slots", "context_per_slot", "batch_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.batch_tokens < self.slots:
            raise ValueError("batch_tokens must be at least slots (one decoding token per slot per step)")
        if self.max_queue_size < 0:
            raise ValueError("max_queue_size must not be negative")


class _BeamGroup:
    """A beam search: its streams (filled when it ends), its search state, and its slots in beam order."""

    def __init__(self, streams: list[TokenStream], search: BeamSearch):
        self.streams = streams
        self.search = search
        self.slots: list[_Slot] = []  # slots[i] runs search.running[i]; the rest wait for a beam

    @property
    def request(self) -> GenerationRequest:
        return self.streams[0].request

    @property
    def cancelled(self) -> bool:
        return any(stream.cancelled for stream in self.streams)

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        for stream in self.streams:
            stream.finish(reason, error)


class _Slot:
    """One llama.cpp sequence: its cached tokens and, while busy, the request (or the beam) it serves."""

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.cached: list[int] = []  # tokens whose KV lies in this sequence, at positions 0..n-1
        self.stream: TokenStream | None = None
        self.group: _BeamGroup | None = None  # set while the slot runs (or waits for) a beam
        self.prompt: tuple[int, ...] = ()
        self.prefill_position = 0  # index of the next prompt token to compute
        self.next_token: int | None = None  # sampled, to be fed at the next step
        self.generated = 0
        self.sampler = None  # llama.cpp sampler chain when sampling, None when greedy
        self.copy_pending = False  # a prefix copy into this sequence lands at the next decode
        self.penalized_ids: np.ndarray | None = None  # distinct tokens seen, for repetition penalty
        self.penalized_set: set[int] = set()
        self.generated_counts: dict[int, int] | None = None  # token -> times generated, for OpenAI's penalties
        self.stop_ids: np.ndarray | None = None
        self.stop_set: frozenset[int] = frozenset()
        self.matcher = None  # the request's grammar state (llguidance), None when unconstrained
        self.ngrams: NoRepeatNGrams | None = None  # for no_repeat_ngram_size

    @property
    def busy(self) -> bool:
        return self.stream is not None or self.group is not None

    @property
    def prefilling(self) -> bool:
        return self.busy and self.prefill_position < len(self.prompt)

    @property
    def decoding(self) -> bool:
        """Busy with a token to feed (a beam's slot waiting for its first beam has none)."""
        return self.busy and not self.prefilling and self.next_token is not None


class LlamaCppEngine:
    """Continuous batching over llama.cpp's batch API; implements `engine.Engine`."""

    def __init__(self, model: LlamaCppModel, config: LlamaCppEngineConfig | None = None):
        self.model = model
        self.config = config or LlamaCppEngineConfig()
        self.max_batch_size = self.config.slots
        self.max_queue_size = self.config.max_queue_size
        self._llama = model.llama_cpp
        self._context = self._create_context()
        self._memory = self._llama.llama_get_memory(self._context)
        self._batch = self._llama.llama_batch_init(self.config.batch_tokens, 0, 1)
        self._slots = [_Slot(seq_id) for seq_id in range(self.config.slots)]
        self._waiting: collections.deque[TokenStream | _BeamGroup] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closed = False
        self._masks: StepMasks | None = None  # made when the first constrained request arrives
        self.stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="llama-cpp-engine", daemon=True)
        self._thread.start()

    # --- the Engine interface ------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> TokenStream:
        if request.beam is not None:
            raise ValueError("a beam search goes through submit_beam_search")
        self._validate(request)
        stream = TokenStream(request)
        if request.sampling.max_new_tokens <= 0:
            stream.finish(FinishReason.LENGTH)
            return stream
        self._enqueue(stream)
        return stream

    def submit_beam_search(self, request: GenerationRequest) -> list[TokenStream]:
        """Queue a beam search: its `num_beams` slots start together, when that many are free."""
        beam = request.beam
        if beam is None:
            raise ValueError("submit_beam_search needs request.beam")
        self._validate(request)
        if beam.num_beams > self.config.slots:
            raise ValueError(f"{beam.num_beams} beams do not fit in {self.config.slots} slots")
        room = self.context_per_slot - len(request.prompt_token_ids)
        search = BeamSearch(beam, request.sampling, request.prompt_token_ids, min(request.sampling.max_new_tokens, room))
        group = _BeamGroup([TokenStream(request) for _ in range(beam.num_return_sequences)], search)
        if search.done:
            group.finish(FinishReason.LENGTH)
        else:
            self._enqueue(group)
        return list(group.streams)

    def _validate(self, request: GenerationRequest) -> None:
        prompt_length = len(request.prompt_token_ids)
        if prompt_length == 0:
            raise ValueError("the prompt has no tokens")
        if prompt_length >= self.context_per_slot:
            raise ValueError(
                f"the prompt has {prompt_length} tokens; this engine's context holds "
                f"{self.context_per_slot} per sequence (prompt and output together)"
            )
        stop_ids = request.sampling.stop_token_ids
        if stop_ids and (min(stop_ids) < 0 or max(stop_ids) >= self.model.n_vocab):
            raise ValueError(f"stop token ids must lie in [0, {self.model.n_vocab})")

    def _enqueue(self, item: TokenStream | _BeamGroup) -> None:
        with self._lock:
            if self._closed:
                raise EngineError("the engine is closed")
            if len(self._waiting) >= self.max_queue_size:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are waiting for one of {self.config.slots} slots; retry later"
                )
            self._waiting.append(item)
            self._wakeup.notify()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wakeup.notify()
        self._thread.join()
        for item in self._waiting:
            item.finish(FinishReason.CANCELLED)
        self._waiting.clear()
        for slot in self._slots:
            if slot.group is not None:
                self._release_group(slot.group, FinishReason.CANCELLED)
            elif slot.busy:
                self._release(slot, FinishReason.CANCELLED)
        self._llama.llama_batch_free(self._batch)
        self._llama.llama_free(self._context)
        self._context = None

    # --- introspection -------------------------------------------------------------------------
    @property
    def context_per_slot(self) -> int:
        return self._context_per_slot

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    def load(self) -> EngineLoad:
        busy = [slot for slot in self._slots if slot.busy]
        used = sum(len(slot.prompt) + slot.generated for slot in busy)
        return EngineLoad(len(busy), len(self._waiting), used / (len(self._slots) * self.context_per_slot))

    # --- setup ---------------------------------------------------------------------------------
    def _create_context(self):
        llama = self._llama
        config = self.config
        context_length = min(config.context_per_slot, self.model.metadata.context_length)
        params = llama.llama_context_default_params()
        params.n_ctx = config.slots * context_length
        params.n_batch = config.batch_tokens
        params.n_ubatch = config.batch_tokens
        params.n_seq_max = config.slots
        params.n_threads = config.threads
        params.n_threads_batch = config.threads
        params.kv_unified = config.kv_unified
        params.no_perf = True
        context = llama.llama_init_from_model(self.model.pointer, params)
        if not context:
            raise EngineError(
                f"llama.cpp could not create a context of {config.slots} x {context_length} tokens "
                "(lower LLAMA_CPP_SLOTS or LLAMA_CPP_CONTEXT_PER_SLOT)"
            )
        # llama.cpp may round the context; each sequence gets its share of what it allocated.
        self._context_per_slot = min(context_length, llama.llama_n_ctx(context) // config.slots)
        return context

    # --- the scheduler thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not any(slot.busy for slot in self._slots):
                    self._wakeup.wait()
                if self._closed:
                    return
                started = time.perf_counter()
                try:
                    self._admit_waiting()
                except Exception as error:  # a worker never dies of a request
                    logger.exception("llama.cpp engine: admission failed")
                    self._fail_all(error)
                    continue
            try:
                self._release_cancelled()
                if any(slot.busy for slot in self._slots):
                    self._step(started)
            except Exception as error:
                logger.exception("llama.cpp engine: step failed")
                self._fail_all(error)

    def _admit_waiting(self) -> None:
        """Move waiting requests into free slots, reusing cached prefixes (holds the lock)."""
        still_waiting: collections.deque[TokenStream | _BeamGroup] = collections.deque()
        while self._waiting:
            item = self._waiting.popleft()
            if item.cancelled:
                item.finish(FinishReason.CANCELLED)
                continue
            needed = item.search.params.num_beams if isinstance(item, _BeamGroup) else 1
            free = [slot for slot in self._slots if not slot.busy]
            if len(free) < needed:
                still_waiting.append(item)
                continue
            placement = self._place(item.request.prompt_token_ids, free)
            if placement is None:
                self.stats.admissions_deferred += 1
                still_waiting.append(item)
                continue
            if isinstance(item, _BeamGroup):
                self._start_beam_search(item, *placement, free)
            else:
                self._start(item, *placement)
        self._waiting = still_waiting

    def _place(self, prompt: tuple[int, ...], free: list[_Slot]) -> tuple[_Slot, _Slot | None, int] | None:
        """(slot to use, slot to copy a prefix from or None, prefix length to reuse), or None to wait.

        The prompt's last token is always computed again, because its logits give the first token.
        """
        config = self.config
        usable = len(prompt) - 1
        if config.kv_unified:
            # Copies are free and sequence ids need not be dense: keep the free slot whose own
            # cache matches best (tie: the emptiest), so other caches survive for later requests.
            slot = max(free, key=lambda s: (min(common_prefix_length(s.cached, prompt), usable), -len(s.cached)))
        else:
            slot = free[0]  # lowest free sequence id keeps the decode in one chunk
        own = min(common_prefix_length(slot.cached, prompt), usable)
        source, shared = None, own
        if config.share_prefixes:
            for other in self._slots:
                if other is slot or other.copy_pending:
                    continue
                length = min(common_prefix_length(other.cached, prompt), usable)
                if length > shared:
                    source, shared = other, length
            if source is not None and shared - own < config.min_shared_prefix_tokens:
                source, shared = None, own
            # A prompt being prefilled now that shares much more: wait for it, then copy.
            for other in self._slots:
                if other.prefilling and other is not slot:
                    upcoming = min(common_prefix_length(other.prompt, prompt), usable)
                    if upcoming - shared >= config.min_shared_prefix_tokens:
                        return None
        return slot, source, shared

    def _start(self, stream: TokenStream, slot: _Slot, source: _Slot | None, reused: int) -> None:
        self._load_prompt(slot, stream.request.prompt_token_ids, source, reused)
        slot.stream = stream
        slot.matcher = stream.request.grammar.matcher() if stream.request.grammar is not None else None
        self._prepare_sampling(slot, stream.request.sampling)
        stream.mark_admitted(reused)

    def _start_beam_search(
        self, group: _BeamGroup, slot: _Slot, source: _Slot | None, reused: int, free: list[_Slot]
    ) -> None:
        """The first beam's slot computes the prompt; the others wait for the first step's beams."""
        self._load_prompt(slot, group.request.prompt_token_ids, source, reused)
        for stream in group.streams:
            stream.mark_admitted(reused)
        others = [other for other in free if other is not slot][: group.search.params.num_beams - 1]
        group.slots = [slot, *others]
        for member in group.slots:
            member.group = group
            member.sampler, member.stop_ids, member.penalized_ids, member.ngrams = None, None, None, None
            member.generated_counts, member.matcher = None, None
        for other in others:
            other.prompt, other.prefill_position, other.next_token, other.generated = (), 0, None, 0

    def _load_prompt(self, slot: _Slot, prompt: tuple[int, ...], source: _Slot | None, reused: int) -> None:
        """Put the reusable prefix of `prompt` into the slot's KV (its own, or copied) and set it up to prefill the rest."""
        llama, memory = self._llama, self._memory
        if source is None:
            llama.llama_memory_seq_rm(memory, slot.seq_id, reused if reused > 0 else -1, -1)
        elif self.config.kv_unified:
            llama.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            llama.llama_memory_seq_cp(memory, source.seq_id, slot.seq_id, 0, reused)
        else:
            # Separate buffers copy only whole: copy, then cut after the shared prefix.
            llama.llama_memory_seq_cp(memory, source.seq_id, slot.seq_id, -1, -1)
            llama.llama_memory_seq_rm(memory, slot.seq_id, reused, -1)
        slot.cached = list(prompt[:reused])
        slot.copy_pending = source is not None
        slot.prompt = prompt
        slot.prefill_position = reused
        slot.next_token = None
        slot.generated = 0
        self.stats.requests_admitted += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.prompt_tokens_from_cache += reused

    def _prepare_sampling(self, slot: _Slot, sampling: SamplingParams) -> None:
        llama = self._llama
        slot.stop_set = frozenset(sampling.stop_token_ids)
        slot.stop_ids = np.fromiter(slot.stop_set, dtype=np.int64) if slot.stop_set else None
        if sampling.repetition_penalty != 1.0:
            slot.penalized_set = set(slot.prompt)
            slot.penalized_ids = np.fromiter(slot.penalized_set, dtype=np.int64)
        else:
            slot.penalized_set, slot.penalized_ids = set(), None
        slot.generated_counts = {} if sampling.uses_openai_penalties else None
        slot.ngrams = NoRepeatNGrams(sampling.no_repeat_ngram_size, slot.prompt) if sampling.no_repeat_ngram_size else None
        slot.sampler = None
        if sampling.do_sample:
            chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
            # The order of transformers' warpers: temperature, then top-k, then top-p.
            if sampling.temperature != 1.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(sampling.temperature))
            if sampling.top_k > 0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(sampling.top_k))
            if sampling.top_p < 1.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(sampling.top_p, 1))
            if sampling.typical_p < 1.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_typical(sampling.typical_p, 1))
            seed = llama.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed % llama.LLAMA_DEFAULT_SEED
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
            slot.sampler = chain

    def _release(self, slot: _Slot, reason: FinishReason, error: BaseException | None = None) -> None:
        """End the slot's request; its KV stays as a prefix cache for the next requests."""
        if slot.stream is not None:
            slot.stream.finish(reason, error)
            self.stats.requests_finished += 1
        if slot.sampler is not None:
            self._llama.llama_sampler_free(slot.sampler)
        slot.stream = None
        slot.group = None
        slot.sampler = None
        slot.matcher = None
        slot.next_token = None
        slot.prompt = ()
        slot.prefill_position = 0
        slot.ngrams = None

    def _release_group(self, group: _BeamGroup, reason: FinishReason | None, error: BaseException | None = None) -> None:
        """Free a beam search's slots (their KV stays as prefix caches); end its streams with `reason`
        unless they already have their hypotheses."""
        if reason is not None:
            group.finish(reason, error)
        self.stats.requests_finished += 1
        for slot in group.slots:
            self._release(slot, FinishReason.CANCELLED)  # no stream of its own: only resets the slot

    def _release_cancelled(self) -> None:
        for slot in self._slots:
            if slot.group is not None and slot.group.cancelled:
                self._release_group(slot.group, FinishReason.CANCELLED)
            elif slot.stream is not None and slot.stream.cancelled:
                self._release(slot, FinishReason.CANCELLED)

    def _fail_all(self, error: BaseException) -> None:
        """A failed decode leaves the KV in an unknown state: fail the busy rows and drop their KV."""
        for slot in self._slots:
            if slot.group is not None:
                for member in slot.group.slots:
                    self._llama.llama_memory_seq_rm(self._memory, member.seq_id, -1, -1)
                    member.cached = []
                self._release_group(slot.group, FinishReason.ERROR, error)
            elif slot.busy:
                self._release(slot, FinishReason.ERROR, error)
                self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                slot.cached = []

    def _drop_idle_caches(self) -> None:
        for slot in self._slots:
            if not slot.busy and slot.cached:
                self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                slot.cached = []

    # --- one step: build the batch, decode, sample ---------------------------------------------
    def _step(self, started: float) -> None:
        llama, batch = self._llama, self._batch
        rows: list[tuple[_Slot, list[int], int]] = []  # slot, tokens fed, batch index of its logits (-1: none)
        decoding = sum(1 for slot in self._slots if slot.decoding)
        prefill_budget = self.config.batch_tokens - decoding
        count = outputs = 0
        for slot in self._slots:  # in sequence id order, as llama.cpp splits batches by it
            if not slot.busy:
                continue
            if slot.prefilling:
                if prefill_budget <= 0:
                    continue
                start = slot.prefill_position
                tokens = list(slot.prompt[start : start + prefill_budget])
                prefill_budget -= len(tokens)
                wants_logits = start + len(tokens) == len(slot.prompt)
            elif slot.next_token is None:
                continue  # a beam search's slot, waiting for the first step's beams
            else:
                tokens = [slot.next_token]
                wants_logits = True
            position = len(slot.cached)
            seq_id = slot.seq_id
            for offset, token in enumerate(tokens):
                index = count + offset
                batch.token[index] = token
                batch.pos[index] = position + offset
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = seq_id
                batch.logits[index] = 0
            count += len(tokens)
            if wants_logits:
                batch.logits[count - 1] = 1
                outputs += 1
            rows.append((slot, tokens, count - 1 if wants_logits else -1))
        batch.n_tokens = count
        decode_started = time.perf_counter()

        result = llama.llama_decode(self._context, batch)
        if result == 1:  # no room in the KV: drop the idle slots' caches and try once more
            self._drop_idle_caches()
            result = llama.llama_decode(self._context, batch)
        if result != 0:
            raise EngineError(f"llama_decode failed with code {result}")
        sample_started = time.perf_counter()
        self.stats.model_seconds += sample_started - decode_started
        self.stats.count_step(len(rows))

        for slot in self._slots:  # every decode first performs the copies queued before it
            slot.copy_pending = False
        if outputs:  # rows of logits in batch order, one per row that asked for them
            logits = np.ctypeslib.as_array(llama.llama_get_logits(self._context), shape=(outputs, self.model.n_vocab))
        masks = self._grammar_masks(rows)
        output = 0
        beam_logits: dict[int, np.ndarray] = {}  # a beam's slot's seq_id -> its logits row
        for slot, tokens, logits_index in rows:
            slot.cached.extend(tokens)
            if slot.prefilling:
                slot.prefill_position += len(tokens)
                self.stats.prompt_tokens_computed += len(tokens)
                if logits_index < 0:
                    continue
            else:
                self.stats.tokens_generated += 1
            if slot.group is not None:  # a beam search has no grammar (the service keeps them apart)
                beam_logits[slot.seq_id] = logits[output]
            else:
                self._sample(slot, logits[output], logits_index, masks.get(slot.seq_id))
            output += 1
        if beam_logits:
            self._advance_beam_searches(beam_logits)
        finished = time.perf_counter()
        self.stats.sampling_seconds += finished - sample_started
        self.stats.step_seconds += finished - started

    def _grammar_masks(self, rows: list[tuple[_Slot, list[int], int]]) -> dict[int, int]:
        """Compute the masks of the constrained rows that sample this step: {seq_id: mask index}."""
        constrained = [slot for slot, _, logits_index in rows if logits_index >= 0 and slot.matcher is not None]
        if not constrained:
            return {}
        if self._masks is None:
            self._masks = StepMasks(self.model.n_vocab, self.config.slots)
        self._masks.fill([slot.matcher for slot in constrained])
        return {slot.seq_id: index for index, slot in enumerate(constrained)}

    def _sample(self, slot: _Slot, logits: np.ndarray, batch_index: int, mask_index: int | None = None) -> None:
        """Pick the row's next token from its logits (a view into llama.cpp's buffer) and hand it on."""
        sampling = slot.stream.request.sampling
        if mask_index is not None:  # first, so penalties and the sampler chain see only allowed tokens
            self._masks.apply_numpy(mask_index, logits)
        if slot.penalized_ids is not None:  # as transformers: once per distinct token seen
            seen = logits[slot.penalized_ids]
            penalty = sampling.repetition_penalty
            logits[slot.penalized_ids] = np.where(seen < 0, seen * penalty, seen / penalty)
        if slot.generated_counts:  # OpenAI's: per time generated, and once for being there at all
            token_ids = np.fromiter(slot.generated_counts, dtype=np.int64, count=len(slot.generated_counts))
            counts = np.fromiter(slot.generated_counts.values(), dtype=np.float32, count=len(token_ids))
            logits[token_ids] -= counts * sampling.frequency_penalty + sampling.presence_penalty
        if slot.ngrams is not None and (banned := slot.ngrams.banned()):
            logits[np.fromiter(banned, dtype=np.int64, count=len(banned))] = -np.inf
        if slot.stop_ids is not None and slot.generated < sampling.min_new_tokens:
            logits[slot.stop_ids] = -np.inf
        if slot.sampler is None:
            token = int(np.argmax(logits))
        else:  # the chain reads the same buffer, edits included
            token = int(self._llama.llama_sampler_sample(slot.sampler, self._context, batch_index))

        if token in slot.stop_set:
            self._release(slot, FinishReason.STOP)
            return
        if slot.matcher is not None and not advance(slot.matcher, token):
            self._release(slot, FinishReason.ERROR, EngineError(f"the grammar refused token {token}"))
            return
        slot.stream.push(token)
        slot.generated += 1
        if slot.matcher is not None and is_complete(slot.matcher):
            self._release(slot, FinishReason.STOP)  # the grammar is complete: nothing may follow
            return
        if slot.penalized_ids is not None and token not in slot.penalized_set:
            slot.penalized_set.add(token)
            slot.penalized_ids = np.append(slot.penalized_ids, token)
        if slot.generated_counts is not None:
            slot.generated_counts[token] = slot.generated_counts.get(token, 0) + 1
        if slot.ngrams is not None:
            slot.ngrams.add(token)
        if slot.generated >= sampling.max_new_tokens or len(slot.cached) >= self._context_per_slot:
            self._release(slot, FinishReason.LENGTH)
        else:
            slot.next_token = token

    # --- beam search ---------------------------------------------------------------------------
    def _advance_beam_searches(self, beam_logits: dict[int, np.ndarray]) -> None:
        """One step of every beam search whose beams were decoded in this step."""
        groups = {id(slot.group): slot.group for slot in self._slots if slot.seq_id in beam_logits and slot.group}
        for group in groups.values():
            running = group.slots[: len(group.search.running)]
            try:
                steps = group.search.step(np.stack([beam_logits[slot.seq_id] for slot in running]))
            except Exception as error:  # noqa: BLE001 - a failed search fails its own streams only
                logger.exception("llama.cpp engine: beam search step failed")
                self._release_group(group, FinishReason.ERROR, error)
                continue
            if group.search.done:
                self._deliver(group)
                self._release_group(group, None)
                continue
            # The first child of a beam keeps its slot; a second child takes the slot of a beam no
            # child continues, with the parent's KV copied in (queued: it lands at the next decode,
            # before that decode's tokens, so the parent's new token is not in the copy).
            children: list[_Slot | None] = [None] * len(steps)
            kept: set[int] = set()
            for position, (parent, _) in enumerate(steps):
                if parent not in kept:
                    kept.add(parent)
                    children[position] = running[parent]
            spare = [slot for index, slot in enumerate(running) if index not in kept] + group.slots[len(running) :]
            for position, (parent, _) in enumerate(steps):
                if children[position] is None:
                    children[position] = target = spare.pop(0)
                    self._copy_sequence(running[parent], target)
            for slot, (_, token) in zip(children, steps, strict=True):
                slot.next_token = token
                slot.generated += 1
            group.slots = [*children, *spare]

    def _copy_sequence(self, source: _Slot, target: _Slot) -> None:
        """Make `target`'s KV a copy of `source`'s."""
        llama, memory = self._llama, self._memory
        llama.llama_memory_seq_rm(memory, target.seq_id, -1, -1)
        if self.config.kv_unified:
            llama.llama_memory_seq_cp(memory, source.seq_id, target.seq_id, 0, len(source.cached))
        else:
            llama.llama_memory_seq_cp(memory, source.seq_id, target.seq_id, -1, -1)
        target.cached = list(source.cached)
        target.copy_pending = True

    @staticmethod
    def _deliver(group: _BeamGroup) -> None:
        """Hand the best hypotheses to the group's streams, best first, and end them."""
        hypotheses = group.search.hypotheses()
        for index, stream in enumerate(group.streams):
            if index >= len(hypotheses):
                stream.finish(FinishReason.LENGTH)
                continue
            for token in hypotheses[index].token_ids:
                stream.push(token)
            stream.finish(FinishReason.STOP if hypotheses[index].ended_by_stop_token else FinishReason.LENGTH)
