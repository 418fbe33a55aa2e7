"""Helpers every service's settings use: where the repository root is, and how env values are read.

A relative path in a setting means the same in a checkout and in an image (where the repository's
folders are copied under /app): it is relative to the repository root, found from this file.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def resolve_repo_path(value: str | Path) -> Path:
    """An absolute path as it is; a relative one against the repository root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def parse_boolean(value: str, variable: str) -> bool:
    """1/true/yes/on or 0/false/no/off (or empty); a ValueError naming the variable otherwise."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{variable} must be 1 or 0 (true/false), not {value!r}")
