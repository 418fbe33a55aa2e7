"""On the embedded SmolLM2 (fp32): greedy answers under continuous batching equal the answers alone.

Run with both models the engine can be given: Parley's native Llama (what the service runs for this
model) and transformers' own (what it runs for other architectures). The answers alone come from
transformers' own greedy `generate`, so both are held to transformers' output.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.model_sources import DEFAULT_MODEL_NAME, file_sha256, resolve_model_source
from services.transformers_lm.backends.transformers_backend import converted_gguf_dir
from services.transformers_lm.engines import GenerationRequest, SamplingParams
from services.transformers_lm.engines.continuous_batching import ContinuousBatchingEngine
from services.transformers_lm.engines.native_llama import NativeLlama
from support.servers import REPO_ROOT

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir():
    source = resolve_model_source(DEFAULT_MODEL_NAME)
    return converted_gguf_dir(source.path, REPO_ROOT / ".cache" / "models", file_sha256(source.path))


@pytest.fixture(scope="module")
def prompts(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    return [tuple(tokenizer(text)["input_ids"]) for text in rendered], tokenizer


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.mark.parametrize("model_code", ["native", "transformers"])
def test_greedy_answers_under_batching_equal_the_answers_alone_while_other_requests_run(model_dir, prompts, model_code):
    prompt_ids, tokenizer = prompts
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS)
    reference = load(model_dir)
    with torch.inference_mode():
        single_request_answers = [
            reference.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=NEW_TOKENS,
                do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id or 0,
            )[0, len(p):].tolist()
            for p in prompt_ids
        ]

    batched_model = NativeLlama.load(model_dir, torch.float32, torch.device("cpu")) if model_code == "native" else load(model_dir)
    engine = ContinuousBatchingEngine(batched_model, max_batch_size=8)
    try:
        alone = [engine.submit(GenerationRequest(p, greedy)).collect() for p in prompt_ids]
        # Other requests, sampled and longer, keep the batch busy while the greedy ones join and leave.
        others = [
            engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=36, do_sample=True, temperature=0.8, seed=i)))
            for i, p in enumerate(prompt_ids)
        ]
        batched_streams = [engine.submit(GenerationRequest(p, greedy)) for p in prompt_ids]
        batched = [stream.collect() for stream in batched_streams]
        for stream in others:
            stream.collect()
        max_rows = engine.stats.max_rows_in_step
    finally:
        engine.close()

    assert batched == alone
    assert alone == single_request_answers
    assert max_rows == 8
    assert "Paris" in tokenizer.decode(batched[0])
