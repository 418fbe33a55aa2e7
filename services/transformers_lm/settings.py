"""The LLM service's settings: one typed object, read once from the environment (`Settings.from_env()`).

Every setting is an environment variable of the same name in upper case (Dream's names where Dream
has one); the table in this service's README lists them all, and a test checks it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.lm_protocol import DEFAULT_GENERATIVE_CONFIG, GenerationCaps, GenerationConfig
from common.model_sources import EMBEDDED_MODELS, GgufWeights
from common.settings_support import CommaList, Json, RepoPath, ServiceSettings, SettingsError


__all__ = ["ModelVariant", "PromptFormat", "Settings", "SettingsError"]


class PromptFormat(BaseModel):
    """A per-model prompt layout, with the fields of RayLLM's model YAML (`prompt_format`).

    Each template holds `{instruction}` where the message goes; with `system_in_user` the user
    template also holds `{system}`, filled on the first user message only.
    """

    model_config = ConfigDict(extra="forbid")

    system: str = "{instruction}\n"
    user: str = "{instruction}\n"
    assistant: str = "{instruction}\n"
    trailing_assistant: str = ""
    default_system_message: str = ""
    system_in_user: bool = False
    strip_whitespace: bool = True

    @field_validator("system", "user", "assistant")
    @classmethod
    def _has_instruction_slot(cls, template: str) -> str:
        if "{instruction}" not in template:
            raise ValueError("must contain {instruction}")
        return template


StopSequences = tuple[Annotated[str, Field(min_length=1)], ...]


class ModelVariant(BaseModel):
    """Another model name for the same weights, with its own prompt and defaults (a card's `model.names`).

    A request that names it (`model` of an OpenAI request) gets its system prompt when it brings
    none of its own, its prompt format (else the model's), its generation defaults merged over the
    model's, and its stop strings added to the model's.
    """

    model_config = ConfigDict(extra="forbid")

    description: str | None = None
    system_prompt: str | None = None
    prompt_format: PromptFormat | None = None
    generation_config: GenerationConfig | None = None
    stop: StopSequences = ()


class Settings(ServiceSettings):
    """What the service reads from its environment. Field descriptions are the documentation."""

    pretrained_model_name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="the model: an embedded name (smollm2-135m-instruct), a local directory, a .gguf file or a Hugging Face id",
    )
    service_name: str = Field("transformers-lm", description="the service's name, shown in /health and logs")
    service_port: int = Field(8180, ge=1, le=65535, description="the port gunicorn binds on 0.0.0.0")
    half_precision: bool = Field(False, description="1: float16 on CUDA, bfloat16 on CPU; 0: float32")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="cpu, cuda or auto (cuda when available)")
    additional_eos_tokens: CommaList = Field(
        (), description="comma-separated strings that also end a hypothesis (single tokens end generation; longer ones cut the text)"
    )
    language: Literal["EN", "RU"] = Field("EN", description="speaker names of the plain prompt format: EN Human/AI, RU Human/Assistant")
    generative_config: RepoPath = Field(
        DEFAULT_GENERATIVE_CONFIG,
        validate_default=True,
        description="the model's default generative config (JSON); requests' configs are merged over it",
    )
    model_cache_dir: RepoPath = Field(
        ".cache/models", validate_default=True,
        description="where converted models are kept (GGUF → safetensors for transformers, the llama.cpp copies)",
    )
    model_sha256: str | None = Field(None, description="pinned sha256 of the model file; a mismatch refuses to start")
    backend: str = Field("auto", description="auto, transformers or llama_cpp (auto: llama_cpp for .gguf when installed)")
    model_aliases: CommaList = Field((), description="comma-separated extra model names accepted by /v1 endpoints")
    max_new_tokens_cap: int = Field(1024, ge=1, description="the largest max_new_tokens / max_tokens a request may ask")
    max_num_return_sequences: int = Field(8, ge=1, description="the largest num_return_sequences / n a request may ask")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_batch_size: int = Field(
        16, ge=1, description="sequences generated together in one batch (continuous batching); more wait in the queue"
    )
    max_queue_size: int = Field(
        64, ge=0, description="sequences that may wait for a batch slot; beyond it requests get 429 with Retry-After"
    )
    model_code: Literal["auto", "native", "transformers"] = Field(
        "auto",
        description=(
            "what computes a model on the transformers backend: native (Parley's plain-torch Llama-family "
            "decoder and tokenizer: faster steps, ready without importing transformers), transformers (its "
            "modelling code, any architecture) or auto (native when the model is one it computes, else transformers)"
        ),
    )
    gguf_weights: GgufWeights = Field(
        "auto",
        description=(
            "what the llama_cpp backend runs: file (the GGUF's own quantisation), or a copy llama.cpp's quantiser "
            "makes once and caches in MODEL_CACHE_DIR: q8_0 (8-bit blocks), bf16 (AVX512_BF16 kernels) or f16 "
            "(the file dequantised); auto: the embedded model's choice (bf16 for SmolLM2), else file"
        ),
    )
    context_length: int | None = Field(
        None,
        ge=64,
        description=(
            "the most tokens (prompt and answer) one sequence may use, at most the model's window; default: the "
            "model's window, on llama_cpp 2048 (it reserves this many for each of MAX_BATCH_SIZE sequences)"
        ),
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads of the llama_cpp backend; default: the cores this process may use"
    )
    prompt_format: Annotated[PromptFormat | None, Json('{"user": "User: {instruction}\\n"}')] = Field(
        None, description="JSON object with RayLLM's prompt_format fields; overrides the chat template"
    )
    stop_sequences: Annotated[StopSequences, Json('["\\nUser:"]')] = Field(
        (),
        description=(
            "JSON list of strings where every hypothesis is cut; one that is a single token of the model "
            "(an end-of-turn token such as <|im_end|>) also ends generation"
        ),
    )
    served_model_name: str | None = Field(
        None,
        min_length=1,
        description=(
            "the model's name in /v1/models and in answers (a card's name); default: PRETRAINED_MODEL_NAME_OR_PATH, "
            "or the file or folder name when that is a path"
        ),
    )
    model_names: Annotated[dict[str, ModelVariant], Json('{"pirate": {"system_prompt": "You are a pirate."}}')] = Field(
        {},
        description=(
            "JSON object of more model names for the same weights, each with its own system_prompt, prompt_format, "
            "generation_config and stop (a card's model.names); a request picks one by its model"
        ),
    )

    @field_validator("language", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("model_sha256")
    @classmethod
    def _sha256_is_hex(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be 64 hex digits")
        return value

    @model_validator(mode="after")
    def _names_are_distinct(self) -> "Settings":
        default = self.default_model_name
        for name in self.model_names:
            if name == default or name in self.model_aliases:
                raise ValueError(f"model_names: {name!r} is also the model's name or one of MODEL_ALIASES")
        return self

    @property
    def default_model_name(self) -> str:
        """The name the model is served under: SERVED_MODEL_NAME, else the source unless it is a path."""
        if self.served_model_name:
            return self.served_model_name
        source = self.pretrained_model_name_or_path.strip()
        if source in EMBEDDED_MODELS or not (source.startswith((".", "/", "~")) or source.lower().endswith(".gguf")):
            return source
        path = Path(source)
        return path.stem if path.suffix.lower() == ".gguf" else path.name or source

    @property
    def served_model_names(self) -> list[str]:
        """The names /v1 endpoints accept: the model's, its named variants, then its aliases."""
        names = [self.default_model_name, *self.model_names, *self.model_aliases]
        return list(dict.fromkeys(names))

    @property
    def caps(self) -> GenerationCaps:
        return GenerationCaps(
            max_new_tokens=self.max_new_tokens_cap, max_num_return_sequences=self.max_num_return_sequences
        )
