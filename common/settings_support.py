"""The base of every service's settings (`ServiceSettings.from_env`), and the one error a setting that
cannot be used raises.

Each field is the environment variable of its name in upper case (Dream's names where Dream has one),
documented by its `description`; a blank variable counts as unset, so the field keeps its default.
A field says in its annotation how its text is read when that is not plain text: `CommaList`
(`a, b, c`), `Json` (a JSON document, e.g. an object of endpoints); pydantic then validates the
value (numbers, `1/0/true/false` booleans, ranges). A field marked `NOT_AN_ENV_VAR` is filled by
the service's own `_values_from_env` hook (a key read from a variable another setting names, a
prompt read from PROMPT or PROMPT_FILE) and names the variables it reads in `EnvVars(...)`.

A relative path in a setting (`RepoPath`) means the same in a checkout and in an image (where the
repository's folders are copied under /app): it is relative to the repository root.

Every service also has the fields gunicorn runs with (`common/gunicorn_conf.py` reads them):
SERVICE_HOST, SERVICE_PORT, GUNICORN_THREADS, GUNICORN_TIMEOUT, GUNICORN_GRACEFUL_TIMEOUT and LOG_LEVEL;
its name, SERVICE_NAME; and what the shared service layer (`common/service_layer.py`) reads: the API
keys every route but /health and /ping needs (PARLEY_API_KEYS, or a file of them in
PARLEY_API_KEYS_FILE, as a Docker secret is), LOG_FORMAT (text or JSON lines) and
OTEL_EXPORTER_OTLP_ENDPOINT (spans exported there).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo

from common.key_fields import is_key_field
from common.validation import StartupError, field_path, problems

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_repo_path(value: str | Path) -> Path:
    """An absolute path as it is; a relative one against the repository root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


class SettingsError(StartupError, ValueError):
    """A setting that cannot be used; the message is one line naming the env var and the fix."""


@dataclass(frozen=True)
class EnvVars:
    """The variables a field is read from, when they are not just its name in upper case
    (documented, and checked to be documented, under these names). `()`: none, a derived value."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class _Format:
    """How a variable's text becomes the value pydantic validates."""

    kind: Literal["comma_list", "json"]
    example: str = ""

    def read(self, text: str, variable: str) -> Any:
        if self.kind == "comma_list":
            return tuple(part.strip() for part in text.split(",") if part.strip())
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            example = f", e.g. {self.example}" if self.example else ""
            raise SettingsError(f"{variable} must be JSON{example}: {error}") from None


NOT_AN_ENV_VAR = EnvVars(())
RepoPath = Annotated[Path, AfterValidator(resolve_repo_path)]
CommaList = Annotated[tuple[str, ...], _Format("comma_list")]


def Json(example: str = "") -> _Format:  # noqa: N802 - reads as a type in annotations: Annotated[dict, Json()]
    """Marks a field whose variable holds a JSON document; `example` goes into the error message."""
    return _Format("json", example)


def _marker(field: FieldInfo, kind: type) -> Any:
    return next((item for item in field.metadata if isinstance(item, kind)), None)


def settings_error(error: ValidationError, environ: Mapping[str, str] | None = None) -> SettingsError:
    """pydantic's first complaint about a settings object as one line: `VARIABLE (nested.field): what is wrong`.
    The value is quoted only when `environ` is given and the variable is not named like a key: a
    service whose settings may hold a key leaves it out, as the value may be a key set in the wrong variable."""
    first = problems(error)[0]
    variable = str(first.location[0]).upper() if first.location else "settings"
    detail = field_path(first.location[1:])
    where = f"{variable} ({detail})" if detail else variable
    quotable = environ is not None and variable in environ and not is_key_field(variable)
    value = f" (got {environ.get(variable)!r})" if quotable else ""
    return SettingsError(f"{where}: {first.message}{value}")


# What a key may hold: printable, and nothing that needs quoting in a header, a comma list or nginx's config.
_API_KEY_CHARACTERS = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
MIN_API_KEY_CHARS = 16


def _read_api_keys(environ: Mapping[str, str]) -> tuple[str, ...]:
    """PARLEY_API_KEYS (comma-separated) and the keys in the file PARLEY_API_KEYS_FILE names (one per
    line or comma-separated, `#` comments; a `PARLEY_API_KEYS=` prefix, as in .env_secret, is read too)."""
    keys = [part.strip() for part in environ.get("PARLEY_API_KEYS", "").split(",") if part.strip()]
    file_name = environ.get("PARLEY_API_KEYS_FILE", "").strip()
    if file_name:
        try:
            text = Path(file_name).read_text()
        except OSError as error:
            raise SettingsError(f"PARLEY_API_KEYS_FILE {file_name!r} cannot be read: {error.strerror}") from None
        for line in text.splitlines():
            line = line.strip().removeprefix("PARLEY_API_KEYS=")
            if line and not line.startswith("#"):
                keys.extend(part.strip() for part in line.split(",") if part.strip())
        if not keys:
            raise SettingsError(f"PARLEY_API_KEYS_FILE {file_name!r} holds no key")
    return tuple(dict.fromkeys(keys))


class ServiceSettings(BaseModel):
    """What every service reads from its environment; a service's Settings add their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Quote a malformed value in the error; a service whose settings may hold keys says False.
    show_values_in_errors: ClassVar[bool] = True

    service_name: str = Field(description="the service's name, shown in /health and logs")
    service_host: str = Field(
        "0.0.0.0", min_length=1,
        description="the address gunicorn binds: 0.0.0.0 (every interface, as in a container) or 127.0.0.1 (this machine only)",
    )
    service_port: int = Field(ge=1, le=65535, description="the port gunicorn binds on 0.0.0.0")
    gunicorn_threads: int = Field(32, ge=1, le=1024, description="requests gunicorn serves at once (threads of its one worker)")
    gunicorn_timeout: int = Field(
        600, ge=1, description="seconds a silent worker may take before gunicorn restarts it (generation can be slow on a CPU)"
    )
    gunicorn_graceful_timeout: int = Field(
        10, ge=1, description="seconds a stopping service (SIGTERM) may take to finish the requests it has; new ones get 503 meanwhile"
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="gunicorn's log level")
    parley_api_keys: Annotated[tuple[SecretStr, ...], EnvVars(("PARLEY_API_KEYS", "PARLEY_API_KEYS_FILE"))] = Field(
        (),
        description="the API keys every route but GET /health and GET /ping needs (comma-separated; or a file of "
        "them, one per line, in PARLEY_API_KEYS_FILE, as a Docker secret); unset: no key needed",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines, or json: one JSON object per line (time, level, logger, message, trace_id)"
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        description="an OTLP/HTTP collector (e.g. http://collector:4318) that gets a span per request, when the "
        "opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http packages are installed",
    )

    @field_validator("parley_api_keys")
    @classmethod
    def _keys_are_usable(cls, keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for index, key in enumerate(keys, 1):
            value = key.get_secret_value()
            where = f"key {index} of {len(keys)}"
            if len(value) < MIN_API_KEY_CHARS:
                raise ValueError(f"{where} has {len(value)} characters; a key needs at least {MIN_API_KEY_CHARS} "
                                 "(`parley secrets init` writes a random one)")
            if not _API_KEY_CHARACTERS.match(value):
                raise ValueError(f"{where} holds a character other than letters, digits and . _ ~ + / = -")
        return keys

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The keys, as text (never log them)."""
        return tuple(key.get_secret_value() for key in self.parley_api_keys)

    @classmethod
    def env_variables(cls) -> dict[str, list[str]]:
        """For each field, the environment variables it is read from (what the README must document)."""
        found = {}
        for name, field in cls.model_fields.items():
            names = _marker(field, EnvVars)
            found[name] = list(names.names) if names else [name.upper()]
        return found

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Read every field from its variable; raise SettingsError naming the variable that is wrong."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            if _marker(field, EnvVars) is not None:
                continue  # not read from a variable of its own name: `_values_from_env` fills it
            variable = name.upper()
            text = environ.get(variable, "").strip()
            if not text:
                if field.is_required():
                    raise SettingsError(f"missing {variable}: set it to {field.description}")
                continue
            found_format = _marker(field, _Format)
            values[name] = found_format.read(text, variable) if found_format else text
        values["parley_api_keys"] = _read_api_keys(environ)
        values.update(cls._values_from_env(environ, values))
        try:
            settings = cls.model_validate(values)
        except ValidationError as error:
            raise settings_error(error, environ if cls.show_values_in_errors else None) from None
        return settings._completed_from_env(environ)

    @classmethod
    def _values_from_env(cls, environ: Mapping[str, str], values: dict[str, Any]) -> dict[str, Any]:
        """The values of the fields marked with `EnvVars`: a service with such fields reads them here."""
        return {}

    def _completed_from_env(self, environ: Mapping[str, str]) -> Self:
        """A last step after validation (a key read from the variable a setting names); self by default."""
        return self
