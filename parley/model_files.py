"""A model file's sha256 and facts (common.model_facts), cached by path, size and mtime.

`parley check` verifies every card's pin and compares every card with its model on each run (the
first step of `make test`): hashing the embedded 98 MB GGUF takes about a second on a busy 2-core
machine, the cache makes a second run free. An entry is reused only while the file's size and
modification time are those it was computed for; the cache lives in `PARLEY_CACHE_DIR`, else
`$XDG_CACHE_HOME/parley`, else `~/.cache/parley` (one file, `model-files.json`), and a cache that
cannot be written is simply not kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.model_facts import WEIGHT_SUFFIXES, ModelFacts, read_model_facts
from common.model_sources import file_sha256

CACHE_FILE_NAME = "model-files.json"
CACHE_VERSION = 3


def default_cache_dir() -> Path:
    explicit = os.environ.get("PARLEY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "parley"


@dataclass(frozen=True)
class ModelFile:
    """A model's file (or folder) as found on this machine: its pinnable sha256 and its facts."""

    path: Path
    sha256: str | None  # of the .gguf, or of the one .safetensors of a folder; None for several
    facts: ModelFacts


def _stamp(path: Path) -> list[Any]:
    if path.is_file():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    return sorted([item.name, item.stat().st_size, item.stat().st_mtime_ns] for item in path.iterdir() if item.is_file())


def pinned_file(path: Path) -> Path | None:
    """The file a sha256 pins for a source: the file itself, or the one weights file of a folder."""
    if path.is_file():
        return path
    weights = sorted(item for item in path.iterdir() if item.is_file() and item.suffix in WEIGHT_SUFFIXES)
    return weights[0] if len(weights) == 1 else None


class ModelFileCache:
    """Digests and facts of model files, computed once per file version."""

    def __init__(self, folder: Path | None = None):
        self.path = (folder or default_cache_dir()) / CACHE_FILE_NAME
        self._entries: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._entries is None:
            self._entries = {}
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(self.path.read_text())
                if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
                    self._entries = data["files"]
        return self._entries

    def _save(self) -> None:
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, staging = tempfile.mkstemp(prefix=".model-files.", dir=self.path.parent)
            with os.fdopen(handle, "w") as stream:
                json.dump({"version": CACHE_VERSION, "files": self._load()}, stream)
            os.replace(staging, self.path)  # atomic: a concurrent reader sees the old or the new file

    def inspect(self, location: Path) -> ModelFile:
        """The sha256 and facts of a .gguf file or a model folder (ModelFactsError when it is neither)."""
        location = Path(location).resolve()
        key = str(location)
        stamp = _stamp(location)
        entry = self._load().get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            return ModelFile(location, entry.get("sha256"), ModelFacts.from_json(entry["facts"]))
        facts = read_model_facts(location)
        pinned = pinned_file(location)
        sha256 = file_sha256(pinned) if pinned is not None else None
        self._load()[key] = {"stamp": stamp, "sha256": sha256, "facts": facts.to_json()}
        self._save()
        return ModelFile(location, sha256, facts)


def hub_cache_folder(model_id: str) -> Path | None:
    """A Hugging Face id's snapshot folder when the local Hugging Face cache holds it (nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no hub library): nothing to read
        return None
    return folder if (folder / "config.json").is_file() else None
