"""The slot KV cache and packed attention: what lets rows at different positions share one forward pass.

The continuous-batching engine packs every token it runs in a step into ONE sequence: first one
token for every decoding row, then the whole prompt of each row joining the batch. A model's linear
layers (most of the work) see all of them as one matrix. Attention is the only part that has to
know which token belongs to which row: `packed_attention` does it from the step's layout
(`SlotBatch`), for every model the engine runs (plain-torch Llama in `native_llama.py`, any
transformers model through `slot_attention.py`).

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
    `decode_positions[i]`), then the prompts of joining rows: `prefills[j] = (slot, offset, start,
    length)`, the prompt's positions start..start+length-1 at offset..offset+length-1 of the packed
    sequence (positions before `start` came from the prefix cache and are in the slot already).
    `decode_mask[i, 0, 0, k]` is True where row i may attend to position k.
    """

    cache: SlotKVCache
    num_decoding: int
    decode_positions: torch.Tensor  # [num_decoding] long
    decode_mask: torch.Tensor | None  # [num_decoding, 1, 1, attended_positions] bool
    prefills: list[tuple[int, int, int, int]]


def packed_attention(
    batch: SlotBatch, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of one layer over the slot cache: query [tokens, heads, d], key/value [tokens, kv_heads, d].

    Writes the step's keys and values into the rows' slots, then attends: decoding rows over their
    slot up to their position, joining rows causally within their prompt. Returns [tokens, heads, d].
    """
    layer_cache = batch.cache.tensor[layer]
    key_cache, value_cache = layer_cache[0], layer_cache[1]
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    rows = batch.num_decoding
    if rows:
        slots = torch.arange(rows, device=query.device)
        key_cache[slots, :, batch.decode_positions] = key[:rows]
        value_cache[slots, :, batch.decode_positions] = value[:rows]
        attended = batch.decode_mask.shape[-1]
        decode_output = F.scaled_dot_product_attention(
            query[:rows].unsqueeze(2),  # [rows, heads, 1, d]
            key_cache[:rows, :, :attended],
            value_cache[:rows, :, :attended],
            attn_mask=batch.decode_mask,
            scale=scaling,
            enable_gqa=gqa,
        )
        outputs.append(decode_output.squeeze(2))  # [rows, heads, d]
    for slot, offset, start, length in batch.prefills:
        prompt_key = key[offset : offset + length].transpose(0, 1)  # [kv_heads, length, d]
        prompt_value = value[offset : offset + length].transpose(0, 1)
        key_cache[slot, :, start : start + length] = prompt_key
        value_cache[slot, :, start : start + length] = prompt_value
        prompt_query = query[offset : offset + length].transpose(0, 1).unsqueeze(0)
        if start == 0:  # the whole prompt is in this step: plain causal attention within it
            prefill_output = F.scaled_dot_product_attention(
                prompt_query, prompt_key.unsqueeze(0), prompt_value.unsqueeze(0), is_causal=True, scale=scaling, enable_gqa=gqa
            )
        else:  # its beginning came from the prefix cache: attend over the slot, causally from `start`
            key_positions = torch.arange(start + length, device=query.device)
            query_positions = torch.arange(start, start + length, device=query.device)
            prefill_output = F.scaled_dot_product_attention(
                prompt_query,
                key_cache[slot, :, : start + length].unsqueeze(0),
                value_cache[slot, :, : start + length].unsqueeze(0),
                attn_mask=key_positions[None, :] <= query_positions[:, None],
                scale=scaling,
                enable_gqa=gqa,
            )
        outputs.append(prefill_output[0].transpose(0, 1))  # [length, heads, d]
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
