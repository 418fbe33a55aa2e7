"""The sequential engine, the simplest correct `Engine`: greedy equals transformers' own `generate`,
seeds reproduce, penalties act as in the batching engine, min/max lengths, stop tokens and
cancellation hold, and a full queue refuses at once."""

from __future__ import annotations

import pytest
import torch
from support.tiny_model import tiny_model_dir
from transformers import AutoModelForCausalLM

from services.transformers_lm.engine import FinishReason, GenerationRequest, QueueFullError, SamplingParams
from services.transformers_lm.engines.continuous_batching import ContinuousBatchingEngine
from services.transformers_lm.engines.sequential import SequentialEngine

PROMPT = (5, 17, 42, 99, 7)


def load_tiny_model():
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model():
    return load_tiny_model()


@pytest.fixture
def engine(model):
    engine = SequentialEngine(model, context_length=4096, max_queue_size=8)
    yield engine
    engine.close()


def run(engine: SequentialEngine, **sampling) -> tuple[list[int], FinishReason]:
    stream = engine.submit(GenerationRequest(PROMPT, SamplingParams(**sampling)))
    tokens = stream.collect()
    return tokens, stream.finish_reason


def test_greedy_tokens_equal_transformers_generate(engine, model):
    tokens, reason = run(engine, max_new_tokens=12)

    with torch.inference_mode():
        expected = model.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert tokens == expected[0, len(PROMPT):].tolist()
    assert reason is FinishReason.LENGTH


def test_the_same_seed_samples_the_same_tokens_and_another_seed_others(engine):
    sampling = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, top_k=50)

    first, _ = run(engine, **sampling, seed=1)
    again, _ = run(engine, **sampling, seed=1)
    other, _ = run(engine, **sampling, seed=2)

    assert first == again
    assert first != other


@pytest.mark.parametrize(
    "penalties",
    [{"repetition_penalty": 1.5}, {"frequency_penalty": 1.5}, {"presence_penalty": 1.0, "frequency_penalty": -0.5}],
    ids=["repetition", "frequency", "presence and negative frequency"],
)
def test_penalties_change_the_greedy_tokens_as_the_batching_engine_does(engine, penalties):
    plain, _ = run(engine, max_new_tokens=16)
    penalised, _ = run(engine, max_new_tokens=16, **penalties)

    # A model of its own: the batching engine switches its model's attention to slot attention.
    batching = ContinuousBatchingEngine(load_tiny_model(), max_batch_size=2)
    try:
        batched = batching.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=16, **penalties))).collect()
    finally:
        batching.close()
    assert penalised != plain
    assert penalised == batched


def test_a_stop_token_ends_the_sequence_and_is_not_emitted(engine):
    greedy, _ = run(engine, max_new_tokens=8)
    stop = greedy[3]

    tokens, reason = run(engine, max_new_tokens=8, stop_token_ids=(stop,))

    assert tokens == greedy[: greedy.index(stop)]
    assert reason is FinishReason.STOP


def test_stop_tokens_are_suppressed_until_min_new_tokens(engine):
    greedy, _ = run(engine, max_new_tokens=6)

    tokens, _ = run(engine, max_new_tokens=6, min_new_tokens=6, stop_token_ids=(greedy[0],))

    assert len(tokens) == 6 and greedy[0] not in tokens


def test_a_cancelled_stream_stops_at_the_next_step(engine):
    stream = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=2000)))
    first = next(iter(stream))
    stream.cancel()
    rest = stream.collect()

    assert isinstance(first, int)
    assert len(rest) < 1999
    assert stream.finish_reason is FinishReason.CANCELLED


def test_a_full_queue_refuses_at_once(model):
    engine = SequentialEngine(model, context_length=4096, max_queue_size=1)
    try:
        streams = []
        with pytest.raises(QueueFullError):
            for _ in range(50):
                streams.append(engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=500))))
    finally:
        for stream in streams:
            stream.cancel()
        engine.close()


def test_the_context_window_ends_a_sequence_for_length(model):
    engine = SequentialEngine(model, context_length=len(PROMPT) + 3)
    try:
        tokens, reason = run(engine, max_new_tokens=50)
    finally:
        engine.close()

    assert len(tokens) == 3 and reason is FinishReason.LENGTH
