"""Beam search and the per-row generation settings Dream's configs use, in both batching engines.

The continuous-batching engine runs a tiny Llama the tests build and is held to transformers' own
`generate` on the same weights: beam search (`num_beams`, `length_penalty`, `early_stopping`, with
the processors), `no_repeat_ngram_size` and `typical_p` give exactly transformers' tokens. The
llama.cpp engine runs the embedded SmolLM2 GGUF: every beam it decodes gets the logits a fresh
context computes for that beam's whole text (so the KV it copies between beams is right), and its
beams, n-gram bans and typical sampling keep their results while other requests share the batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.transformers_lm.engines import BeamSearchParams, FinishReason, GenerationRequest, SamplingParams
from services.transformers_lm.engines import beam_search
from services.transformers_lm.engines.continuous_batching import ContinuousBatchingEngine
from test_continuous_batching import PROMPTS, build_tiny_model, collect

END = 7  # the tiny model's end token in these tests: a token it does produce


@pytest.fixture(scope="module")
def engine():
    engine = ContinuousBatchingEngine(build_tiny_model(), max_batch_size=8, max_queue_size=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference():
    return build_tiny_model()


def transformers_generate(reference, prompt, **settings) -> list[list[int]]:
    """transformers' answers for `prompt`, each cut before its end token."""
    with torch.inference_mode():
        output = reference.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            pad_token_id=END, eos_token_id=END, **settings,
        )
    return [tokens[: tokens.index(END)] if END in tokens else tokens for tokens in output[:, len(prompt) :].tolist()]


def sampling(max_new_tokens: int = 14, **settings) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(END,), **settings)


def beams(engine, prompt, beam: BeamSearchParams, **settings) -> list[list[int]]:
    streams = engine.submit_beam_search(GenerationRequest(prompt, sampling(**settings), beam=beam))
    return [collect(stream) for stream in streams]


# --- the continuous-batching engine, against transformers -----------------------------------------


@pytest.mark.parametrize(
    "beam",
    [
        BeamSearchParams(num_beams=2, num_return_sequences=2),
        BeamSearchParams(num_beams=3, num_return_sequences=2),
        BeamSearchParams(num_beams=4, num_return_sequences=4, length_penalty=0.5, early_stopping=True),
        BeamSearchParams(num_beams=3, num_return_sequences=3, length_penalty=2.0, early_stopping="never"),
    ],
    ids=["2 beams", "3 beams, 2 answers", "early stopping", "never stop early"],
)
def test_beam_search_gives_transformers_hypotheses(engine, reference, beam):
    for prompt in PROMPTS:
        expected = transformers_generate(
            reference, prompt, max_new_tokens=14, do_sample=False, num_beams=beam.num_beams,
            num_return_sequences=beam.num_return_sequences, length_penalty=beam.length_penalty,
            early_stopping=beam.early_stopping,
        )
        assert beams(engine, prompt, beam) == expected


@pytest.mark.parametrize(
    "settings",
    [{"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 10}],
    ids=["repetition penalty", "no repeated bigram", "min new tokens"],
)
def test_beam_search_applies_the_processors_as_transformers_does(engine, reference, settings):
    beam = BeamSearchParams(num_beams=3, num_return_sequences=2)
    for prompt in PROMPTS:
        expected = transformers_generate(
            reference, prompt, max_new_tokens=14, do_sample=False, num_beams=3, num_return_sequences=2, **settings
        )
        assert beams(engine, prompt, beam, **settings) == expected


def test_beam_search_differs_from_greedy_and_ends_hypotheses_at_the_end_token(engine):
    prompt = PROMPTS[3]
    streams = engine.submit_beam_search(GenerationRequest(prompt, sampling(), beam=BeamSearchParams(4, 4)))
    hypotheses = [collect(stream) for stream in streams]
    greedy = collect(engine.submit(GenerationRequest(prompt, sampling())))

    assert hypotheses[0] != greedy  # the best beam is not the greedy answer here
    assert len({tuple(h) for h in hypotheses}) == 4
    ended = [stream.finish_reason for stream in streams]
    assert FinishReason.STOP in ended and all(END not in h for h in hypotheses)


def test_beam_searches_keep_their_hypotheses_while_other_requests_share_the_batch(engine):
    beam = BeamSearchParams(num_beams=3, num_return_sequences=2)
    alone = [beams(engine, prompt, beam) for prompt in PROMPTS[:3]]
    plain_alone = [collect(engine.submit(GenerationRequest(p, sampling(20)))) for p in PROMPTS]

    searches = [engine.submit_beam_search(GenerationRequest(p, sampling(), beam=beam)) for p in PROMPTS[:3]]
    plain = [engine.submit(GenerationRequest(p, sampling(20))) for p in PROMPTS]
    together = [[collect(stream) for stream in streams] for streams in searches]

    assert together == alone
    assert [collect(stream) for stream in plain] == plain_alone


def test_a_sampled_beam_search_is_reproducible_with_a_seed(engine):
    beam = BeamSearchParams(num_beams=2, num_return_sequences=2)
    hot = {"do_sample": True, "temperature": 1.5, "top_k": 20, "top_p": 0.95}
    first = beams(engine, PROMPTS[0], beam, seed=11, **hot)
    again = beams(engine, PROMPTS[0], beam, seed=11, **hot)
    others = [beams(engine, PROMPTS[0], beam, seed=seed, **hot) for seed in range(12, 16)]

    assert first == again
    assert any(other != first for other in others)


def test_a_beam_search_with_more_beams_than_slots_is_refused_at_submit(engine):
    with pytest.raises(ValueError, match="beams do not fit"):
        engine.submit_beam_search(GenerationRequest(PROMPTS[0], sampling(), beam=BeamSearchParams(9, 1)))


def test_no_repeat_ngram_size_gives_transformers_tokens_alone_and_in_a_batch(engine, reference):
    for prompt in PROMPTS:
        expected = transformers_generate(reference, prompt, max_new_tokens=20, do_sample=False, no_repeat_ngram_size=2)
        plain = transformers_generate(reference, prompt, max_new_tokens=20, do_sample=False)
        streams = [engine.submit(GenerationRequest(p, sampling(20, no_repeat_ngram_size=2))) for p in PROMPTS]
        batched = [collect(stream) for stream in streams][PROMPTS.index(prompt)]

        assert [collect(engine.submit(GenerationRequest(prompt, sampling(20, no_repeat_ngram_size=2))))] == expected
        assert [batched] == expected
    bigrams = [tuple(plain[0][i : i + 2]) for i in range(len(plain[0]) - 1)]
    assert len(set(bigrams)) < len(bigrams), "the plain greedy answer should repeat a bigram"


def test_typical_p_keeps_the_most_typical_token_as_transformers_does(engine, reference):
    for prompt in PROMPTS:
        expected = transformers_generate(reference, prompt, max_new_tokens=14, do_sample=True, typical_p=0.001, top_k=0)
        greedy = transformers_generate(reference, prompt, max_new_tokens=14, do_sample=False)
        sampled = [
            collect(engine.submit(GenerationRequest(prompt, sampling(do_sample=True, typical_p=0.001, seed=seed))))
            for seed in (1, 2)
        ]

        assert sampled == expected * 2  # one token left per step: the seed cannot matter
        assert expected != greedy


# --- the llama.cpp engine, on the embedded model -------------------------------------------------

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-llama-cpp)")


@pytest.fixture(scope="module")
def gguf():
    from common.model_sources import DEFAULT_MODEL_NAME, embedded_model_path
    from services.transformers_lm.engines.llama_cpp_model import LlamaCppModel

    model = LlamaCppModel.load(embedded_model_path(DEFAULT_MODEL_NAME))
    yield model
    model.close()


@pytest.fixture(scope="module")
def llama_engine(gguf):
    from test_llama_cpp_engine import make_engine

    engine = make_engine(gguf)
    yield engine
    engine.close()


def fresh_context_logits(model, token_ids: list[int]) -> np.ndarray:
    """The next-token logits of `token_ids`, computed from scratch in a context of their own."""
    llama = model.llama_cpp
    params = llama.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 1024, 512, 512, 1
    params.n_threads = params.n_threads_batch = 1
    context = llama.llama_init_from_model(model.pointer, params)
    batch = llama.llama_batch_init(512, 0, 1)
    try:
        for position, token in enumerate(token_ids):
            batch.token[position], batch.pos[position], batch.n_seq_id[position] = token, position, 1
            batch.seq_id[position][0], batch.logits[position] = 0, 0
        batch.logits[len(token_ids) - 1] = 1
        batch.n_tokens = len(token_ids)
        assert llama.llama_decode(context, batch) == 0
        return np.ctypeslib.as_array(llama.llama_get_logits(context), shape=(1, model.n_vocab)).copy()[0]
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(context)


def llama_prompt(model, question: str) -> tuple[int, ...]:
    from test_llama_cpp_engine import chat_prompt

    return chat_prompt(model, question)


def llama_sampling(model, max_new_tokens: int = 16, **settings) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=model.end_of_generation_token_ids(), **settings)


@pytest.mark.model
def test_llama_cpp_beams_are_computed_on_their_own_text(gguf, llama_engine, monkeypatch):
    seen: list[tuple[list[list[int]], np.ndarray]] = []
    real_step = beam_search.BeamSearch.step

    def recording_step(search, logits):
        seen.append(([list(beam.token_ids) for beam in search.running], np.array(logits)))
        return real_step(search, logits)

    monkeypatch.setattr(beam_search.BeamSearch, "step", recording_step)
    prompt = llama_prompt(gguf, "Name a primary colour.")
    streams = llama_engine.submit_beam_search(GenerationRequest(prompt, llama_sampling(gguf), beam=BeamSearchParams(3, 2)))
    hypotheses = [stream.collect() for stream in streams]

    assert len(hypotheses) == 2 and all(hypotheses) and hypotheses[0] != hypotheses[1]
    assert len(seen) > 3 and max(len(running) for running, _ in seen) == 3
    for running, logits in seen:
        for token_ids, row in zip(running, logits):
            assert np.abs(fresh_context_logits(gguf, list(prompt) + token_ids) - row).max() < 1e-3


@pytest.mark.model
def test_llama_cpp_beam_searches_keep_their_hypotheses_beside_other_requests(gguf, llama_engine):
    questions = ["Name a primary colour.", "What do bees make?"]
    beam = BeamSearchParams(2, 2)
    requests = [GenerationRequest(llama_prompt(gguf, q), llama_sampling(gguf, 12), beam=beam) for q in questions]
    alone = [[s.collect() for s in llama_engine.submit_beam_search(request)] for request in requests]
    plain_request = GenerationRequest(llama_prompt(gguf, "How many legs does a spider have?"), llama_sampling(gguf, 20))
    plain_alone = llama_engine.submit(plain_request).collect()

    searches = [llama_engine.submit_beam_search(request) for request in requests]
    plain = llama_engine.submit(plain_request)

    assert [[s.collect() for s in streams] for streams in searches] == alone
    assert plain.collect() == plain_alone


def repeated_ngrams(prompt: tuple[int, ...], output: list[int], size: int) -> int:
    """How many n-grams ending in `output` occur earlier in prompt and output."""
    whole = [*prompt, *output]
    grams = [tuple(whole[i : i + size]) for i in range(len(whole) - size + 1)]
    return sum(1 for end in range(len(prompt), len(grams)) if grams[end] in grams[:end])


@pytest.mark.model
def test_llama_cpp_no_repeat_ngram_size_bans_every_repeated_ngram(gguf, llama_engine):
    prompt = llama_prompt(gguf, "Write a long poem about the rain.")
    plain = llama_engine.submit(GenerationRequest(prompt, llama_sampling(gguf, 60))).collect()
    requests = [GenerationRequest(prompt, llama_sampling(gguf, 60, no_repeat_ngram_size=2))] * 2
    alone = llama_engine.submit(requests[0]).collect()
    streams = [llama_engine.submit(request) for request in requests]  # and side by side
    together = [stream.collect() for stream in streams]

    assert repeated_ngrams(prompt, plain, 2) > 0, "the plain answer should repeat a bigram"
    assert repeated_ngrams(prompt, alone, 2) == 0  # none repeated, the prompt's bigrams included
    assert together == [alone, alone]


@pytest.mark.model
def test_llama_cpp_typical_p_at_a_tiny_mass_leaves_one_token_whatever_the_seed(gguf, llama_engine):
    prompt = llama_prompt(gguf, "Tell me something about the sea.")
    greedy = llama_engine.submit(GenerationRequest(prompt, llama_sampling(gguf))).collect()
    typical = [
        llama_engine.submit(GenerationRequest(prompt, llama_sampling(gguf, do_sample=True, typical_p=0.001, seed=seed))).collect()
        for seed in (1, 2, 3)
    ]
    sampled = [
        llama_engine.submit(GenerationRequest(prompt, llama_sampling(gguf, do_sample=True, seed=seed))).collect()
        for seed in (1, 2)
    ]

    assert typical[0] == typical[1] == typical[2]
    assert typical[0] != greedy
    assert sampled[0] != sampled[1]
