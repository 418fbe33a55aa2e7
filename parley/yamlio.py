"""YAML in and out: round-trip (comments and order kept) for files edited in place, one dump style."""

from __future__ import annotations

import io
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError


class YamlSyntaxError(ValueError):
    """A YAML file that does not parse; the message is "file: line N: what"."""


def round_trip_yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold long values (WAIT_HOSTS, LLM_ENDPOINTS)
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def load_yaml_text(text: str, display_path: str) -> Any:
    """Parse YAML for editing in place; syntax errors name the file and line."""
    try:
        return round_trip_yaml().load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise YamlSyntaxError(f"{display_path}: {where}: {error.problem or error.context}") from None
    except YAMLError as error:
        raise YamlSyntaxError(f"{display_path}: (file): {error}") from None


def dump_yaml(data: Any) -> str:
    stream = io.StringIO()
    round_trip_yaml().dump(data, stream)
    return stream.getvalue()
