"""Parley's native Llama code against transformers on the same folders: same logits, same tokens, same prompts.

`MODEL_CODE=auto` serves Llama-family models with `engines/native_llama.py` and
`backends/native_tokenizer.py`; these tests hold them to transformers' own results on the embedded
SmolLM2 (tied embeddings, grouped-query attention) and on the tests' tiny Llama (untied lm head, a
byte-level tokenizer), and check which code the backend picks and that picking native never imports
transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.model_sources import DEFAULT_MODEL_NAME, file_sha256, resolve_model_source
from services.transformers_lm.backends import ChatMessage, LoadOptions, ModelLoadError
from services.transformers_lm.backends.native_tokenizer import read_native_tokenizer
from services.transformers_lm.backends.transformers_backend import TransformersBackend, converted_gguf_dir
from services.transformers_lm.engines.native_llama import NativeLlama, UnsupportedModelError, read_config
from services.transformers_lm.engines.slot_cache import SlotBatch
from support.servers import REPO_ROOT
from support.tiny_model import tiny_model_dir

TEXTS = [
    "What is the capital of France?",
    "Hello , world . It 's fine , isn 't it ?",
    "Ünïcödé — 東京 🙂 tabs\tand\nnewlines",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
]
MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ],
]


@pytest.fixture(scope="module", params=["embedded", "tiny"])
def model_dir(request):
    if request.param == "tiny":
        return tiny_model_dir()
    source = resolve_model_source(DEFAULT_MODEL_NAME)
    return converted_gguf_dir(source.path, REPO_ROOT / ".cache" / "models", file_sha256(source.path))


def prefill_logits(model: NativeLlama, token_ids: list[int]) -> torch.Tensor:
    """The native model's logits at every position of one prompt run alone."""
    cache = model.new_cache(num_slots=1, max_positions=len(token_ids))
    batch = SlotBatch(cache, 0, torch.zeros(0, dtype=torch.long), None, [(0, 0, 0, len(token_ids))])
    positions = torch.arange(len(token_ids))
    return model.forward(torch.tensor(token_ids), positions, batch, positions)


@pytest.mark.model
def test_native_logits_equal_transformers_logits_on_the_same_weights(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    token_ids = tokenizer.apply_chat_template(MESSAGES[1], tokenize=False, add_generation_prompt=True)
    token_ids = tokenizer(token_ids)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    native = NativeLlama.load(model_dir, torch.float32, torch.device("cpu"))

    with torch.inference_mode():
        expected = reference(torch.tensor([token_ids])).logits[0]
        actual = prefill_logits(native, token_ids)

    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4), (actual - expected).abs().max()
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_the_native_tokenizer_gives_transformers_ids_text_and_chat_prompts(model_dir):
    reference = AutoTokenizer.from_pretrained(str(model_dir))
    native = read_native_tokenizer(model_dir)

    for text in TEXTS:
        ids = reference(text, add_special_tokens=True)["input_ids"]
        assert native.encode(text) == ids
        assert native.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    for messages in MESSAGES:
        assert native.render_chat(messages) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    assert native.eos_token_id == reference.eos_token_id


def test_model_code_auto_runs_a_llama_natively_and_transformers_on_request():
    source = resolve_model_source(str(tiny_model_dir()))
    auto = TransformersBackend().load(source, LoadOptions(device="cpu"))
    forced = TransformersBackend().load(source, LoadOptions(device="cpu", model_code="transformers"))
    try:
        assert (auto.info.model_code, forced.info.model_code) == ("native", "transformers")
        messages = [ChatMessage(**message) for message in MESSAGES[1]]
        assert auto.render_chat(messages) == forced.render_chat(messages)
        assert auto.encode(auto.render_chat(messages)) == forced.encode(forced.render_chat(messages))
    finally:
        auto.close()
        forced.close()


def test_a_model_the_native_code_does_not_compute_runs_on_transformers_or_is_refused_when_native_is_forced(tmp_path):
    folder = tmp_path / "llama-with-biases"
    shutil.copytree(tiny_model_dir(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        read_config(folder)
    source = resolve_model_source(str(folder))

    auto = TransformersBackend().load(source, LoadOptions(device="cpu"))
    try:
        assert auto.info.model_code == "transformers"
    finally:
        auto.close()
    with pytest.raises(ModelLoadError, match="MODEL_CODE=native .*attention_bias"):
        TransformersBackend().load(source, LoadOptions(device="cpu", model_code="native"))


def test_weights_the_native_code_has_no_place_for_send_the_model_to_transformers(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "llama-with-query-norms"
    shutil.copytree(tiny_model_dir(), folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(UnsupportedModelError, match="q_norm"):
        NativeLlama.load(folder, torch.float32, torch.device("cpu"))
    loaded = TransformersBackend().load(resolve_model_source(str(folder)), LoadOptions(device="cpu"))
    try:
        assert loaded.info.model_code == "transformers"
    finally:
        loaded.close()


@pytest.mark.model
def test_loading_the_embedded_model_natively_never_imports_transformers():
    converted_gguf_dir(  # the conversion (done once, cached) is the one step that needs transformers
        resolve_model_source(DEFAULT_MODEL_NAME).path, REPO_ROOT / ".cache" / "models",
        file_sha256(resolve_model_source(DEFAULT_MODEL_NAME).path),
    )
    script = (
        "import sys\n"
        "from services.transformers_lm.app import load_model\n"
        "from services.transformers_lm.settings import Settings\n"
        f"model = load_model(Settings.from_env({{'PRETRAINED_MODEL_NAME_OR_PATH': {DEFAULT_MODEL_NAME!r}, 'BACKEND': 'transformers'}}))\n"
        "print(model.info.model_code, sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
        "model.close()\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split()[:1] == ["native"]
    assert completed.stdout.strip() == "native []"
