"""The llama.cpp backend: GGUF files served by llama.cpp (llama-cpp-python), batched by `LlamaCppEngine`.

It reads the GGUF natively, so under `BACKEND=auto` a `.gguf` source comes here whenever
llama-cpp-python is installed. Tokens, the chat template and the EOS ids all come from the GGUF
file itself, so prompts are built as the transformers backend builds them for the same model.
Importing this module does not import llama_cpp; `is_available()` only looks for it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from pathlib import Path

from common.model_sources import LLAMA_CPP_COPIES, ModelSource, SourceKind, file_sha256, gguf_weights_to_run
from services.transformers_lm.backends import (
    Backend,
    ChatMessage,
    LoadedModel,
    LoadOptions,
    ModelInfo,
    ModelLoadError,
    check_sha256_pin,
)
from services.transformers_lm.backends.chat_template import ChatTemplateError, render_chat_template, template_takes_tools
from services.transformers_lm.engines.grammar import GrammarTokenizer
from services.transformers_lm.engines.llama_cpp_engine import LlamaCppEngine, LlamaCppEngineConfig, default_threads
from services.transformers_lm.engines.llama_cpp_model import LlamaCppModel, LlamaCppUnavailableError, import_llama_cpp

logger = logging.getLogger(__name__)

# Each copy GGUF_WEIGHTS may ask for (common.model_sources.LLAMA_CPP_COPIES), as llama.cpp's
# quantiser names its file type.
COPY_FILE_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "f16": "LLAMA_FTYPE_MOSTLY_F16"}
assert set(COPY_FILE_TYPES) == set(LLAMA_CPP_COPIES)


def weights_to_run(requested: str, gguf_weights: str) -> str:
    """What llama.cpp runs for a source: "file" (the GGUF's own quantisation) or a cached copy
    (q8_0, bf16, f16); GGUF_WEIGHTS=auto means the embedded model's choice
    (common.model_sources.EmbeddedModel.llama_cpp_weights), else the file."""
    return gguf_weights_to_run(requested, gguf_weights)


class LlamaCppLoadedModel(LoadedModel):
    """A GGUF model on llama.cpp: its vocabulary for text <-> ids, its template, its batching engine."""

    def __init__(self, model: LlamaCppModel, engine: LlamaCppEngine, info: ModelInfo):
        self.model = model
        self.engine = engine
        self.info = info

    def encode(self, text: str) -> list[int]:
        # Special tokens written by the chat template (<|im_start|>) are parsed as such, as
        # transformers' tokenizers do; BOS is added only where the GGUF says the model wants it.
        return self.model.tokenize(text, add_special=True, parse_special=True)

    def decode(self, token_ids: list[int], skip_special: bool = True) -> str:
        return self.model.detokenize(token_ids, skip_special=skip_special)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.model.metadata.chat_template)

    @property
    def chat_template_takes_tools(self) -> bool:
        return template_takes_tools(self.model.metadata.chat_template)

    def render_chat(self, messages: list[ChatMessage], tools: list[dict] | None = None) -> str:
        metadata = self.model.metadata
        if not metadata.chat_template:
            raise ChatTemplateError("this GGUF file has no chat template (tokenizer.chat_template)")
        return render_chat_template(
            metadata.chat_template,
            [message.template_message() for message in messages],
            bos_token=metadata.bos_token,
            eos_token=metadata.eos_token,
            tools=tools,
        )

    def make_grammar_tokenizer(self) -> GrammarTokenizer:
        """llguidance reads the vocabulary from llama.cpp itself (the same tokens the engine samples)."""
        from llguidance.llamacpp import lltokenizer_from_vocab

        tokenizer = lltokenizer_from_vocab(
            self.model.vocab, n_vocab=self.model.n_vocab, eos_token=list(self.info.eos_token_ids)
        )
        return GrammarTokenizer(tokenizer, self.model.n_vocab)

    def close(self) -> None:
        self.engine.close()
        self.model.close()


def eos_token_ids_and_stop_sequences(model: LlamaCppModel, additional_eos_tokens: tuple[str, ...]):
    """The GGUF's end-of-generation ids plus ADDITIONAL_EOS_TOKENS: ids when one token, else text."""
    ids = set(model.end_of_generation_token_ids())
    stop_sequences: list[str] = []
    for text in additional_eos_tokens:
        token_ids = model.tokenize(text, add_special=False, parse_special=True)
        if len(token_ids) == 1:
            ids.add(token_ids[0])
        else:
            stop_sequences.append(text)
    return tuple(sorted(ids)), tuple(stop_sequences)


def converted_copy(gguf_path: Path, kind: str, cache_dir: Path, sha256: str | None = None) -> Path:
    """The GGUF converted once by llama.cpp's own quantiser to `kind` (q8_0, bf16 or f16: GGUF_WEIGHTS),
    cached by the source file's sha256, so every later start maps the copy at once.

    llama.cpp's kernels for 4-bit blocks also quantise activations to 8 bits; a small model can lose
    its answers to that, and a copy computes with (nearly) the dequantised weights instead: F16 is the
    file dequantised, BF16 runs on AVX512_BF16 dot products, Q8_0 on 8-bit (VNNI) ones.
    """
    if kind not in COPY_FILE_TYPES:
        raise ModelLoadError(f"GGUF_WEIGHTS={kind} is not a copy llama.cpp makes here: use one of {', '.join(COPY_FILE_TYPES)} or file")
    target = cache_dir / f"gguf-{kind}-{(sha256 or file_sha256(gguf_path))[:32]}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    llama_cpp = import_llama_cpp()
    staging = target.with_name(f"{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, COPY_FILE_TYPES[kind])
    params.allow_requantize = True
    params.nthread = default_threads()
    logger.info("converting %s to %s for llama.cpp once (cached in %s)", gguf_path.name, kind.upper(), cache_dir)
    status = llama_cpp.llama_model_quantize(str(gguf_path).encode(), str(staging).encode(), ctypes.byref(params))
    if status != 0 or not staging.is_file():
        staging.unlink(missing_ok=True)
        raise ModelLoadError(
            f"llama.cpp could not convert {gguf_path} to {kind.upper()} (status {status}): set GGUF_WEIGHTS=file"
        )
    staging.replace(target)  # atomic: a concurrent start sees either no copy or a whole one
    return target


class LlamaCppBackend(Backend):
    name = "llama_cpp"
    supports_half_precision = False  # the GGUF's own quantisation decides the precision
    loads_gguf_natively = True

    @classmethod
    def is_available(cls) -> bool:
        """Installed and loadable: a library that fails to load (a missing libgomp, say) counts as absent."""
        if importlib.util.find_spec("llama_cpp") is None:
            return False
        try:
            import_llama_cpp()
        except Exception as error:  # noqa: BLE001 - ctypes raises OSError or RuntimeError for a broken library
            logger.warning("the llama_cpp backend is installed but cannot load: %s", error)
            return False
        return True

    def load(self, source: ModelSource, options: LoadOptions) -> LoadedModel:
        if source.kind is not SourceKind.GGUF_FILE:
            raise ModelLoadError(
                f"BACKEND=llama_cpp loads .gguf files only, and {source.requested!r} is not one: "
                "point PRETRAINED_MODEL_NAME_OR_PATH at a .gguf file or set BACKEND=transformers"
            )
        if options.device == "cuda":
            raise ModelLoadError("BACKEND=llama_cpp runs on the CPU here: set DEVICE=cpu or auto, or BACKEND=transformers")
        sha256 = None
        if options.sha256:
            sha256 = check_sha256_pin(source.path, options.sha256)
        weights_path = source.path
        weights = weights_to_run(source.requested, options.gguf_weights)
        if weights != "file":
            weights_path = converted_copy(source.path, weights, options.cache_dir, sha256)  # a pinned file is hashed once
        try:
            model = LlamaCppModel.load(weights_path)
        except LlamaCppUnavailableError as error:
            raise ModelLoadError(str(error)) from None
        except ValueError as error:
            raise ModelLoadError(f"{error}: is it a complete GGUF file of a model llama.cpp supports?") from None
        config = LlamaCppEngineConfig(
            slots=options.max_batch_size,
            threads=options.threads or default_threads(),
            max_queue_size=options.max_queue_size,
            batch_tokens=max(512, options.max_batch_size),
            # Memory for every slot is reserved up front: 2048 unless asked (the engine caps it at the model's window).
            context_per_slot=options.context_length or LlamaCppEngineConfig.context_per_slot,
        )
        try:
            engine = LlamaCppEngine(model, config)
        except Exception:
            model.close()
            raise
        eos_ids, stop_sequences = eos_token_ids_and_stop_sequences(model, options.additional_eos_tokens)
        info = ModelInfo(
            backend=self.name,
            device="cpu",
            dtype=f"gguf {model.quantization()}",
            context_length=engine.context_per_slot,
            vocab_size=model.n_vocab,
            eos_token_ids=eos_ids,
            extra_stop_sequences=stop_sequences,
            model_code="llama.cpp",
        )
        logger.info(
            "llama.cpp: %s, %d slots x %d tokens, %d threads",
            source.path.name, config.slots, engine.context_per_slot, config.threads,
        )
        return LlamaCppLoadedModel(model, engine, info)


def register_backends(register) -> None:
    register(LlamaCppBackend)
