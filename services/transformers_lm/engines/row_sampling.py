"""Choosing the next token for every row of a batch, each row with its own `SamplingParams`.

The order and meaning follow transformers' `generate`: repetition penalty and the minimum length
first (they apply to greedy rows too), then, for sampling rows only, temperature, top-k and top-p,
and a draw from the row's own generator (seeded when the request gave a seed, so a seeded request
gives the same text whether it runs alone or in a batch). Rows without any processing — plain
greedy, the common case — cost one vectorised argmax.
"""

from __future__ import annotations

import torch

from services.transformers_lm.engine import SamplingParams


class RowSampler:
    """The per-row state sampling needs: the tokens seen so far and the row's random generator."""

    def __init__(self, sampling: SamplingParams, prompt_token_ids: tuple[int, ...], device: torch.device):
        self.sampling = sampling
        self.generator: torch.Generator | None = None
        if sampling.do_sample:
            self.generator = torch.Generator(device=device)
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed)
        self._seen_token_ids: set[int] = set(prompt_token_ids) if sampling.repetition_penalty != 1.0 else set()
        self.num_generated = 0

    @property
    def is_plain_greedy(self) -> bool:
        """No processing at all: argmax of the raw logits."""
        return (
            not self.sampling.do_sample
            and self.sampling.repetition_penalty == 1.0
            and not (self.num_generated < self.sampling.min_new_tokens and self.sampling.stop_token_ids)
        )

    def note_token(self, token_id: int) -> None:
        self.num_generated += 1
        if self.sampling.repetition_penalty != 1.0:
            self._seen_token_ids.add(token_id)

    def process(self, scores: torch.Tensor) -> torch.Tensor:
        """Repetition penalty and minimum length on one row's logits [vocab] (returns a new tensor)."""
        sampling = self.sampling
        scores = scores.clone()
        if sampling.repetition_penalty != 1.0 and self._seen_token_ids:
            seen = torch.tensor(sorted(self._seen_token_ids), device=scores.device)
            seen_scores = scores[seen]
            penalised = torch.where(
                seen_scores < 0, seen_scores * sampling.repetition_penalty, seen_scores / sampling.repetition_penalty
            )
            scores[seen] = penalised
        if self.num_generated < sampling.min_new_tokens and sampling.stop_token_ids:
            scores[list(sampling.stop_token_ids)] = float("-inf")
        return scores


def _warp(scores: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p of one sampling row, as transformers' logits warpers do them."""
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        threshold = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - sampling.top_p)
        remove_sorted[-1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(0, sorted_indices, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def choose_next_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """The next token id of each row, from logits [rows, vocab] (one row per sampler, in order)."""
    greedy_choice = torch.argmax(logits, dim=-1).tolist()
    chosen: list[int] = []
    for row, sampler in enumerate(samplers):
        if sampler.is_plain_greedy:
            chosen.append(greedy_choice[row])
            continue
        scores = sampler.process(logits[row])
        if not sampler.sampling.do_sample:
            chosen.append(int(torch.argmax(scores)))
            continue
        probabilities = _warp(scores, sampler.sampling).softmax(dim=-1)
        chosen.append(int(torch.multinomial(probabilities, 1, generator=sampler.generator)))
    return chosen
