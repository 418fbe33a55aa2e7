"""transformers' `no_repeat_ngram_size` for one sequence: which next tokens would repeat an n-gram.

An n-gram (n consecutive tokens) of the prompt or the output may occur once: a token that would
complete one that is already there is never chosen. Pure Python, shared by both engines; a row
keeps one `NoRepeatNGrams` and tells it each new token, so a step costs one dictionary lookup.
"""

from __future__ import annotations

from typing import Collection, Sequence


class NoRepeatNGrams:
    """The n-grams of a growing sequence, indexed by their first n-1 tokens."""

    def __init__(self, size: int, token_ids: Sequence[int]):
        if size < 1:
            raise ValueError("the n-gram size must be at least 1")
        self.size = size
        self.token_ids: list[int] = []
        self._next_tokens: dict[tuple[int, ...], set[int]] = {}
        for token_id in token_ids:
            self.add(token_id)

    def add(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) >= self.size:
            gram = self.token_ids[len(self.token_ids) - self.size :]
            self._next_tokens.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self) -> Collection[int]:
        """The tokens that may not come next (transformers: none before the sequence holds n tokens)."""
        if len(self.token_ids) < self.size:
            return ()
        suffix = tuple(self.token_ids[len(self.token_ids) - self.size + 1 :]) if self.size > 1 else ()
        return self._next_tokens.get(suffix, ())


def banned_next_tokens(size: int, token_ids: Sequence[int]) -> Collection[int]:
    """The tokens that may not follow `token_ids` (one scan; for a sequence seen once, e.g. a beam)."""
    return NoRepeatNGrams(size, token_ids).banned() if size > 0 else ()
