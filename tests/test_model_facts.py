"""What a model's own files say (common/model_facts.py), read without loading it, checked against the
libraries that do load it: llama.cpp for the embedded GGUF, transformers for the tiny model folder.
And the cache of digests and facts (parley/model_files.py) that keeps `parley check` fast.

Tier: files on disk and the real libraries in-process; no server. The cache tests count hashing
calls (the cache's own logic); the digests themselves are compared with hashlib's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from common.model_facts import ModelFactsError, read_model_facts
from common.model_sources import DEFAULT_MODEL_NAME, embedded_model_path
from parley import model_files
from parley.memory import estimate_llm_memory, parse_size, ram_usage_text

EMBEDDED = embedded_model_path(DEFAULT_MODEL_NAME)


def test_the_embedded_gguf_facts_are_what_llama_cpp_reads_from_it():
    from services.transformers_lm.engines.llama_cpp_model import LlamaCppModel

    facts = read_model_facts(EMBEDDED)

    model = LlamaCppModel.load(EMBEDDED)
    try:
        llama = model.llama_cpp
        assert facts.context_window == llama.llama_model_n_ctx_train(model.pointer) == 8192
        assert facts.parameter_count == llama.llama_model_n_params(model.pointer)
        assert facts.layers == llama.llama_model_n_layer(model.pointer) == 30
        assert facts.kv_heads == llama.llama_model_n_head_kv(model.pointer) == 3
        assert facts.head_dim == llama.llama_model_n_embd(model.pointer) // llama.llama_model_n_head(model.pointer) == 64
        assert facts.eos_tokens == (model.token_text(llama.llama_vocab_eos(model.vocab)),) == ("<|im_end|>",)
        assert facts.quantization == model.quantization() == "Q4_1"
        assert facts.chat_template == model.metadata.chat_template
    finally:
        model.close()
    assert facts.file_size == EMBEDDED.stat().st_size


def test_a_model_folders_facts_are_what_transformers_reads_from_it(tiny_model_path: Path):
    from transformers import AutoConfig, AutoTokenizer

    facts = read_model_facts(tiny_model_path)

    config = AutoConfig.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert facts.format == "transformers" and facts.architecture == "llama"
    assert facts.context_window == config.max_position_embeddings
    assert (facts.layers, facts.kv_heads, facts.head_dim) == (2, 2, config.hidden_size // config.num_attention_heads)
    assert facts.eos_tokens == (tokenizer.eos_token,) and facts.eos_token_ids == (tokenizer.eos_token_id,)
    assert facts.chat_template == tokenizer.chat_template
    assert facts.quantization == "F32"


def test_the_eos_set_joins_the_tokenizer_generation_config_and_config_eos(tiny_model_path: Path, tmp_path: Path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    # a fine-tune that ends turns with <|im_start|> too, named only in generation_config.json
    (folder / "generation_config.json").write_text('{"eos_token_id": [1, 2]}')

    facts = read_model_facts(folder)

    assert facts.eos_tokens == ("<|im_end|>", "<|im_start|>")
    assert facts.eos_token_ids == (1, 2)


def test_a_file_that_is_not_a_model_is_refused_with_what_is_wrong(tmp_path: Path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(EMBEDDED.read_bytes()[:4096])
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")

    with pytest.raises(ModelFactsError, match="ends early"):
        read_model_facts(truncated)
    with pytest.raises(ModelFactsError, match="not a GGUF file"):
        read_model_facts(not_gguf)
    with pytest.raises(ModelFactsError, match="no config.json"):
        read_model_facts(tmp_path)


# --- the cache --------------------------------------------------------------------------------


@pytest.fixture
def counted_hashing(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    hashed: list[Path] = []
    real = model_files.file_sha256

    def counting(path: Path) -> str:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(model_files, "file_sha256", counting)
    return hashed


def test_a_file_is_hashed_once_while_its_size_and_mtime_stay(tmp_path: Path, counted_hashing: list[Path]):
    copy = tmp_path / "copy.gguf"
    shutil.copy2(EMBEDDED, copy)

    first = model_files.ModelFileCache(tmp_path / "cache").inspect(copy)
    again = model_files.ModelFileCache(tmp_path / "cache").inspect(copy)  # a new process, the same cache file

    assert first.sha256 == again.sha256 == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert again.facts == first.facts
    assert counted_hashing == [copy]


def test_a_changed_file_is_hashed_again(tmp_path: Path, counted_hashing: list[Path]):
    copy = tmp_path / "copy.gguf"
    shutil.copy2(EMBEDDED, copy)
    cache = model_files.ModelFileCache(tmp_path / "cache")
    before = cache.inspect(copy)

    with open(copy, "r+b") as stream:  # same size, other bytes, a later mtime
        stream.seek(-1, os.SEEK_END)
        last = stream.read(1)
        stream.seek(-1, os.SEEK_END)
        stream.write(bytes([last[0] ^ 1]))
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 1_000_000_000))
    after = cache.inspect(copy)

    assert after.sha256 != before.sha256
    assert len(counted_hashing) == 2


def test_a_folder_is_pinned_by_its_one_weights_file(tiny_model_path: Path, tmp_path: Path):
    inspected = model_files.ModelFileCache(tmp_path / "cache").inspect(tiny_model_path)

    assert inspected.sha256 == hashlib.sha256((tiny_model_path / "model.safetensors").read_bytes()).hexdigest()


# --- the memory estimate ------------------------------------------------------------------------


def test_the_estimate_is_weights_plus_the_kv_cache_of_every_slot_plus_runtime():
    facts = read_model_facts(EMBEDDED)

    on_llama_cpp = estimate_llm_memory(facts, backend="llama_cpp", context_length=2048, batch_slots=16, gguf_weights="f16")
    on_transformers = estimate_llm_memory(facts, backend="transformers", context_length=2048, batch_slots=16)

    per_token_f16 = 2 * 30 * 3 * 64 * 2  # keys and values, 30 layers, 3 KV heads of 64, 2 bytes
    assert on_llama_cpp.weights == facts.parameter_count * 2
    assert on_llama_cpp.kv_cache == per_token_f16 * 2048 * 16
    assert on_transformers.weights == facts.parameter_count * 4  # float32
    assert on_transformers.kv_cache == 2 * per_token_f16 * 2048 * 16
    quantised = estimate_llm_memory(facts, backend="llama_cpp", context_length=2048, batch_slots=16, gguf_weights="file")
    assert quantised.weights == facts.file_size
    bf16 = estimate_llm_memory(facts, backend="llama_cpp", context_length=2048, batch_slots=16, gguf_weights="bf16")
    q8_0 = estimate_llm_memory(facts, backend="llama_cpp", context_length=2048, batch_slots=16, gguf_weights="q8_0")
    assert bf16.weights == on_llama_cpp.weights
    assert q8_0.weights == facts.parameter_count * 34 // 32  # 32 bytes and an F16 scale per 32 weights
    longer = estimate_llm_memory(facts, backend="llama_cpp", context_length=100_000, batch_slots=1, gguf_weights="f16")
    assert longer.context_length == 8192  # never above the window


@pytest.mark.parametrize("size, text", [(400 * 2**20, "448M"), (2**30, "1024M"), (int(1.33 * 2**30), "1408M"), (20 * 2**30 + 1, "21G")])
def test_a_ram_usage_is_rounded_up_so_it_holds_the_estimate(size: int, text: str):
    assert ram_usage_text(size) == text
    assert parse_size(text) >= size
