"""Keys and values of recent prompts, kept so that a prompt that starts the same way is not computed again.

Chat prompts share long beginnings: the template's system prompt and role markers for every
request, the whole earlier dialog for the next turn of a dialog. Under continuous batching,
computing a joining row's prompt ("prefill") is about half the work of a 32-token answer on the
embedded model, most of it on tokens some earlier prompt already had. The engine looks a joining
prompt up here, copies the longest cached beginning into the row's slot and computes only the
rest; after a prefill it stores the prompt's keys and values. Memory is bounded in bytes, the least
recently used prompts go first.

A token's key and value depend only on the tokens before it, so a cached beginning holds exactly
what computing it again would give (up to the last bits of the matrix products, as with any change
of batch shape); the greedy-equality tests run with the cache on.
"""

from __future__ import annotations

import collections

import torch

from services.transformers_lm.engines import common_prefix_length

DEFAULT_BUDGET_BYTES = 64 * 1024 * 1024


class PrefixCache:
    """Prompts' keys and values ([layers, 2, kv_heads, length, head_dim] each), least recently used out first."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._entries: collections.OrderedDict[tuple[int, ...], torch.Tensor] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: tuple[int, ...]) -> bool:
        return prompt in self._entries

    def longest_prefix(self, prompt: tuple[int, ...]) -> tuple[int, torch.Tensor | None]:
        """(n, kv): the first n tokens of `prompt` are cached in kv; n < len(prompt), so the last
        token is always computed (its logits choose the first new token). (0, None) when none is."""
        best_length, best_prompt = 0, None
        for cached in self._entries:
            length = common_prefix_length(cached, prompt)
            if length > best_length:
                best_length, best_prompt = length, cached
        if best_prompt is None:
            return 0, None
        self._entries.move_to_end(best_prompt)
        return min(best_length, len(prompt) - 1), self._entries[best_prompt]

    def add(self, prompt: tuple[int, ...], kv: torch.Tensor) -> None:
        """Keep `kv` (the prompt's keys and values, a tensor of its own) unless it alone exceeds the budget."""
        size = kv.numel() * kv.element_size()
        if size > self.budget_bytes or prompt in self._entries:
            return
        self._entries[prompt] = kv
        self.nbytes += size
        while self.nbytes > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.numel() * evicted.element_size()
