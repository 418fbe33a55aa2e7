"""Memory: what an LLM service needs (weights + KV cache + runtime), sizes as cards write them, and what this machine has.

An LLM service holds its weights, a KV cache for every batch slot at the card's context length,
and a runtime (Python, gunicorn, the engine's buffers). Per backend:

- llama_cpp: the weights it runs (the GGUF as it is, or a copy: Q8_0 34 bytes per 32 parameters,
  BF16 and F16 2 bytes per parameter) are
  mapped whole; the KV cache is allocated up front at start, F16 keys and values for
  `batch_slots × context_length` positions (llama.cpp's default cache type).
- transformers: the weights in float32 (bfloat16 / float16 with half precision), whatever the file
  stored; the KV cache in the same dtype grows as sequences do, up to `batch_slots ×
  context_length` positions, plus the 64 MiB prefix cache.

The runtime overheads are measured, not guessed: the embedded SmolLM2 served by
services/transformers_lm on llama_cpp with 16 slots × 2048 tokens had a resident set (gunicorn's
master and worker) of 1304 MiB once ready and 1339 MiB after 16 concurrent requests: 977 MiB of
weights and KV cache, so 362 MiB of runtime; 512 MiB leaves room for a batch's buffers. The
transformers runtime (768 MiB: torch, the tokenizer, the engine's step buffers) is an allowance,
not measured under full load (a 16-request batch did not finish in 15 minutes on the shared 2-core
machine); its KV cache grows as sequences do, so the estimate, which counts it full, bounds it from
above. tests/test_model_names_and_render.py checks that both services stay within their estimate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from common.model_facts import ModelFacts

KIB, MIB, GIB = 2**10, 2**20, 2**30
# The service's resident memory beyond weights and KV cache, per backend (see the docstring).
RUNTIME_OVERHEAD = {"llama_cpp": 512 * MIB, "transformers": 768 * MIB}
PREFIX_CACHE_BYTES = 64 * MIB  # the transformers engine's prefix cache (engines/prefix_cache.py)
# What llama_cpp serves per sequence when a card sets no context_length (its LlamaCppEngineConfig default).
LLAMA_CPP_DEFAULT_CONTEXT = 2048
DEFAULT_BATCH_SLOTS = 16  # the service's MAX_BATCH_SIZE default
# The size of each copy GGUF_WEIGHTS may ask llama.cpp to run (common.model_sources.LLAMA_CPP_COPIES):
# Q8_0 keeps 32 weights as 32 bytes and one F16 scale.
LLAMA_CPP_COPY_BYTES_PER_PARAMETER = {"q8_0": 34 / 32, "bf16": 2, "f16": 2}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT])?i?B?$", re.IGNORECASE)
_UNITS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 2**40}


class SizeError(ValueError):
    pass


def parse_size(text: str | int | float) -> int:
    """Bytes of a size as cards and compose write it: 512M, 1.5G, 2g, 1073741824."""
    if isinstance(text, (int, float)):
        return int(text)
    match = _SIZE.match(str(text).strip())
    if not match:
        raise SizeError(f"{text!r} is not a size such as 512M or 1.5G")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def format_size(size: int) -> str:
    """A size for people: 1.4 GiB, 720 MiB, 22.5 KiB."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if size >= unit:
            value = size / unit
            return f"{value:.1f} {name}" if value < 10 and unit != MIB else f"{value:.0f} {name}"
    return f"{size} B"


def ram_usage_text(size: int) -> str:
    """A card's `ram_usage` that holds `size`: the next multiple of 64 MiB, in M (a whole number of
    MiB, so Compose's byte count and a stack file's size stay exact); from 16 GiB, the next whole G."""
    if size >= 16 * GIB:
        return f"{math.ceil(size / GIB)}G"
    return f"{math.ceil(size / (64 * MIB)) * 64}M"


@dataclass(frozen=True)
class MemoryEstimate:
    """An LLM service's memory need, in bytes, by part."""

    backend: str
    weights: int
    kv_cache: int
    runtime: int
    context_length: int | None
    batch_slots: int
    kv_bytes_per_token: int | None  # None: the files give no layer / head dimensions

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime

    def explain(self) -> str:
        if self.kv_bytes_per_token is None or self.context_length is None:
            kv = "KV cache unknown (the model's files give no layer and head dimensions)"
        else:
            kv = (
                f"KV cache {format_size(self.kv_cache)} ({self.batch_slots} slots × {self.context_length} tokens × "
                f"{format_size(self.kv_bytes_per_token)})"
            )
        return f"{format_size(self.total)} on {self.backend}: weights {format_size(self.weights)} + {kv} + runtime {format_size(self.runtime)}"


def resolve_backend(backend: str, is_gguf: bool) -> str:
    """The backend a service runs under BACKEND=`backend`: auto serves a .gguf on llama_cpp (installed
    by `make install` and in the image), anything else on transformers."""
    if backend != "auto":
        return backend
    return "llama_cpp" if is_gguf else "transformers"


def served_context(backend: str, context_length: int | None, window: int | None) -> int | None:
    """The tokens per sequence a service serves: the card's context_length, at most the window;
    unset, the window (llama_cpp: 2048)."""
    if context_length is None:
        context_length = LLAMA_CPP_DEFAULT_CONTEXT if backend == "llama_cpp" else window
    if context_length is None:
        return None
    return min(context_length, window) if window else context_length


def estimate_llm_memory(
    facts: ModelFacts,
    *,
    backend: str,
    context_length: int | None,
    batch_slots: int = DEFAULT_BATCH_SLOTS,
    half_precision: bool = False,
    gguf_weights: str = "file",
) -> MemoryEstimate | None:
    """The need of a service of this model; None when its files say nothing of the weights' size."""
    context = served_context(backend, context_length, facts.context_window)
    if backend == "llama_cpp":
        element = 2  # llama.cpp's default KV cache type is F16
        per_parameter = LLAMA_CPP_COPY_BYTES_PER_PARAMETER.get(gguf_weights)
        weights = int(facts.parameter_count * per_parameter) if per_parameter and facts.parameter_count else facts.file_size
        extra = 0
    else:
        element = 2 if half_precision else 4
        if facts.parameter_count:
            weights = facts.parameter_count * element
        else:  # a checkpoint without safetensors headers: as stored, scaled to the dtype it loads in
            weights = int(facts.file_size * element / (facts.weights_dtype_bytes or element))
        extra = PREFIX_CACHE_BYTES
    if not weights:
        return None
    kv_bytes = facts.kv_bytes_per_token(element)
    kv_cache = kv_bytes * context * batch_slots if kv_bytes is not None and context is not None else 0
    return MemoryEstimate(
        backend=backend,
        weights=weights,
        kv_cache=kv_cache,
        runtime=RUNTIME_OVERHEAD.get(backend, RUNTIME_OVERHEAD["transformers"]) + extra,
        context_length=context,
        batch_slots=batch_slots,
        kv_bytes_per_token=kv_bytes,
    )


# --- what this machine has -----------------------------------------------------------------------


@dataclass(frozen=True)
class AvailableMemory:
    bytes: int
    source: str  # where the figure comes from, for the message


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def available_memory(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> AvailableMemory | None:
    """What new processes may still use: MemAvailable, lowered to the cgroup's limit minus its usage."""
    found: list[AvailableMemory] = []
    meminfo = _read(proc / "meminfo") or ""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            found.append(AvailableMemory(int(line.split()[1]) * KIB, "MemAvailable in /proc/meminfo"))
    for line in (_read(proc / "self" / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0":  # cgroup v2: memory.max and memory.current
            folder = cgroup_root / parts[2].lstrip("/")
            limit, current = _read(folder / "memory.max"), _read(folder / "memory.current")
            if limit and current and limit.strip().isdigit() and current.strip().isdigit():
                found.append(AvailableMemory(int(limit) - int(current), f"the cgroup limit {format_size(int(limit))} minus its use"))
    return min(found, key=lambda item: item.bytes) if found else None
