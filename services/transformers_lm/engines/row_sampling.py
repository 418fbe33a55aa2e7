"""Choosing the next token for every row of a batch, each row with its own `SamplingParams`.

Rows that need any processing (sampling, a penalty, a minimum length, forbidden n-grams) go through
the same `sampling.next_token` the sequential engine uses, with the row's own generator (seeded when
the request gave a seed), so a request gets the same tokens whichever engine runs it and whoever
shares its batch. Plain greedy rows — the common case — cost one vectorised argmax for the whole
batch; a feature a row does not use costs it nothing.
"""

from __future__ import annotations

import torch

from services.transformers_lm.engines import SamplingParams
from services.transformers_lm.engines.no_repeat import NoRepeatNGrams
from services.transformers_lm.engines.sampling import make_generator, next_token


class RowSampler:
    """The per-row state sampling needs: the tokens seen so far and the row's random generator."""

    def __init__(self, sampling: SamplingParams, prompt_token_ids: tuple[int, ...]):
        self.sampling = sampling
        self.generator = make_generator(sampling) if sampling.do_sample else None
        self._tracks_tokens = sampling.repetition_penalty != 1.0
        self._seen_token_ids: list[int] = list(prompt_token_ids) if self._tracks_tokens else []
        self._tracks_generated = sampling.uses_openai_penalties
        self._generated_token_ids: list[int] = []
        self._ngrams = (
            NoRepeatNGrams(sampling.no_repeat_ngram_size, prompt_token_ids) if sampling.no_repeat_ngram_size else None
        )
        self.num_generated = 0

    def _forbids_stop_tokens(self) -> bool:
        return self.num_generated < self.sampling.min_new_tokens and bool(self.sampling.stop_token_ids)

    @property
    def is_plain_greedy(self) -> bool:
        """No processing at all: the argmax of the raw logits."""
        return (
            not self.sampling.do_sample
            and not self._tracks_tokens
            and not self._tracks_generated
            and self._ngrams is None
            and not self._forbids_stop_tokens()
        )

    def note_token(self, token_id: int) -> None:
        self.num_generated += 1
        if self._tracks_tokens:
            self._seen_token_ids.append(token_id)
        if self._tracks_generated:
            self._generated_token_ids.append(token_id)
        if self._ngrams is not None:
            self._ngrams.add(token_id)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [vocab]."""
        previous = torch.tensor(self._seen_token_ids) if self._tracks_tokens else None
        generator = self.generator if self.generator is not None else _UNUSED_GENERATOR
        generated = torch.tensor(self._generated_token_ids, dtype=torch.long) if self._tracks_generated else None
        return next_token(
            logits,
            self.sampling,
            previous,
            generator,
            forbid_stop_tokens=self._forbids_stop_tokens(),
            generated_token_ids=generated,
            banned_token_ids=self._ngrams.banned() if self._ngrams is not None else (),
        )


# next_token takes a generator even for greedy rows, where it never draws from it.
_UNUSED_GENERATOR = torch.Generator()


def choose_next_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """The next token id of each row, from logits [rows, vocab] (one row per sampler, in order)."""
    greedy_choice = torch.argmax(logits, dim=-1).tolist()
    return [
        greedy_choice[row] if sampler.is_plain_greedy else sampler.choose(logits[row])
        for row, sampler in enumerate(samplers)
    ]
