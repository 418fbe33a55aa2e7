"""Attention over a slot KV cache: the piece that lets rows at different positions share one forward pass.

The continuous-batching engine packs every token it runs in a step into ONE sequence of batch size 1:
first one token per decoding row, then the whole prompt of each row joining the batch. The model's
linear layers (most of the work) see all of them as one matrix. Attention is the only part that has
to know which token belongs to which row; transformers lets a model's attention be swapped by name
(`AttentionInterface`), so `slot_attention` is registered under `SLOT_ATTENTION` and receives the
step's layout (`SlotBatch`) through the forward's keyword arguments.

Each row owns a slot of `SlotKVCache`, a preallocated tensor, and its keys and values sit at their
true positions 0..n-1 there. A decoding row writes its new key and value at its own position and
attends over its slot with a mask that hides everything past its length; a joining row writes its
prompt's keys and values into its slot and attends causally within its prompt, exactly as it would
alone. No row ever sees padding or another row's tokens, which is what keeps greedy output under
batching equal to the output of the same request alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

SLOT_ATTENTION = "parley_slot_attention"
SLOT_BATCH_KWARG = "parley_slot_batch"


class SlotKVCache:
    """Keys and values of every active row: one tensor [layers, 2, slots, kv_heads, capacity, head_dim].

    Rows live in slots 0..n-1 (the engine keeps them contiguous, so decoding attends over a view and
    copies nothing). The capacity in positions grows by doubling up to `max_positions`.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_positions: int = 256,
    ):
        self.max_positions = max_positions
        self._shape = (num_layers, 2, num_slots, num_kv_heads)
        self._head_dim = head_dim
        self._dtype = dtype
        self._device = device
        self.tensor = self._allocate(min(initial_positions, max_positions))

    def _allocate(self, capacity: int) -> torch.Tensor:
        return torch.zeros(*self._shape, capacity, self._head_dim, dtype=self._dtype, device=self._device)

    @property
    def capacity(self) -> int:
        return self.tensor.shape[4]

    def ensure_capacity(self, positions: int) -> None:
        """Make room for `positions` positions per slot (existing contents are kept)."""
        if positions <= self.capacity:
            return
        if positions > self.max_positions:
            raise ValueError(f"{positions} positions exceed the cache's maximum of {self.max_positions}")
        capacity = self.capacity
        while capacity < positions:
            capacity *= 2
        grown = self._allocate(min(capacity, self.max_positions))
        grown[..., : self.capacity, :] = self.tensor
        self.tensor = grown

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target` (all layers at once)."""
        self.tensor[:, :, target, :, :length] = self.tensor[:, :, source, :, :length]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


@dataclass
class SlotBatch:
    """The layout of one packed forward pass.

    The packed sequence holds `num_decoding` tokens first (row i in slot i, at position
    `decode_positions[i]`), then the prompts of joining rows: `prefills[j] = (slot, offset, length)`.
    `decode_mask[i, 0, 0, k]` is True where row i may attend to position k.
    """

    cache: SlotKVCache
    num_decoding: int
    decode_positions: torch.Tensor  # [num_decoding] long
    decode_mask: torch.Tensor | None  # [num_decoding, 1, 1, attended_positions] bool
    prefills: list[tuple[int, int, int]]


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a packed batch of decoding and joining rows; signature of transformers' attention functions.

    `query` is [1, heads, tokens, head_dim], `key`/`value` [1, kv_heads, tokens, head_dim], rotary
    embeddings already applied. Returns [1, tokens, heads, head_dim] like transformers' own functions.
    """
    batch: SlotBatch = kwargs[SLOT_BATCH_KWARG]
    layer_cache = batch.cache.tensor[module.layer_idx]
    key_cache, value_cache = layer_cache[0], layer_cache[1]
    gqa = query.shape[1] != key.shape[1]
    outputs = []

    rows = batch.num_decoding
    if rows:
        slots = torch.arange(rows, device=query.device)
        key_cache[slots, :, batch.decode_positions] = key[0, :, :rows].transpose(0, 1)
        value_cache[slots, :, batch.decode_positions] = value[0, :, :rows].transpose(0, 1)
        attended = batch.decode_mask.shape[-1]
        decode_output = F.scaled_dot_product_attention(
            query[0, :, :rows].transpose(0, 1).unsqueeze(2),  # [rows, heads, 1, head_dim]
            key_cache[:rows, :, :attended],
            value_cache[:rows, :, :attended],
            attn_mask=batch.decode_mask,
            scale=scaling,
            enable_gqa=gqa,
        )
        outputs.append(decode_output.transpose(1, 2).transpose(0, 1))  # [1, rows, heads, head_dim]

    for slot, offset, length in batch.prefills:
        prompt_key = key[:, :, offset : offset + length]
        prompt_value = value[:, :, offset : offset + length]
        key_cache[slot, :, :length] = prompt_key[0]
        value_cache[slot, :, :length] = prompt_value[0]
        prefill_output = F.scaled_dot_product_attention(
            query[:, :, offset : offset + length],
            prompt_key,
            prompt_value,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        outputs.append(prefill_output.transpose(1, 2))  # [1, length, heads, head_dim]

    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], None


def _no_mask(*args, **kwargs):
    """`slot_attention` builds its own masks from the `SlotBatch`, so the model must not build one."""
    return None


def register_slot_attention() -> None:
    """Make `SLOT_ATTENTION` a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(SLOT_ATTENTION, slot_attention)
    AttentionMaskInterface.register(SLOT_ATTENTION, _no_mask)
