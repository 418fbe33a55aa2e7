"""Choosing the next token from a row of logits, the way `SamplingParams` asks; shared by the engines.

The order is transformers' `generate`: the processors (repetition penalty, OpenAI's penalties, the
n-grams `no_repeat_ngram_size` forbids, end tokens held back until `min_new_tokens`), then, when
sampling, the warpers (temperature, top-k, top-p, typical-p) and one draw.
"""

from __future__ import annotations

from typing import Collection

import torch

from services.transformers_lm.engines import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """A random generator of the sequence's own: seeded when the request gave a seed."""
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    previous_token_ids: torch.Tensor | None,
    generator: torch.Generator,
    *,
    forbid_stop_tokens: bool,
    generated_token_ids: torch.Tensor | None = None,
    banned_token_ids: Collection[int] = (),
) -> int:
    """The next token id for one sequence, from its last-position `logits` (shape: vocabulary).

    `previous_token_ids` (prompt and generated tokens) feed the repetition penalty,
    `generated_token_ids` (generated tokens only) OpenAI's frequency and presence penalties, and
    `banned_token_ids` are the tokens no_repeat_ngram_size forbids here.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and previous_token_ids is not None and previous_token_ids.numel():
        seen = logits.gather(0, previous_token_ids)
        penalised = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(0, previous_token_ids, penalised)
    if params.uses_openai_penalties and generated_token_ids is not None and generated_token_ids.numel():
        token_ids, counts = torch.unique(generated_token_ids, return_counts=True)
        penalties = counts.float() * params.frequency_penalty + params.presence_penalty
        logits = logits.scatter_add(0, token_ids, -penalties)
    if banned_token_ids:
        logits[list(banned_token_ids)] = -float("inf")
    if forbid_stop_tokens and params.stop_token_ids:
        logits[list(params.stop_token_ids)] = -float("inf")
    if not params.do_sample or params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        kth_largest = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_largest, -float("inf"))
    probabilities = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probabilities, order = torch.sort(probabilities, descending=True)
        mass_before = torch.cumsum(sorted_probabilities, dim=-1) - sorted_probabilities
        sorted_probabilities[mass_before >= params.top_p] = 0.0  # always keeps the likeliest token
        probabilities = torch.zeros_like(probabilities).scatter(0, order, sorted_probabilities)
    if params.typical_p < 1.0:
        probabilities = typical_filter(probabilities / probabilities.sum(), params.typical_p)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def typical_filter(probabilities: torch.Tensor, mass: float) -> torch.Tensor:
    """transformers' TypicalLogitsWarper on a probability vector: keep the tokens whose surprise
    (-log p) is closest to the entropy, in that order, until their probability reaches `mass`."""
    log_probabilities = torch.log(probabilities)
    entropy = -torch.nansum(probabilities * log_probabilities)
    shifted = torch.abs(-log_probabilities - entropy)  # inf for tokens already filtered out
    sorted_shifted, order = torch.sort(shifted, stable=True)
    cumulative = torch.cumsum(probabilities[order], dim=-1)
    last = min(int((cumulative < mass).sum()), probabilities.numel() - 1)
    keep = shifted <= sorted_shifted[last]
    keep[order[0]] = True  # at least one token
    return probabilities * keep
