"""Beam search as transformers' `generate` runs it, for the engines to drive one step at a time.

An engine runs the beams of a request as rows of its batch (each beam in a KV slot of its own,
next to any other requests) and, after each forward pass, hands this module the beams' logits.
`BeamSearch.step` applies transformers' processors to each beam's log-probabilities (`beam_log_probs`:
repetition penalty, OpenAI's penalties, no-repeat n-grams, held-back end tokens, and with
`do_sample` the warpers), keeps the best continuations over all beams — or samples them, for
transformers' beam sample — and answers which beam each new beam continues and with which token.
The engine then copies a parent's KV into the slot of a second child (a beam no child continues
gives its slot up), so no beam ever recomputes its prefix.

The bookkeeping follows transformers' `_beam_search` (version 4.5x and later) step for step, so the
same logits give the same hypotheses (tests/test_beam_search.py holds both engines to it):
`max(2, 1 + number of end tokens) * num_beams` candidates per step; candidates that end (an end
token, or the length limit) among the best `num_beams` become finished hypotheses scored by their
summed log-probability over `length ** length_penalty`; the best `num_beams` candidates that do not
end run on; the search stops when `early_stopping` says no running beam can beat the finished ones,
or when every candidate ends. Numpy only: both engines use it, and llama.cpp's needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from services.transformers_lm.engines import BeamSearchParams, SamplingParams

# transformers' "minus infinity but finite" for scores that must lose.
_LOSES = -1.0e9


@dataclass
class Beam:
    token_ids: list[int]  # generated so far
    score: float  # summed processed log-probability


@dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # without the end token
    ended_by_stop_token: bool
    score: float  # normalised by length ** length_penalty


def _banned_after(sequence: np.ndarray, size: int) -> np.ndarray:
    """Tokens that would complete an n-gram of `size` already in `sequence` (transformers' rule)."""
    if len(sequence) < size:
        return sequence[:0]
    if size == 1:
        return sequence
    windows = sliding_window_view(sequence, size)
    matches = (windows[:, :-1] == sequence[len(sequence) - size + 1 :]).all(axis=1)
    return windows[matches, -1]


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _warp(rows: np.ndarray, sampling: SamplingParams, min_keep: int) -> np.ndarray:
    """transformers' warpers on each row: temperature, top-k, top-p, typical-p (in place)."""
    if sampling.temperature != 1.0:
        rows /= sampling.temperature
    vocabulary = rows.shape[-1]
    if sampling.top_k > 0:
        k = min(max(sampling.top_k, min_keep), vocabulary)
        kth = np.partition(rows, vocabulary - k, axis=-1)[:, vocabulary - k][:, None]
        rows[rows < kth] = -np.inf
    if sampling.top_p < 1.0:
        order = np.argsort(rows, axis=-1, kind="stable")  # ascending, as transformers sorts
        sorted_rows = np.take_along_axis(rows, order, axis=-1)
        cumulative = np.cumsum(np.exp(_log_softmax(sorted_rows)), axis=-1)
        remove = cumulative <= 1 - sampling.top_p
        remove[:, vocabulary - min_keep :] = False
        np.put_along_axis(rows, order, np.where(remove, -np.inf, sorted_rows), axis=-1)
    if sampling.typical_p < 1.0:
        for row in rows:
            log_probabilities = _log_softmax(row[None, :])[0]
            probabilities = np.exp(log_probabilities)
            with np.errstate(invalid="ignore"):
                entropy = -np.nansum(log_probabilities * probabilities)
            shifted = np.abs(-log_probabilities - entropy)
            order = np.argsort(shifted, kind="stable")
            cumulative = np.cumsum(probabilities[order])
            last = min(int((cumulative < sampling.typical_p).sum()), vocabulary - 1)
            remove = shifted[order] > shifted[order][last]
            remove[:min_keep] = False
            row[order[remove]] = -np.inf
    return rows


class BeamSearch:
    """The state of one request's beam search; `step` it with its running beams' logits."""

    def __init__(
        self,
        params: BeamSearchParams,
        sampling: SamplingParams,
        prompt_token_ids: Sequence[int],
        max_new_tokens: int,
    ):
        self.params = params
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.prompt = np.asarray(prompt_token_ids, dtype=np.int64)
        self.stop_ids = np.asarray(sorted(set(sampling.stop_token_ids)), dtype=np.int64)
        self._stop_set = frozenset(sampling.stop_token_ids)
        self._prompt_distinct = np.unique(self.prompt) if sampling.repetition_penalty != 1.0 else None
        self.candidates_per_step = max(2, 1 + len(self.stop_ids)) * params.num_beams
        self.rng = np.random.default_rng(sampling.seed) if sampling.do_sample else None
        self.running: list[Beam] = [Beam([], 0.0)]  # the prompt alone: every first candidate comes from it
        self.finished: list[Hypothesis] = []  # the best num_beams so far, best first
        self.generated = 0
        self.improvable = True
        self.done = max_new_tokens <= 0

    # --- transformers' processors, on log-probabilities -----------------------------------------
    def beam_log_probs(self, logits: np.ndarray) -> np.ndarray:
        """The running beams' processed log-probabilities [beams, vocab] from their logits."""
        sampling = self.sampling
        rows = _log_softmax(np.array(logits, dtype=np.float32))
        for row, beam in zip(rows, self.running, strict=True):
            generated = np.asarray(beam.token_ids, dtype=np.int64)
            if self._prompt_distinct is not None:
                seen = np.union1d(self._prompt_distinct, generated)
                values = row[seen]
                penalty = sampling.repetition_penalty
                row[seen] = np.where(values < 0, values * penalty, values / penalty)
            if sampling.uses_openai_penalties and len(generated):
                token_ids, counts = np.unique(generated, return_counts=True)
                row[token_ids] -= counts * sampling.frequency_penalty + sampling.presence_penalty
            if sampling.no_repeat_ngram_size:
                row[_banned_after(np.concatenate([self.prompt, generated]), sampling.no_repeat_ngram_size)] = -np.inf
            if self.generated < sampling.min_new_tokens and len(self.stop_ids):
                row[self.stop_ids] = -np.inf
        if sampling.do_sample:
            _warp(rows, sampling, min_keep=len(self.stop_ids) + 1)
        return rows

    # --- one step --------------------------------------------------------------------------------
    def step(self, logits: np.ndarray) -> list[tuple[int, int]]:
        """Advance by one token: `logits` [running beams, vocab], in the order of `self.running`.

        Returns, for each new running beam, (index of the running beam it continues, its new
        token); an empty list once the search is done (then `hypotheses()` holds the answer).
        """
        if self.done:
            return []
        params, num_beams = self.params, self.params.num_beams
        scores = self.beam_log_probs(logits) + np.array([beam.score for beam in self.running], dtype=np.float32)[:, None]
        vocabulary = scores.shape[-1]
        flat = scores.reshape(-1)
        chosen = self._choose_candidates(flat)
        parents, tokens, candidate_scores = chosen // vocabulary, chosen % vocabulary, flat[chosen].astype(np.float64)

        at_length_limit = self.generated + 1 >= self.max_new_tokens
        ends = np.array([at_length_limit or int(token) in self._stop_set for token in tokens])
        running_scores = candidate_scores + ends * _LOSES
        next_order = np.argsort(-running_scores, kind="stable")[:num_beams]

        length = self.generated + 1
        full = len(self.finished) == num_beams
        if self.improvable and not (full and params.early_stopping is True):
            new = [
                Hypothesis(
                    tuple(self.running[parents[j]].token_ids)
                    + (() if int(tokens[j]) in self._stop_set else (int(tokens[j]),)),
                    int(tokens[j]) in self._stop_set,
                    float(candidate_scores[j]) / (length**params.length_penalty),
                )
                for j in range(min(num_beams, len(chosen)))  # only the best num_beams candidates may finish
                if ends[j]
            ]
            self.finished = sorted(self.finished + new, key=lambda hypothesis: -hypothesis.score)[:num_beams]

        steps = [(int(parents[j]), int(tokens[j])) for j in next_order]
        self.running = [
            Beam(self.running[parent].token_ids + [token], float(running_scores[j]))
            for (parent, token), j in zip(steps, next_order, strict=True)
        ]
        self.generated = length

        if params.early_stopping == "never" and params.length_penalty > 0.0:
            best_length = self.max_new_tokens
        else:
            best_length = length
        best_running = self.running[0].score / (best_length**params.length_penalty)
        worst_finished = self.finished[-1].score if len(self.finished) == num_beams else _LOSES
        self.improvable = self.improvable and best_running > worst_finished
        open_beam = not (len(self.finished) == num_beams and params.early_stopping is True)
        self.done = not (self.improvable and open_beam and not ends.all())
        return [] if self.done else steps

    def _choose_candidates(self, flat: np.ndarray) -> np.ndarray:
        """Indices into the flattened [beams * vocab] scores of this step's candidates, best first."""
        count = min(self.candidates_per_step, flat.size)
        if self.rng is None:
            top = np.argpartition(-flat, count - 1)[:count]
        else:
            finite = np.isfinite(flat)
            weights = np.exp(flat - flat[finite].max(), where=finite, out=np.zeros_like(flat, dtype=np.float64))
            count = min(count, int(np.count_nonzero(weights)))
            top = self.rng.choice(flat.size, size=count, replace=False, p=weights / weights.sum())
        return top[np.argsort(-flat[top], kind="stable")]

    def hypotheses(self) -> list[Hypothesis]:
        """The best `num_return_sequences` finished hypotheses, best first (once `done`)."""
        return self.finished[: self.params.num_return_sequences]
