"""What a model's own files say about it, read without loading it: the facts a card is derived from.

`read_model_facts(path)` takes a `.gguf` file or a transformers model folder and returns
`ModelFacts`: the chat template, every end-of-generation token (the tokenizer's EOS, the
`eos_token_id`s of `generation_config.json` and `config.json`, a GGUF's EOS, EOT and EOM ids), the
context window, the parameter count, the quantisation, the files' size, and the dimensions a KV
cache is sized by (layers, KV heads, head size). It never imports torch or transformers.

A GGUF header is parsed here directly: the `gguf` package's reader materialises every token of the
vocabulary as an array (15 s for the embedded SmolLM2 on a 2-core machine); walking the header with
`struct` takes well under a second. The key names are the `gguf` package's (`gguf.Keys`).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType) → struct format of a scalar; 8 is a string, 9 an array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays kept whole; other arrays are skipped (the merges) or read only where asked (the tokens).
_KEPT_ARRAYS = ("head_count_kv", "head_count")
# Weight files of a transformers model folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The `dtype` a safetensors header names → bytes per value (for a folder's quantisation label).
_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ModelFactsError(ValueError):
    """The files cannot be read as a model; the message says what is wrong."""


@dataclass(frozen=True)
class ModelFacts:
    """What a model's files declare. None: the files do not say."""

    format: str  # "gguf" or "transformers" (a folder with config.json)
    architecture: str | None = None
    name: str | None = None
    license: str | None = None
    file_size: int = 0  # bytes of the weights (the .gguf, or every weights file of the folder)
    parameter_count: int | None = None
    quantization: str | None = None  # e.g. Q4_1, F16, BF16, F32
    context_window: int | None = None  # the longest sequence the model was trained for
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    eos_tokens: tuple[str, ...] = ()  # how each end-of-generation token is written, e.g. <|im_end|>
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None
    weights_dtype_bytes: float | None = field(default=None)  # a folder's bytes per weight as stored

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        data["eos_tokens"] = list(self.eos_tokens)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelFacts":
        values = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        values["eos_token_ids"] = tuple(values.get("eos_token_ids") or ())
        values["eos_tokens"] = tuple(values.get("eos_tokens") or ())
        return cls(**values)

    def kv_bytes_per_token(self, bytes_per_value: float) -> int | None:
        """Bytes of keys and values one token takes in the KV cache at this element size."""
        if not (self.layers and self.kv_heads and self.head_dim):
            return None
        return int(2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value)


def read_model_facts(path: Path) -> ModelFacts:
    """The facts of a `.gguf` file or a transformers model folder; ModelFactsError when it is neither."""
    path = Path(path)
    if path.is_file():
        return read_gguf_facts(path)
    if path.is_dir():
        return read_folder_facts(path)
    raise ModelFactsError(f"{path} does not exist")


# --- GGUF ------------------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian GGUF values from a memory map."""

    def __init__(self, data: mmap.mmap | bytes, path: Path):
        self.data = data
        self.offset = 0
        self.path = path

    def unpack(self, fmt: str):
        try:
            value = struct.unpack_from(fmt, self.data, self.offset)[0]
        except struct.error:
            raise ModelFactsError(f"{self.path}: the GGUF header ends early (a truncated file?)") from None
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.offset + length > len(self.data):
            raise ModelFactsError(f"{self.path}: the GGUF header ends early (a truncated file?)")
        text = bytes(self.data[self.offset : self.offset + length]).decode("utf-8", errors="replace")
        self.offset += length
        return text

    def skip_string(self) -> None:
        length = self.unpack("<Q")
        self.offset += length

    def value(self, value_type: int, keep_array: bool, wanted_items: set[int] | None = None):
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            if item_type == _STRING:
                if wanted_items is None and not keep_array:
                    for _ in range(count):
                        self.skip_string()
                    return None
                items: dict[int, str] = {}
                for index in range(count):
                    if wanted_items is None or index in wanted_items:
                        items[index] = self.string()
                    else:
                        self.skip_string()
                return items
            item_format = _SCALAR_FORMATS.get(item_type)
            if item_format is None:
                raise ModelFactsError(f"{self.path}: unknown GGUF array item type {item_type}")
            size = struct.calcsize(item_format)
            if not keep_array:
                self.offset += size * count
                return None
            values = list(struct.unpack_from(f"<{count}{item_format[1:]}", self.data, self.offset))
            self.offset += size * count
            return values
        scalar_format = _SCALAR_FORMATS.get(value_type)
        if scalar_format is None:
            raise ModelFactsError(f"{self.path}: unknown GGUF value type {value_type}")
        return self.unpack(scalar_format)


def _gguf_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int]], dict[int, str]]:
    """(metadata without big arrays, tensor infos (name, shape, type), token strings at the EOS ids)."""
    with open(path, "rb") as stream:
        if stream.read(4) != GGUF_MAGIC:
            raise ModelFactsError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        data = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        cursor = _Cursor(data, path)
        cursor.offset = 4
        version = cursor.unpack("<I")
        if version < 2:
            raise ModelFactsError(f"{path}: GGUF version {version} is too old (2 or later is needed)")
        tensor_count = cursor.unpack("<Q")
        kv_count = cursor.unpack("<Q")
        metadata: dict[str, Any] = {}
        tokens_at: int | None = None
        for _ in range(kv_count):
            key = cursor.string()
            value_type = cursor.unpack("<I")
            if key == "tokenizer.ggml.tokens":
                tokens_at = cursor.offset  # read again once the EOS ids are known
            metadata[key] = cursor.value(value_type, keep_array=key.endswith(_KEPT_ARRAYS))
        tensors = []
        for _ in range(tensor_count):
            name = cursor.string()
            dimensions = cursor.unpack("<I")
            shape = [cursor.unpack("<Q") for _ in range(dimensions)]
            tensor_type = cursor.unpack("<I")
            cursor.unpack("<Q")  # offset in the data section
            tensors.append((name, shape, tensor_type))
        tokens: dict[int, str] = {}
        wanted = {int(metadata[key]) for key in _GGUF_EOS_KEYS + ("tokenizer.ggml.bos_token_id",) if isinstance(metadata.get(key), int)}
        if tokens_at is not None and wanted:
            cursor.offset = tokens_at
            tokens = cursor.value(_ARRAY, keep_array=False, wanted_items=wanted) or {}
        return metadata, tensors, tokens
    finally:
        data.close()


_GGUF_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def _first(value: Any) -> Any:
    """A per-layer array's largest value (some models vary KV heads by layer), or the scalar."""
    if isinstance(value, list):
        return max(value) if value else None
    return value


def gguf_quantization_name(file_type: int | None) -> str | None:
    """`general.file_type` as llama.cpp names it (3 → Q4_1, 1 → F16, 0 → F32)."""
    if file_type is None:
        return None
    try:  # imported here: the package pulls in numpy, and only the LLM image and the CLI install it
        from gguf import LlamaFileType
    except ImportError:
        return f"type {file_type}"
    try:
        name = LlamaFileType(int(file_type)).name
    except ValueError:
        return f"type {file_type}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def read_gguf_facts(path: Path) -> ModelFacts:
    metadata, tensors, tokens = _gguf_header(path)
    architecture = metadata.get("general.architecture")
    prefix = f"{architecture}." if architecture else ""
    head_count = _first(metadata.get(f"{prefix}attention.head_count"))
    kv_heads = _first(metadata.get(f"{prefix}attention.head_count_kv")) or head_count
    hidden = metadata.get(f"{prefix}embedding_length")
    head_dim = metadata.get(f"{prefix}attention.key_length") or (hidden // head_count if hidden and head_count else None)
    # The EOS first (a template's `eos_token`), then the end-of-turn and end-of-message tokens.
    eos_ids = list(dict.fromkeys(int(metadata[key]) for key in _GGUF_EOS_KEYS if isinstance(metadata.get(key), int)))
    parameters = 0
    for _, shape, _ in tensors:
        count = 1
        for dimension in shape:
            count *= dimension
        parameters += count
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    return ModelFacts(
        format="gguf",
        architecture=architecture,
        name=metadata.get("general.name"),
        license=metadata.get("general.license"),
        file_size=path.stat().st_size,
        parameter_count=parameters or None,
        quantization=gguf_quantization_name(metadata.get("general.file_type")),
        context_window=metadata.get(f"{prefix}context_length"),
        chat_template=metadata.get("tokenizer.chat_template"),
        bos_token=tokens.get(int(bos_id)) if isinstance(bos_id, int) else None,
        eos_token_ids=tuple(sorted(eos_ids)),
        eos_tokens=tuple(dict.fromkeys(tokens[i] for i in eos_ids if i in tokens)),
        layers=metadata.get(f"{prefix}block_count"),
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
    )


# --- transformers folders --------------------------------------------------------------------


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ModelFactsError(f"{path} is not readable JSON: {error}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(item) for item in value if isinstance(item, int) and not isinstance(item, bool)]
    return []


def _folder_vocabulary(folder: Path, tokenizer_config: dict[str, Any]) -> tuple[dict[int, str], dict[str, int]]:
    """id → text and text → id for the added (special) tokens and, when needed, the whole vocabulary."""
    by_id: dict[int, str] = {}
    for key, token in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        text = _token_text(token)
        if text is not None and str(key).isdigit():
            by_id[int(key)] = text
    tokenizer = _json(folder / "tokenizer.json")
    for token in tokenizer.get("added_tokens") or []:
        if isinstance(token, dict) and isinstance(token.get("id"), int) and isinstance(token.get("content"), str):
            by_id.setdefault(token["id"], token["content"])
    vocabulary = ((tokenizer.get("model") or {}).get("vocab")) if isinstance(tokenizer.get("model"), dict) else None
    by_text = {text: token_id for token_id, text in by_id.items()}
    if isinstance(vocabulary, dict):
        for text, token_id in vocabulary.items():
            if isinstance(token_id, int):
                by_text.setdefault(text, token_id)
                by_id.setdefault(token_id, text)
    return by_id, by_text


def _chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    legacy = _json(folder / "chat_template.json").get("chat_template")
    return legacy if isinstance(legacy, str) else None


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as stream:
        raw_length = stream.read(8)
        if len(raw_length) != 8:
            raise ModelFactsError(f"{path} is not a safetensors file (too short)")
        length = struct.unpack("<Q", raw_length)[0]
        if length > 100_000_000:
            raise ModelFactsError(f"{path} is not a safetensors file (its header length is implausible)")
        try:
            header = json.loads(stream.read(length))
        except ValueError:
            raise ModelFactsError(f"{path} is not a safetensors file (its header is not JSON)") from None
    return header if isinstance(header, dict) else {}


def read_folder_facts(folder: Path) -> ModelFacts:
    config = _json(folder / "config.json")
    if not config:
        raise ModelFactsError(f"{folder} holds no config.json: it is not a transformers model folder")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    tokenizer_config = _json(folder / "tokenizer_config.json")
    generation_config = _json(folder / "generation_config.json")
    by_id, by_text = _folder_vocabulary(folder, tokenizer_config)

    eos_ids: list[int] = []
    eos_text = _token_text(tokenizer_config.get("eos_token"))
    if eos_text is not None and eos_text in by_text:
        eos_ids.append(by_text[eos_text])
    eos_ids += _ids(generation_config.get("eos_token_id")) + _ids(config.get("eos_token_id"))
    eos_ids = list(dict.fromkeys(eos_ids))
    # The tokenizer's EOS first (a template's `eos_token`), then the others.
    eos_tokens = ([eos_text] if eos_text is not None else []) + [by_id[i] for i in eos_ids if i in by_id]

    weights = sorted(item for item in folder.iterdir() if item.is_file() and item.suffix in WEIGHT_SUFFIXES)
    parameters, stored_bytes, dtypes = 0, 0, set()
    for item in weights:
        if item.suffix != ".safetensors":
            continue
        for name, tensor in _safetensors_header(item).items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            count = 1
            for dimension in tensor.get("shape") or []:
                count *= int(dimension)
            parameters += count
            dtype = str(tensor.get("dtype"))
            dtypes.add(dtype)
            stored_bytes += count * _SAFETENSORS_DTYPES.get(dtype, 4)
    declared_dtype = config.get("torch_dtype") or config.get("dtype") or text_config.get("torch_dtype")
    quantization = "+".join(sorted(dtypes)) if dtypes else (str(declared_dtype).upper().replace("FLOAT", "F").replace("BFLOAT", "BF") if declared_dtype else None)
    if isinstance(config.get("quantization_config"), dict):
        quantization = str(config["quantization_config"].get("quant_method") or "quantized")

    heads = text_config.get("num_attention_heads") or text_config.get("n_head")
    kv_heads = text_config.get("num_key_value_heads") or heads
    hidden = text_config.get("hidden_size") or text_config.get("n_embd")
    head_dim = text_config.get("head_dim") or (hidden // heads if hidden and heads else None)
    window = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(text_config.get(key), int):
            window = text_config[key]
            break
    architectures = config.get("architectures")
    bos_text = _token_text(tokenizer_config.get("bos_token"))
    return ModelFacts(
        format="transformers",
        architecture=config.get("model_type") or (architectures[0] if isinstance(architectures, list) and architectures else None),
        name=config.get("_name_or_path") or folder.name,
        license=None,
        file_size=sum(item.stat().st_size for item in weights),
        parameter_count=parameters or None,
        quantization=quantization,
        context_window=window,
        chat_template=_chat_template(folder, tokenizer_config),
        bos_token=bos_text,
        eos_token_ids=tuple(sorted(eos_ids)),
        eos_tokens=tuple(dict.fromkeys(eos_tokens)),
        layers=text_config.get("num_hidden_layers") or text_config.get("n_layer"),
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        weights_dtype_bytes=(stored_bytes / parameters) if parameters else None,
    )
