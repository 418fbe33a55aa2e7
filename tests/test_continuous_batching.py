"""The continuous-batching engine: concurrent requests share forward passes and still get their own answers.

Fast tests run a tiny Llama the test builds; the equality test at the end runs the embedded SmolLM2.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.transformers_lm.engines import (
    EngineError,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    TokenStream,
)
from services.transformers_lm.engines.continuous_batching import ContinuousBatchingEngine
from services.transformers_lm.engines.prefix_cache import PrefixCache

PROMPTS = [
    (1, 5, 9, 13, 17, 21, 25),
    (3, 4),
    (60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72),
    (7,),
    (40, 2, 40, 2, 40),
]
TIMEOUT_SECONDS = 60


def build_tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights, scaled so that its greedy choices are clear-cut."""
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like SmolLM2
        max_position_embeddings=128,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def engine():
    engine = ContinuousBatchingEngine(build_tiny_model(), max_batch_size=4, max_queue_size=8)
    yield engine
    engine.close()


def greedy(max_new_tokens: int, **overrides) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **overrides)


def collect(stream: TokenStream) -> list[int]:
    """The stream's tokens, failing the test instead of hanging if the engine stops answering."""
    result: dict[str, object] = {}

    def read():
        try:
            result["tokens"] = stream.collect()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = error

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(TIMEOUT_SECONDS)
    assert not reader.is_alive(), "the stream did not finish"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["tokens"]  # type: ignore[return-value]


def generate_alone(engine, prompt, sampling) -> list[int]:
    return collect(engine.submit(GenerationRequest(prompt, sampling)))


def wait_until(condition, timeout=TIMEOUT_SECONDS):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


class ForwardGate:
    """Parks the engine's scheduler before its next forward pass until released, so a test can act
    while a request is surely still running (the tiny model finishes 100 tokens in a fraction of a second)."""

    def __init__(self, engine, monkeypatch):
        self._open = threading.Event()
        self._parked = threading.Event()
        real_forward = engine.model.forward

        def gated_forward(*args, **kwargs):
            if not self._open.is_set():
                self._parked.set()
                assert self._open.wait(TIMEOUT_SECONDS), "the test never released the engine"
            return real_forward(*args, **kwargs)

        monkeypatch.setattr(engine.model, "forward", gated_forward)

    def wait_parked(self) -> None:
        assert self._parked.wait(TIMEOUT_SECONDS), "the engine never reached a forward pass"

    def release(self) -> None:
        self._open.set()


def test_greedy_tokens_equal_a_full_forward_pass_of_the_model(engine):
    reference_model = build_tiny_model()
    for prompt in PROMPTS[:3]:
        tokens = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                tokens.append(int(reference_model(torch.tensor([tokens])).logits[0, -1].argmax()))

        assert generate_alone(engine, prompt, greedy(12)) == tokens[len(prompt) :]


def test_a_repetition_penalty_changes_the_greedy_tokens_as_transformers_generate_does(engine):
    prompt = PROMPTS[4]
    plain = generate_alone(engine, prompt, greedy(16))
    penalised = generate_alone(engine, prompt, greedy(16, repetition_penalty=1.5))

    with torch.inference_mode():
        expected = build_tiny_model().generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=16,
            do_sample=False, repetition_penalty=1.5, eos_token_id=None, pad_token_id=0,
        )
    assert penalised != plain
    assert penalised == expected[0, len(prompt):].tolist()


@pytest.mark.parametrize(
    "penalties", [{"frequency_penalty": 1.5}, {"presence_penalty": 1.0, "frequency_penalty": -0.5}],
    ids=["frequency", "presence and negative frequency"],
)
def test_openai_penalties_change_the_greedy_tokens_and_hold_under_batching(engine, penalties):
    plain = generate_alone(engine, PROMPTS[4], greedy(16))
    alone = generate_alone(engine, PROMPTS[4], greedy(16, **penalties))
    others = [engine.submit(GenerationRequest(p, greedy(24))) for p in PROMPTS[:3]]
    batched = collect(engine.submit(GenerationRequest(PROMPTS[4], greedy(16, **penalties))))
    for stream in others:
        collect(stream)

    assert alone != plain
    assert batched == alone


def test_greedy_tokens_under_batching_equal_the_tokens_alone_while_other_requests_run(engine):
    alone = [generate_alone(engine, prompt, greedy(20)) for prompt in PROMPTS]

    # Staggered, so rows join and leave while others are half-way; more requests than slots.
    streams = []
    for index, prompt in enumerate(PROMPTS * 2):
        streams.append(engine.submit(GenerationRequest(prompt, greedy(20))))
        if index % 3 == 0:
            time.sleep(0.01)
    batched = [collect(stream) for stream in streams]

    assert batched == alone * 2
    assert engine.stats.max_rows_in_step > 1


def test_a_prompt_that_begins_like_an_earlier_one_computes_only_the_rest_and_answers_the_same():
    cached = ContinuousBatchingEngine(build_tiny_model(), max_batch_size=4)
    uncached = ContinuousBatchingEngine(build_tiny_model(), max_batch_size=4, prefix_cache_bytes=0)
    first_turn = PROMPTS[0]
    try:
        first_answer = generate_alone(cached, first_turn, greedy(8))
        # The next turn of the dialog: the first prompt, its answer, and more.
        second_turn = first_turn + tuple(first_answer) + (30, 31, 32)
        shares_a_beginning = first_turn[:4] + (90, 91)
        answers = [generate_alone(cached, prompt, greedy(12)) for prompt in (second_turn, shares_a_beginning)]
        from_cache = cached.stats.prompt_tokens_from_cache

        assert answers == [generate_alone(uncached, prompt, greedy(12)) for prompt in (second_turn, shares_a_beginning)]
        assert from_cache == len(first_turn) + 4
        assert uncached.stats.prompt_tokens_from_cache == 0
    finally:
        cached.close()
        uncached.close()


def test_rows_with_different_sampling_settings_share_a_batch_and_keep_their_own_results(engine):
    settings = [
        greedy(16),
        SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.7, top_p=0.9, seed=1),
        SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.3, top_k=5, seed=2),
        greedy(16, repetition_penalty=1.5),
        greedy(16, frequency_penalty=1.5, presence_penalty=0.5),
    ]
    alone = [generate_alone(engine, PROMPTS[0], sampling) for sampling in settings]
    steps_before = engine.stats.steps

    streams = [engine.submit(GenerationRequest(PROMPTS[0], sampling)) for sampling in settings]
    together = [collect(stream) for stream in streams]

    assert together == alone
    assert engine.stats.steps - steps_before < sum(len(tokens) for tokens in together)  # rows shared steps
    assert alone[0] != alone[3]  # the penalty changed the greedy row's answer
    assert alone[0] != alone[4]  # so did OpenAI's


def test_each_row_ends_at_its_own_max_new_tokens(engine):
    lengths = [1, 5, 9, 30]
    streams = [engine.submit(GenerationRequest(prompt, greedy(n))) for prompt, n in zip(PROMPTS, lengths)]

    assert [len(collect(stream)) for stream in streams] == lengths
    assert {stream.finish_reason for stream in streams} == {FinishReason.LENGTH}


def test_a_row_ends_at_its_own_stop_token_without_emitting_it(engine):
    free_run = generate_alone(engine, PROMPTS[0], greedy(10))
    stop_token = free_run[3]
    expected = free_run[: free_run.index(stop_token)]

    stopping = engine.submit(GenerationRequest(PROMPTS[0], greedy(10, stop_token_ids=(stop_token,))))
    running_on = engine.submit(GenerationRequest(PROMPTS[0], greedy(10)))

    assert collect(stopping) == expected
    assert stopping.finish_reason is FinishReason.STOP
    assert collect(running_on) == free_run


def test_min_new_tokens_holds_back_stop_tokens(engine):
    free_run = generate_alone(engine, PROMPTS[1], greedy(8))
    first_token = free_run[0]

    stream = engine.submit(GenerationRequest(PROMPTS[1], greedy(8, stop_token_ids=(first_token,), min_new_tokens=2)))
    tokens = collect(stream)

    assert first_token not in tokens[:2]
    assert len(tokens) >= 2


def test_a_full_queue_refuses_at_once_with_a_retry_after(monkeypatch):
    engine = ContinuousBatchingEngine(build_tiny_model(), max_batch_size=1, max_queue_size=1)
    gate = ForwardGate(engine, monkeypatch)
    try:
        running = engine.submit(GenerationRequest(PROMPTS[0], greedy(100)))
        gate.wait_parked()  # in the only slot, before its first token
        waiting = engine.submit(GenerationRequest(PROMPTS[1], greedy(2)))

        with pytest.raises(QueueFullError) as refusal:
            engine.submit(GenerationRequest(PROMPTS[2], greedy(2)))
        gate.release()

        assert refusal.value.retry_after_seconds >= 1
        assert len(collect(running)) == 100
        assert len(collect(waiting)) == 2
    finally:
        gate.release()
        engine.close()


def test_cancel_frees_the_slot_for_the_next_request(monkeypatch):
    engine = ContinuousBatchingEngine(build_tiny_model(), max_batch_size=1, max_queue_size=4)
    gate = ForwardGate(engine, monkeypatch)
    try:
        endless = engine.submit(GenerationRequest(PROMPTS[0], greedy(120)))
        gate.wait_parked()  # its prompt is in the forward pass that gives its first token
        waiting = engine.submit(GenerationRequest(PROMPTS[1], greedy(3)))

        endless.cancel()
        gate.release()

        assert len(collect(waiting)) == 3
        assert endless.finish_reason is FinishReason.CANCELLED
        assert len(collect(endless)) <= 1  # dropped at the next step: no token after the one in flight
    finally:
        gate.release()
        engine.close()


def test_a_failing_step_finishes_its_streams_with_error_and_the_engine_keeps_serving(engine, monkeypatch):
    real_forward = engine.model.forward
    failures = iter([RuntimeError("simulated kernel failure")])

    def forward_that_fails_once(*args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward_that_fails_once)
    failed = engine.submit(GenerationRequest(PROMPTS[0], greedy(5)))

    with pytest.raises(EngineError, match="simulated kernel failure"):
        collect(failed)
    assert failed.finish_reason is FinishReason.ERROR
    assert len(collect(engine.submit(GenerationRequest(PROMPTS[0], greedy(5))))) == 5
    wait_until(lambda: engine.num_active == 0)  # a stream ends just before its row leaves the batch


def test_requests_the_model_cannot_run_are_refused_at_submit(engine):
    with pytest.raises(ValueError, match="no tokens"):
        engine.submit(GenerationRequest((), greedy(2)))
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(GenerationRequest((1, 96), greedy(2)))
    with pytest.raises(ValueError, match="context window"):
        engine.submit(GenerationRequest(tuple(range(1, 90)) * 2, greedy(2)))


def test_a_row_ends_with_length_when_the_context_window_is_full(engine):
    prompt = tuple(range(1, 90)) + tuple(range(1, 30))  # 118 of 128 positions

    stream = engine.submit(GenerationRequest(prompt, greedy(50)))

    assert len(collect(stream)) == 128 - len(prompt)
    assert stream.finish_reason is FinishReason.LENGTH


def test_close_cancels_running_and_waiting_streams():
    engine = ContinuousBatchingEngine(build_tiny_model(), max_batch_size=1, max_queue_size=4)
    running = engine.submit(GenerationRequest(PROMPTS[0], greedy(120)))
    waiting = engine.submit(GenerationRequest(PROMPTS[1], greedy(120)))
    wait_until(lambda: engine.num_active == 1)

    engine.close()

    assert running.finish_reason is FinishReason.CANCELLED
    assert waiting.finish_reason is FinishReason.CANCELLED


def test_the_prefix_cache_stays_within_its_byte_budget_and_drops_the_least_recently_used_prompt_first():
    entry = torch.zeros(1, 2, 1, 4, 8)  # 4 positions of keys and values: 256 bytes
    cache = PrefixCache(budget_bytes=2 * entry.numel() * entry.element_size())
    cache.add((1, 2, 3, 4), entry.clone())
    cache.add((5, 6, 7, 8), entry.clone())
    assert cache.longest_prefix((1, 2, 3, 4, 9))[0] == 4  # used now: (5, 6, 7, 8) is the least recent
    cache.add((9, 9, 9, 9), entry.clone())

    assert len(cache) == 2 and cache.nbytes <= cache.budget_bytes
    assert cache.longest_prefix((5, 6, 7, 8, 1)) == (0, None)
    # The last prompt token is never taken from the cache: its logits choose the first new token.
    assert cache.longest_prefix((1, 2, 3, 4))[0] == 3
