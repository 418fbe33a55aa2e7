"""The transformers backend: any causal LM that transformers loads, from a directory, a hub id or a GGUF file.

A GGUF file is dequantised once and cached as safetensors under the cache directory, keyed by the
file's sha256, so later starts load in about a second. A Llama-family model is then computed by
`engines/native_llama.py` and tokenized by `native_tokenizer.py` (MODEL_CODE=auto|native), so the
service gets ready without importing transformers' modelling stack; every other model, and
MODEL_CODE=transformers, runs on transformers' own code. transformers is imported only on the
paths that use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common.model_sources import ModelSource, SourceKind
from services.transformers_lm.backends import (
    Backend,
    ChatMessage,
    LoadedModel,
    LoadOptions,
    ModelInfo,
    ModelLoadError,
    check_sha256_pin,
)
from services.transformers_lm.backends.chat_template import template_takes_tools
from services.transformers_lm.backends.native_tokenizer import NativeTokenizerUnsupported, read_native_tokenizer
from services.transformers_lm.engines.continuous_batching import ContinuousBatchingEngine, as_packed_model
from services.transformers_lm.engines.native_llama import NativeLlama, UnsupportedModelError, read_config, read_weights
from services.transformers_lm.engines.grammar import GrammarError, GrammarTokenizer

logger = logging.getLogger(__name__)

# The engine this backend runs its models with; the one line to change for another engine.
ENGINE_CLASS = ContinuousBatchingEngine

_COMPLETE_MARKER = ".parley-complete"


def choose_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE=cuda but no CUDA device is available here: set DEVICE=cpu or auto")
    return torch.device(requested)


def choose_dtype(device: torch.device, half_precision: bool) -> torch.dtype:
    if not half_precision:
        return torch.float32
    # float16 kernels are slow or missing on CPU; bfloat16 is the CPU's half precision.
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def converted_gguf_dir(gguf_path: Path, cache_dir: Path, sha256: str) -> Path:
    """The safetensors copy of a GGUF file, made on first use (about 25 s for SmolLM2-135M)."""
    target = cache_dir / f"gguf-{sha256[:32]}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("dequantising %s once into %s (later starts reuse it)", gguf_path.name, target)
    started = time.monotonic()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantised now: save them as a plain model, not as a quantised one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=cache_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(f"{gguf_path}\n")
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted in %.1f s", time.monotonic() - started)
    return target


def hub_snapshot_dir(model_id: str) -> Path:
    """A local snapshot of a hub model: downloaded when the hub is reachable, else the local HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns, etag_timeout=5))
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"the Hugging Face hub has no model {model_id!r} (or it is private or gated: set HF_TOKEN); "
            "check the id, or set PRETRAINED_MODEL_NAME_OR_PATH to a local model directory or .gguf file"
        ) from None
    except Exception as online_error:  # noqa: BLE001 - any other hub failure falls back to the cache
        logger.info("hub not usable for %s (%s); trying the local Hugging Face cache", model_id, type(online_error).__name__)
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001
        raise ModelLoadError(
            f"model {model_id!r} is not in the local Hugging Face cache and the hub cannot be reached: "
            f"download it where the hub is reachable (hf download {model_id}) or set "
            "PRETRAINED_MODEL_NAME_OR_PATH to a local model directory or .gguf file"
        ) from None


class TransformersTokenizer:
    """transformers' tokenizer with the interface of `NativeTokenizer`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.eos_token_id = tokenizer.eos_token_id

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, token_ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)

    def tokenizer_json(self) -> str:
        """The fast tokenizer's `tokenizer.json` text (added tokens included), for llguidance."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GrammarError("constrained decoding needs a fast (tokenizers) tokenizer; this model has a slow one")
        return backend.to_str()


class TransformersModel(LoadedModel):
    """A model (native or transformers) and its tokenizer, served through ENGINE_CLASS."""

    def __init__(self, model, tokenizer, info: ModelInfo, max_queue_size: int = 256, max_batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.engine = ENGINE_CLASS(
            model, context_length=info.context_length, max_queue_size=max_queue_size, max_batch_size=max_batch_size
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def render_chat(self, messages: list[ChatMessage], tools: list[dict] | None = None) -> str:
        return self.tokenizer.render_chat([m.template_message() for m in messages], tools)

    @property
    def chat_template_takes_tools(self) -> bool:
        return template_takes_tools(self.tokenizer.chat_template)

    def make_grammar_tokenizer(self) -> GrammarTokenizer:
        return GrammarTokenizer.from_tokenizer_json(
            self.tokenizer.tokenizer_json(), self.engine.vocab_size, self.info.eos_token_ids
        )


def eos_token_ids_and_stop_sequences(tokenizer, generation_eos, additional_eos_tokens: tuple[str, ...]):
    """The ids that end a sequence, and the additional EOS strings that are not single tokens."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, generation_eos):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    stop_sequences: list[str] = []
    for token in additional_eos_tokens:
        token_id = tokenizer.token_id(token)
        if token_id is not None:
            ids.add(token_id)
        else:
            stop_sequences.append(token)
    return tuple(sorted(ids)), tuple(stop_sequences)


def _generation_eos(directory: Path):
    """eos_token_id of generation_config.json, else of config.json (as transformers falls back)."""
    for name in ("generation_config.json", "config.json"):
        with contextlib.suppress(OSError, ValueError):
            value = json.loads((directory / name).read_text()).get("eos_token_id")
            if value is not None:
                return value
    return None


def _load_native(directory: Path, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer, context length) computed by Parley's own code; UnsupportedModelError when it cannot.

    The config and the tokenizer are checked before the weights are read."""
    config = read_config(directory)
    try:
        tokenizer = read_native_tokenizer(directory)
    except NativeTokenizerUnsupported as why:
        raise UnsupportedModelError(f"its tokenizer: {why}") from None
    return NativeLlama(config, read_weights(directory), dtype, device), tokenizer, config.max_positions


def _load_with_transformers(directory: Path, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer, context length) computed by transformers' modelling code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load the model in {directory}: {first_line}") from None
    model.to(device)
    model.eval()
    context_length = int(
        getattr(model.config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048)
    )
    return as_packed_model(model), TransformersTokenizer(tokenizer), context_length


def load_transformers_model(directory: Path, options: LoadOptions) -> TransformersModel:
    """Load a model directory (config.json, weights, tokenizer) onto the chosen device."""
    device = choose_device(options.device)
    dtype = choose_dtype(device, options.half_precision)
    loaded = None
    if options.model_code != "transformers":
        try:
            loaded, code = _load_native(directory, dtype, device), "native"
        except UnsupportedModelError as why:
            if options.model_code == "native":
                raise ModelLoadError(
                    f"MODEL_CODE=native cannot compute the model in {directory} ({why}): set MODEL_CODE=auto or transformers"
                ) from None
            logger.info("transformers computes this model: the native code does not (%s)", why)
    if loaded is None:
        loaded, code = _load_with_transformers(directory, dtype, device), "transformers"
    model, tokenizer, context_length = loaded
    eos_ids, stop_sequences = eos_token_ids_and_stop_sequences(
        tokenizer, _generation_eos(directory), options.additional_eos_tokens
    )
    info = ModelInfo(
        backend=TransformersBackend.name,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        context_length=options.window(context_length),
        eos_token_ids=eos_ids,
        extra_stop_sequences=stop_sequences,
        model_code=code,
        vocab_size=int(model.vocab_size),
    )
    return TransformersModel(
        model, tokenizer, info, max_queue_size=options.max_queue_size, max_batch_size=options.max_batch_size
    )


class TransformersBackend(Backend):
    name = "transformers"
    supports_half_precision = True
    loads_gguf_natively = False

    def load(self, source: ModelSource, options: LoadOptions) -> LoadedModel:
        if source.kind is SourceKind.GGUF_FILE:
            sha256 = check_sha256_pin(source.path, options.sha256)
            directory = converted_gguf_dir(source.path, options.cache_dir, sha256)
        elif source.kind is SourceKind.LOCAL_DIR:
            directory = source.path
        else:
            directory = hub_snapshot_dir(source.location)
        if options.sha256 and source.kind is not SourceKind.GGUF_FILE:
            weights = sorted(directory.glob("*.safetensors"))
            if len(weights) != 1:
                raise ModelLoadError(
                    f"MODEL_SHA256 pins one weights file, but {directory} holds {len(weights)} .safetensors files"
                )
            check_sha256_pin(weights[0], options.sha256)
        return load_transformers_model(directory, options)


def register_backends(register) -> None:
    register(TransformersBackend)
