"""Choosing the next token from a row of logits, the way `SamplingParams` asks; shared by the engines."""

from __future__ import annotations

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
) -> int:
    """The next token id for one sequence, from its last-position `logits` (shape: vocabulary).

    `previous_token_ids` (prompt and generated tokens) feed the repetition penalty, and
    `generated_token_ids` (generated tokens only) OpenAI's frequency and presence penalties.
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
    return int(torch.multinomial(probabilities, 1, generator=generator))
