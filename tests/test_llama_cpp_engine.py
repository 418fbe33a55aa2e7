"""The llama.cpp engine batches concurrent requests without changing what each one gets.

Runs the real embedded SmolLM2 GGUF through llama.cpp: greedy output under batching equals one
request at a time, each row keeps its own sampling settings, stop tokens and length, cancelling
frees the slot, a full queue refuses, and a shared prompt prefix is computed once.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-llama-cpp)")

from common.model_sources import DEFAULT_MODEL_NAME, embedded_model_path  # noqa: E402
from services.transformers_lm.backends.chat_template import render_chat_template  # noqa: E402
from services.transformers_lm.engines import (  # noqa: E402
    FinishReason,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
)
from services.transformers_lm.engines.llama_cpp_engine import LlamaCppEngine, LlamaCppEngineConfig  # noqa: E402
from services.transformers_lm.engines.llama_cpp_model import LlamaCppModel  # noqa: E402

pytestmark = pytest.mark.model

SYSTEM_PROMPT = "You are a concise assistant. Answer in one short sentence, and never use lists."
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What do bees make?",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def model():
    loaded = LlamaCppModel.load(embedded_model_path(DEFAULT_MODEL_NAME))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def eos_ids(model):
    return model.end_of_generation_token_ids()


def chat_prompt(model: LlamaCppModel, question: str, system: str = SYSTEM_PROMPT) -> tuple[int, ...]:
    text = render_chat_template(
        model.metadata.chat_template,
        [{"role": "system", "content": system}, {"role": "user", "content": question}],
        bos_token=model.metadata.bos_token,
        eos_token=model.metadata.eos_token,
    )
    return tuple(model.tokenize(text, add_special=True, parse_special=True))


def greedy(eos_ids, max_new_tokens: int = 24, **overrides) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=tuple(eos_ids), **overrides)


def make_engine(model, **overrides) -> LlamaCppEngine:
    # One thread: exact results do not depend on it, and two threads on a busy 2-core machine
    # wait on each other far longer than they compute.
    settings = dict(slots=4, context_per_slot=512, batch_tokens=512, max_queue_size=16, threads=1)
    settings.update(overrides)
    return LlamaCppEngine(model, LlamaCppEngineConfig(**settings))


@pytest.fixture(scope="module")
def engine(model):
    running = make_engine(model)
    yield running
    running.close()


def one_at_a_time(engine, requests: list[GenerationRequest]) -> list[list[int]]:
    return [engine.submit(request).collect() for request in requests]


def together(engine, requests: list[GenerationRequest]) -> list[list[int]]:
    streams = [engine.submit(request) for request in requests]
    return [stream.collect() for stream in streams]


def test_greedy_output_under_batching_equals_one_request_at_a_time(model, eos_ids):
    # Given four different chats, and an engine that batches them and shares their prefixes
    requests = [GenerationRequest(chat_prompt(model, question), greedy(eos_ids)) for question in QUESTIONS]
    alone_engine = make_engine(model, slots=1, share_prefixes=False)
    try:
        alone = one_at_a_time(alone_engine, requests)
    finally:
        alone_engine.close()
    batching_engine = make_engine(model)
    try:
        # When they run together, twice (the second time from the prefix cache)
        first = together(batching_engine, requests)
        second = together(batching_engine, requests)
    finally:
        batching_engine.close()
    # Then every row got exactly what it gets alone
    assert all(alone), "every chat should produce some tokens"
    assert first == alone
    assert second == alone


def test_greedy_rows_are_unchanged_by_sampled_rows_running_beside_them(model, engine, eos_ids):
    prompt = chat_prompt(model, QUESTIONS[0])
    alone = engine.submit(GenerationRequest(prompt, greedy(eos_ids))).collect()
    sampled = [
        GenerationRequest(chat_prompt(model, question), greedy(eos_ids, do_sample=True, temperature=1.5, seed=seed))
        for seed, question in enumerate(QUESTIONS[1:])
    ]
    outputs = together(engine, [GenerationRequest(prompt, greedy(eos_ids))] + sampled)
    assert outputs[0] == alone


def test_each_row_keeps_its_own_sampling_settings(model, engine, eos_ids):
    # Given one prompt asked six ways at once
    prompt = chat_prompt(model, "Tell me something about the sea.")
    hot = dict(do_sample=True, temperature=1.8, max_new_tokens=16)
    requests = [
        GenerationRequest(prompt, greedy(eos_ids, 16)),
        GenerationRequest(prompt, greedy(eos_ids, seed=7, **hot)),
        GenerationRequest(prompt, greedy(eos_ids, seed=7, **hot)),
        GenerationRequest(prompt, greedy(eos_ids, seed=8, **hot)),
        GenerationRequest(prompt, greedy(eos_ids, 16, do_sample=True, top_k=1, seed=3)),
        GenerationRequest(prompt, greedy(eos_ids, 16, repetition_penalty=3.0)),
        GenerationRequest(prompt, greedy(eos_ids, 16, frequency_penalty=2.0, presence_penalty=1.0)),
    ]
    greedy_row, seven, seven_again, eight, top_one, penalised, openai_penalised = together(engine, requests)
    # Then the same seed samples the same tokens, another seed others, and top_k=1 is greedy
    assert seven == seven_again
    assert seven != eight
    assert seven != greedy_row
    assert top_one == greedy_row
    # And a repetition penalty changes that row only, the same way as when it runs alone
    assert penalised != greedy_row
    assert penalised == engine.submit(requests[-2]).collect()
    assert openai_penalised != greedy_row
    assert openai_penalised == engine.submit(requests[-1]).collect()


def test_each_row_stops_at_its_own_stop_tokens_and_length(model, engine, eos_ids):
    prompt = chat_prompt(model, QUESTIONS[0])
    reference = engine.submit(GenerationRequest(prompt, greedy(eos_ids))).collect()
    assert len(reference) >= 3
    requests = [
        GenerationRequest(prompt, greedy(eos_ids, max_new_tokens=3)),
        GenerationRequest(prompt, SamplingParams(max_new_tokens=24, stop_token_ids=(reference[1],))),
        GenerationRequest(prompt, SamplingParams(max_new_tokens=24, stop_token_ids=(reference[0],), min_new_tokens=1)),
        GenerationRequest(prompt, greedy(eos_ids)),
    ]
    streams = [engine.submit(request) for request in requests]
    short, stopped, at_least_one, full = (stream.collect() for stream in streams)

    assert (short, streams[0].finish_reason) == (reference[:3], FinishReason.LENGTH)
    # The stop token ends the row and is not part of its output
    assert (stopped, streams[1].finish_reason) == (reference[:1], FinishReason.STOP)
    # min_new_tokens keeps a stop token from ending the row before it has that many tokens
    assert at_least_one and at_least_one[0] != reference[0]
    assert (full, streams[3].finish_reason) == (reference, FinishReason.STOP)


def test_cancel_ends_the_stream_and_frees_the_slot_for_the_next_request(model, eos_ids):
    single = make_engine(model, slots=1, max_queue_size=4)
    try:
        prompt = chat_prompt(model, "Write a long story about a lighthouse keeper.")
        endless = single.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=400)))
        waiting = single.submit(GenerationRequest(chat_prompt(model, QUESTIONS[0]), greedy(eos_ids)))
        first_token = next(iter(endless))
        endless.cancel()
        rest = endless.collect()
        assert endless.finish_reason is FinishReason.CANCELLED
        assert len(rest) < 399, "the cancelled stream should stop early"
        # The request that waited for the only slot now runs to its end
        assert waiting.collect()
        assert waiting.finish_reason is FinishReason.STOP
        assert isinstance(first_token, int)
    finally:
        single.close()


def test_a_full_queue_refuses_with_queue_full_error(model):
    single = make_engine(model, slots=1, max_queue_size=1)
    try:
        prompt = chat_prompt(model, "Write a long story about a lighthouse keeper.")
        running = single.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=400)))
        next(iter(running))  # it holds the only slot now
        queued = single.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=400)))
        with pytest.raises(QueueFullError) as refused:
            single.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=4)))
        assert refused.value.retry_after_seconds > 0
        running.cancel()
        queued.cancel()
    finally:
        single.close()
    assert running.finish_reason is FinishReason.CANCELLED
    assert queued.finish_reason is FinishReason.CANCELLED


def test_a_shared_system_prompt_is_computed_once_and_copied(model, eos_ids):
    # Given a long system prompt shared by four different questions arriving together
    system = SYSTEM_PROMPT + " " + "Be friendly, precise and brief; prefer plain words. " * 8
    requests = [GenerationRequest(chat_prompt(model, q, system), greedy(eos_ids, 8)) for q in QUESTIONS]
    shared_prefix = len(chat_prompt(model, "", system)) - 8
    sharing = make_engine(model)
    try:
        outputs = together(sharing, requests)
        stats = sharing.stats
    finally:
        sharing.close()
    # Then three of them reused the first one's system prompt instead of computing it again
    assert stats.prompt_tokens_from_cache >= 3 * shared_prefix
    assert stats.prompt_tokens_computed <= sum(len(r.prompt_token_ids) for r in requests) - 3 * shared_prefix
    # And the answers are those of an engine that shares nothing
    cold = make_engine(model, share_prefixes=False, slots=1)
    try:
        assert outputs == one_at_a_time(cold, requests)
    finally:
        cold.close()


def test_a_prompt_longer_than_a_slot_is_refused_at_submit(model, engine):
    with pytest.raises(ValueError, match="context"):
        engine.submit(GenerationRequest(tuple([1] * engine.context_per_slot), SamplingParams(max_new_tokens=4)))


def test_close_cancels_waiting_and_running_streams(model):
    single = make_engine(model, slots=1, max_queue_size=4)
    prompt = chat_prompt(model, "Write a long story about a lighthouse keeper.")
    running = single.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=400)))
    waiting = single.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=400)))
    next(iter(running))
    single.close()
    assert running.finish_reason is FinishReason.CANCELLED
    assert waiting.finish_reason is FinishReason.CANCELLED


def test_submit_is_safe_from_many_threads(model, engine, eos_ids):
    prompt = chat_prompt(model, QUESTIONS[3])
    expected = engine.submit(GenerationRequest(prompt, greedy(eos_ids, 8))).collect()
    results: list[list[int]] = []
    lock = threading.Lock()

    def client():
        output = engine.submit(GenerationRequest(prompt, greedy(eos_ids, 8))).collect()
        with lock:
            results.append(output)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 8
