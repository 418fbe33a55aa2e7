"""Helpers every service's settings use: where the repository root is, how env values are read, and
the one error a setting that cannot be used raises.

A relative path in a setting means the same in a checkout and in an image (where the repository's
folders are copied under /app): it is relative to the repository root, found from this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from pydantic import ValidationError

from common.validation import StartupError

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


class SettingsError(StartupError, ValueError):
    """A setting that cannot be used; the message is one line naming the env var and the fix."""


def env_values(environ: Mapping[str, str], fields: Iterable[str]) -> dict[str, str]:
    """For each field, the stripped value of its upper-case env var, where that is set and not blank."""
    return {field: environ[field.upper()].strip() for field in fields if environ.get(field.upper(), "").strip()}


def settings_error(error: ValidationError, environ: Mapping[str, str] | None = None) -> SettingsError:
    """pydantic's first complaint about a settings object as one line: `VARIABLE (nested.field): what is wrong`.
    The value is quoted only when `environ` is given: a service whose settings may hold a key leaves
    it out, as the value may be a key set in the wrong variable."""
    first = error.errors(include_url=False, include_input=False)[0]
    variable = str(first["loc"][0]).upper() if first["loc"] else "settings"
    detail = ".".join(str(part) for part in first["loc"][1:])
    where = f"{variable} ({detail})" if detail else variable
    value = f" (got {environ.get(variable)!r})" if environ is not None else ""
    return SettingsError(f"{where}: {first['msg'].removeprefix('Value error, ')}{value}")
