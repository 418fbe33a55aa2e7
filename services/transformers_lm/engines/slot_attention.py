"""Slot attention for any transformers model: `packed_attention` behind transformers' attention interface.

transformers lets a model's attention be swapped by name (`AttentionInterface`), so `slot_attention`
is registered under `SLOT_ATTENTION` and receives the step's layout (`SlotBatch`) through the
forward's keyword arguments. `TransformersPackedModel` gives such a model the engine's packed-step
interface. Models that `native_llama.py` computes itself do not need this module (nor transformers).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from services.transformers_lm.engines.slot_cache import SlotBatch, SlotKVCache, packed_attention

SLOT_ATTENTION = "parley_slot_attention"
SLOT_BATCH_KWARG = "parley_slot_batch"


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature over `packed_attention`.

    `query` is [1, heads, tokens, head_dim], `key`/`value` [1, kv_heads, tokens, head_dim], rotary
    embeddings already applied. Returns [1, tokens, heads, head_dim] like transformers' own functions.
    """
    batch: SlotBatch = kwargs[SLOT_BATCH_KWARG]
    output = packed_attention(
        batch, module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scaling
    )
    return output.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    """`slot_attention` builds its own masks from the `SlotBatch`, so the model must not build one."""
    return None


def register_slot_attention() -> None:
    """Make `SLOT_ATTENTION` a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(SLOT_ATTENTION, slot_attention)
    AttentionMaskInterface.register(SLOT_ATTENTION, _no_mask)


class TransformersPackedModel:
    """A transformers causal LM with the engine's packed-step interface (its attention switched to slots).

    The model is taken over: plain `generate` would fail on it afterwards.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        register_slot_attention()
        model.set_attn_implementation(SLOT_ATTENTION)
        self.config = model.config.get_text_config()
        parameter = next(model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        self.vocab_size = int(self.config.vocab_size)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 4096)

    def new_cache(self, num_slots: int, max_positions: int) -> SlotKVCache:
        config = self.config
        return SlotKVCache(
            num_layers=config.num_hidden_layers,
            num_slots=num_slots,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            max_positions=max_positions,
            dtype=self.dtype,
            device=self.device,
        )

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, batch: SlotBatch, logit_indices: torch.Tensor
    ) -> torch.Tensor:
        output = self.model(
            input_ids=token_ids[None, :],
            position_ids=positions[None, :],
            use_cache=False,
            logits_to_keep=logit_indices,
            **{SLOT_BATCH_KWARG: batch},
        )
        return output.logits[0].float()
