"""The registry of known model files (`models/known.yml`): settings that a file's sha256 brings with it.

A file's own metadata says what it is (parley.model_files), not how to serve it well: the stop
words its fine-tune really ends turns with, a context that fits its memory, generation defaults
that work, the weights llama.cpp should run. An entry here holds those, checked by hand once, for
every copy of the file whatever it is called.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.lm_protocol import GenerationConfig
from common.model_sources import GgufWeights
from common.validation import error_lines
from parley.yamlio import YamlSyntaxError, load_yaml_text

KNOWN_MODELS_FILE = "models/known.yml"
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class KnownModelsError(ValueError):
    """The registry file cannot be used; `problems` holds one "file: key: message" line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class KnownModel(BaseModel):
    """What the registry knows of one file."""

    model_config = ConfigDict(extra="forbid")

    display_name: str
    family: str
    file_name: str | None = Field(None, description="the name the file is usually shipped under (for people)")
    license: str | None = None
    description: str | None = None
    context_length: int | None = Field(None, ge=64, description="tokens per sequence to serve, at most the model's window")
    prompt_format: dict[str, Any] | None = Field(None, description="RayLLM's prompt_format fields; none: the file's chat template")
    stop: list[str] = Field([], description="the stop set: the model's end-of-turn tokens and any text stops")
    generation_config: dict[str, Any] = {}
    aliases: list[str] = []
    gguf_weights: GgufWeights | None = None

    @field_validator("generation_config")
    @classmethod
    def _valid_generation_keys(cls, config: dict[str, Any]) -> dict[str, Any]:
        try:
            GenerationConfig.model_validate(config)
        except ValidationError as error:
            raise ValueError("; ".join(error_lines(error, root="(config)", model=GenerationConfig))) from None
        return config

    @field_validator("prompt_format")
    @classmethod
    def _valid_prompt_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from services.transformers_lm.settings import PromptFormat

            try:
                PromptFormat.model_validate(value)
            except ValidationError as error:
                raise ValueError("; ".join(error_lines(error, root="(prompt_format)", model=PromptFormat))) from None
        return value


@dataclass(frozen=True)
class KnownModels:
    """The registry, by sha256."""

    entries: dict[str, KnownModel]

    def get(self, sha256: str | None) -> KnownModel | None:
        return self.entries.get(sha256 or "")


def parse_known_models(text: str, display_path: str = KNOWN_MODELS_FILE) -> KnownModels:
    try:
        data = load_yaml_text(text, display_path)
    except YamlSyntaxError as error:
        raise KnownModelsError([str(error)]) from None
    if data is None:
        return KnownModels({})
    data = json.loads(json.dumps(data))  # plain data, no ruamel types
    if not isinstance(data, dict):
        raise KnownModelsError([f"{display_path}: (file): must map sha256 digests to models"])
    entries: dict[str, KnownModel] = {}
    problems: list[str] = []
    for key, value in data.items():
        digest = str(key)
        if not SHA256.match(digest):
            problems.append(f"{display_path}: {digest}: not a sha256 (64 lowercase hex digits)")
            continue
        try:
            entries[digest] = KnownModel.model_validate(value if value is not None else {})
        except ValidationError as error:
            problems.extend(f"{display_path}: {digest[:12]}…: {line}" for line in error_lines(error, root="(model)", model=KnownModel))
    if problems:
        raise KnownModelsError(problems)
    return KnownModels(entries)


def load_known_models(root: Path) -> KnownModels:
    """The registry of the checkout at `root` (empty when it has none)."""
    path = root / KNOWN_MODELS_FILE
    if not path.is_file():
        return KnownModels({})
    return parse_known_models(path.read_text())
