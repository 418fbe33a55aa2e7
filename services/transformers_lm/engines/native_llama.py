"""Llama-family decoders in plain torch, read straight from a model folder: the fast path of the transformers backend.

Why not transformers' own modelling code for these models? Two measured costs on a 2-core CPU:
- start-up: importing transformers' modelling stack takes about 4 s on top of torch's 1.5-2.5 s,
  most of the service's time to ready (the weights of a 135M model load in a fraction of a second);
- every step: the generic layers spend about a quarter of a 16-row decode step outside the big
  matrix products (per-layer dispatch, masks, cache plumbing, separate q/k/v and gate/up products).
This module reads `config.json` and the safetensors weights itself, fuses q/k/v and gate/up into one
product each, and runs the packed continuous-batching step (`SlotBatch`) directly. It does the
architectures it can prove it computes exactly (`supports`): anything else — other architectures,
RoPE scaling, biases — is run by transformers as before. `tests/test_native_llama.py` checks its
logits against transformers' on the same weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.transformers_lm.engines.slot_cache import SlotBatch, SlotKVCache, packed_attention

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class UnsupportedModelError(ValueError):
    """The folder holds a model this module does not compute (the backend then uses transformers)."""


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    tie_word_embeddings: bool

    @classmethod
    def from_json(cls, raw: dict) -> "LlamaConfig":
        """The config of a supported model; UnsupportedModelError naming what is not supported."""
        architectures = raw.get("architectures") or []
        if not architectures or architectures[0] not in ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {architectures[:1]} is not one of {', '.join(ARCHITECTURES)}")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise UnsupportedModelError(f"{flag} is set")
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {raw.get('hidden_act')!r} is not silu")
        if raw.get("sliding_window"):
            raise UnsupportedModelError("sliding-window attention")
        if raw.get("pretraining_tp", 1) != 1:
            raise UnsupportedModelError("pretraining_tp is not 1")
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling")
        rope_type = rope.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
        if rope_type != "default":
            raise UnsupportedModelError(f"RoPE type {rope_type!r}")
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0),
            max_positions=int(raw.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )


def read_config(directory: Path) -> LlamaConfig:
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise UnsupportedModelError(f"no readable config.json: {error}") from None
    return LlamaConfig.from_json(raw)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [path.name for path in sorted(directory.glob("*.safetensors"))]
    if not files:
        raise UnsupportedModelError("no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(directory / name)))
    return weights


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + k + v outputs, hidden]: one product for all three
    output: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: one product for both
    down: torch.Tensor


class NativeLlama:
    """A Llama decoder for the continuous-batching engine: `forward(token_ids, positions, batch, logit_indices)`."""

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
        self.config = config
        self.dtype = dtype
        self.device = device

        def take(name: str) -> torch.Tensor:
            try:
                tensor = weights.pop(name)
            except KeyError:
                raise UnsupportedModelError(f"the weights have no {name}") from None
            return tensor.to(device=device, dtype=dtype)

        self.embed = take("model.embed_tokens.weight")
        self.layers = []
        for index in range(config.num_layers):
            prefix = f"model.layers.{index}."
            attention, mlp = prefix + "self_attn.", prefix + "mlp."
            self.layers.append(
                _Layer(
                    input_norm=take(prefix + "input_layernorm.weight"),
                    qkv=torch.cat([take(attention + f"{p}_proj.weight") for p in "qkv"]).contiguous(),
                    output=take(attention + "o_proj.weight"),
                    post_norm=take(prefix + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]).contiguous(),
                    down=take(mlp + "down_proj.weight"),
                )
            )
        self.norm = take("model.norm.weight")
        lm_head = weights.pop("lm_head.weight", None)
        self.lm_head = self.embed if config.tie_word_embeddings or lm_head is None else lm_head.to(device=device, dtype=dtype)
        # Weights this code has no place for mean a variant it does not compute (extra norms, biases).
        unknown = sorted(name for name in weights if not name.endswith("rotary_emb.inv_freq"))
        if unknown:
            raise UnsupportedModelError(f"weights it does not know: {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
        half = config.head_dim // 2
        self._inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.int64).float() * 2 / config.head_dim))
        self._q_size = config.num_heads * config.head_dim
        self._kv_size = config.num_kv_heads * config.head_dim
        self._scaling = 1.0 / math.sqrt(config.head_dim)

    @classmethod
    def load(cls, directory: Path, dtype: torch.dtype, device: torch.device) -> "NativeLlama":
        return cls(read_config(directory), read_weights(directory), dtype, device)

    # --- what the engine reads -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_positions(self) -> int:
        return self.config.max_positions

    def new_cache(self, num_slots: int, max_positions: int) -> SlotKVCache:
        return SlotKVCache(
            num_layers=self.config.num_layers,
            num_slots=num_slots,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            max_positions=max_positions,
            dtype=self.dtype,
            device=self.device,
        )

    # --- the computation ---------------------------------------------------------------------------
    def _rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:  # one fused kernel; bit-identical to the float32 formula below
            return F.rms_norm(hidden, (hidden.shape[-1],), weight, self.config.rms_norm_eps)
        # In float32 and cast back before the weight, as transformers' LlamaRMSNorm does.
        as_float = hidden.float()
        normed = as_float * torch.rsqrt(as_float.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * normed.to(hidden.dtype)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self._inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, batch: SlotBatch, logit_indices: torch.Tensor
    ) -> torch.Tensor:
        """The logits [len(logit_indices), vocab] of one packed step (see `SlotBatch` for the layout)."""
        config = self.config
        tokens = token_ids.shape[0]
        cos, sin = self._rotary(positions)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [tokens, 1, head_dim]: broadcast over heads
        hidden = F.embedding(token_ids, self.embed)
        rotated_heads = config.num_heads + config.num_kv_heads  # queries and keys: rotated together
        for index, layer in enumerate(self.layers):
            qkv = F.linear(self._rms_norm(hidden, layer.input_norm), layer.qkv).view(tokens, -1, config.head_dim)
            query_key = self._rotate(qkv[:, :rotated_heads], cos, sin)
            query, key = query_key.split((config.num_heads, config.num_kv_heads), dim=1)
            value = qkv[:, rotated_heads:]
            attended = packed_attention(batch, index, query, key, value, self._scaling)
            hidden = hidden + F.linear(attended.reshape(tokens, self._q_size), layer.output)
            gate, up = F.linear(self._rms_norm(hidden, layer.post_norm), layer.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, layer.down)
        last = self._rms_norm(hidden.index_select(0, logit_indices), self.norm)
        return F.linear(last, self.lm_head).float()

