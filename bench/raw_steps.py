"""Raw transformers `model.generate`, the floor and ceiling every server is compared to.

Sequential: one request at a time, as Dream's service runs them. Static batch: all 16 prompts in one
`generate` call (left-padded), the throughput a server would reach if requests arrived together.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import QUESTIONS, STATIC_BATCH, BenchContext, Measurement, chat_messages


def _load(ctx: BenchContext):
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template(chat_messages(q), tokenize=False, add_generation_prompt=True) for q in QUESTIONS
    ]
    return model, tokenizer, texts


def _generate(model, tokenizer, texts: list[str], new_tokens: int) -> None:
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    # attention_mask is passed on purpose: this model's pad token is its EOS, which its prompts
    # contain, and generate would otherwise mask those prompt tokens out.
    model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.inference_mode()
def raw_generate(ctx: BenchContext) -> None:
    ctx.progress("raw model.generate: loading the model")
    model, tokenizer, texts = _load(ctx)
    tokenizer.padding_side = "left"
    _generate(model, tokenizer, texts[:1], 2)  # warm-up

    sequential = texts[: 4 * ctx.rounds]
    ctx.progress(f"raw model.generate: sequential, {len(sequential)} requests")
    latencies = []
    started = time.perf_counter()
    for text in sequential:
        request_started = time.perf_counter()
        _generate(model, tokenizer, [text], ctx.new_tokens)
        latencies.append(time.perf_counter() - request_started)
    seconds = time.perf_counter() - started
    ctx.record(
        Measurement(
            clients=1, requests=len(sequential), seconds=seconds, new_tokens=len(sequential) * ctx.new_tokens,
            latencies=latencies, system="raw generate", mode="sequential",
        )
    )

    batch = texts[:STATIC_BATCH]
    ctx.progress(f"raw model.generate: static batch of {len(batch)}, {ctx.rounds} rounds")
    latencies = []
    started = time.perf_counter()
    for _ in range(ctx.rounds):
        round_started = time.perf_counter()
        _generate(model, tokenizer, batch, ctx.new_tokens)
        latencies.extend([time.perf_counter() - round_started] * len(batch))
    seconds = time.perf_counter() - started
    ctx.record(
        Measurement(
            clients=len(batch), requests=len(batch) * ctx.rounds, seconds=seconds,
            new_tokens=len(batch) * ctx.rounds * ctx.new_tokens, latencies=latencies,
            system="raw generate", mode=f"static batch {len(batch)}",
        )
    )


STEPS = [raw_generate]
