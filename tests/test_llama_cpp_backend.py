"""The llama.cpp backend builds the prompts the transformers backend builds, and is chosen for GGUF files.

The chat template comes from the GGUF file and is rendered with jinja2 as transformers renders it;
the tokens come from llama.cpp's vocabulary. Both are compared with transformers' own tokenizer of
the same file.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install installs it)")

from common.model_sources import DEFAULT_MODEL_NAME, resolve_model_source  # noqa: E402
from services.transformers_lm.backends import ChatMessage, LoadOptions, ModelLoadError, default_registry  # noqa: E402
from services.transformers_lm.backends.llama_cpp_backend import LlamaCppBackend  # noqa: E402
from support.tiny_model import tiny_model_dir  # noqa: E402

pytestmark = pytest.mark.model

CONVERSATIONS = [
    [ChatMessage("user", "Which city is the capital of France?")],
    [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "Hi!")],
    [
        ChatMessage("system", "Answer in French."),
        ChatMessage("user", "Hello"),
        ChatMessage("assistant", "Bonjour ! Comment puis-je vous aider ?"),
        ChatMessage("user", "Quelle heure est-il ? Réponds avec des émojis 🙂"),
    ],
]


@pytest.fixture(scope="module")
def llama_model():
    loaded = LlamaCppBackend().load(resolve_model_source(DEFAULT_MODEL_NAME), LoadOptions(threads=1, max_batch_size=2))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from common.model_sources import file_sha256
    from services.transformers_lm.backends.transformers_backend import converted_gguf_dir
    from common.settings_support import REPO_ROOT

    source = resolve_model_source(DEFAULT_MODEL_NAME)
    directory = converted_gguf_dir(source.path, REPO_ROOT / ".cache" / "models", file_sha256(source.path))
    return AutoTokenizer.from_pretrained(str(directory))


def test_auto_serves_a_gguf_file_with_llama_cpp_and_a_model_directory_with_transformers():
    registry = default_registry()

    assert registry.choose("auto", resolve_model_source(DEFAULT_MODEL_NAME)).name == "llama_cpp"
    assert registry.choose("auto", resolve_model_source(str(tiny_model_dir()))).name == "transformers"


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user only", "system and user", "several turns"])
def test_the_prompt_and_its_tokens_equal_the_transformers_tokenizers(llama_model, hf_tokenizer, conversation):
    expected_text = hf_tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation], tokenize=False, add_generation_prompt=True
    )

    text = llama_model.render_chat(conversation)

    assert text == expected_text
    assert llama_model.encode(text) == hf_tokenizer(expected_text, add_special_tokens=True)["input_ids"]


def test_decoding_leaves_special_tokens_out_and_keeps_unicode(llama_model, hf_tokenizer):
    text = "Bonjour ! 🙂 Ça va ?"
    token_ids = llama_model.encode("<|im_start|>assistant\n" + text + "<|im_end|>")

    assert llama_model.decode(token_ids) == hf_tokenizer.decode(token_ids, skip_special_tokens=True) == "assistant\n" + text


def test_model_info_names_the_backend_the_quantisation_and_the_context_per_sequence(llama_model, hf_tokenizer):
    info = llama_model.info

    assert (info.backend, info.device, info.dtype) == ("llama_cpp", "cpu", "gguf Q4_1")  # GGUF_WEIGHTS=file
    assert info.context_length == 2048
    assert hf_tokenizer.convert_tokens_to_ids("<|im_end|>") in info.eos_token_ids


def test_context_length_sets_the_tokens_each_sequence_may_use_up_to_the_models_window():
    source = resolve_model_source(DEFAULT_MODEL_NAME)  # SmolLM2's window: 8192
    for asked, served in ((256, 256), (100_000, 8192)):
        loaded = LlamaCppBackend().load(source, LoadOptions(threads=1, max_batch_size=2, context_length=asked))
        try:
            assert loaded.info.context_length == served
        finally:
            loaded.close()


def test_a_model_directory_is_refused_with_a_one_line_fix():
    with pytest.raises(ModelLoadError, match="loads .gguf files only.*BACKEND=transformers"):
        LlamaCppBackend().load(resolve_model_source(str(tiny_model_dir())), LoadOptions())


# A Q8_0 copy is made and served too, but its kernels quantise activations to 8 bits, as Q4_1's do,
# and the 135M model then answers this question with French nonsense (the test below only runs it).
@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_each_two_byte_copy_is_converted_once_and_answers_the_capital_of_france_with_paris(tmp_path, kind):
    from services.transformers_lm.backends.llama_cpp_backend import converted_copy
    from services.transformers_lm.engines import GenerationRequest, SamplingParams

    source = resolve_model_source(DEFAULT_MODEL_NAME)
    options = LoadOptions(threads=1, max_batch_size=1, cache_dir=tmp_path, gguf_weights=kind)
    loaded = LlamaCppBackend().load(source, options)
    try:
        prompt = loaded.render_chat([ChatMessage("user", "What is the capital of France?")])
        sampling = SamplingParams(max_new_tokens=12, stop_token_ids=loaded.info.eos_token_ids)
        stream = loaded.engine.submit(GenerationRequest(tuple(loaded.encode(prompt)), sampling))
        answer = loaded.decode(stream.collect())
    finally:
        loaded.close()
    copy = converted_copy(source.path, kind, tmp_path)  # the second call finds the cached copy

    assert loaded.info.dtype == f"gguf {kind.upper()}"
    assert "Paris" in answer
    assert [path.name for path in tmp_path.iterdir()] == [copy.name]


def test_the_copies_are_served_as_their_type_and_weigh_what_it_says_against_the_4_bit_file(tmp_path):
    from services.transformers_lm.backends.llama_cpp_backend import converted_copy

    source = resolve_model_source(DEFAULT_MODEL_NAME)
    sizes = {kind: converted_copy(source.path, kind, tmp_path).stat().st_size for kind in ("q8_0", "bf16", "f16")}
    loaded = LlamaCppBackend().load(source, LoadOptions(threads=1, max_batch_size=1, cache_dir=tmp_path, gguf_weights="q8_0"))
    loaded.close()

    assert loaded.info.dtype == "gguf Q8_0"
    assert len(list(tmp_path.iterdir())) == 3  # loading found the copy made above

    assert sizes["bf16"] == pytest.approx(sizes["f16"], rel=0.01)  # both 2 bytes a weight
    assert sizes["q8_0"] < 0.6 * sizes["f16"]  # 8.5 bits a weight
    assert source.path.stat().st_size < sizes["q8_0"]  # the 4-bit file is the smallest


def test_a_copy_llama_cpp_does_not_make_is_refused_naming_the_ones_it_does(tmp_path):
    from services.transformers_lm.backends.llama_cpp_backend import converted_copy

    with pytest.raises(ModelLoadError, match="GGUF_WEIGHTS=q2_k.*q8_0, bf16, f16 or file"):
        converted_copy(resolve_model_source(DEFAULT_MODEL_NAME).path, "q2_k", tmp_path)


def test_auto_weights_are_the_bf16_copy_for_the_embedded_model_and_the_file_itself_otherwise():
    from services.transformers_lm.backends.llama_cpp_backend import weights_to_run

    assert weights_to_run(DEFAULT_MODEL_NAME, "auto") == "bf16"
    assert weights_to_run("/models/llama-3-8b.Q4_K_M.gguf", "auto") == "file"
    assert weights_to_run(DEFAULT_MODEL_NAME, "file") == "file"
    assert weights_to_run(DEFAULT_MODEL_NAME, "q8_0") == "q8_0"
