"""What a service's image would run, read from its Dockerfile: the final stage's ENV, WORKDIR, CMD and ENTRYPOINT.

Enough of the Dockerfile language for our own Dockerfiles: line continuations and comments, ARG
with build args and defaults, `${VAR}`, `${VAR:-default}` and `$VAR` in ENV and WORKDIR, and the
exec (JSON) and shell forms of CMD and ENTRYPOINT. Each FROM starts over: only the final stage counts.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from dataclasses import dataclass, field

# The repository root inside our images (every Dockerfile copies the checkout there).
CONTAINER_ROOT = "/app"


@dataclass
class Dockerfile:
    """What `parley up` needs from a Dockerfile's final stage."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = CONTAINER_ROOT
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comments inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def _substitute(value: str, variables: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        found = variables.get(name, "")
        return found if found or default is None else default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", replace, value)


def _exec_or_shell(argument: str) -> list[str]:
    argument = argument.strip()
    if argument.startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            parsed = json.loads(argument)
            if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
                return parsed
    return ["/bin/sh", "-c", argument]


def parse_dockerfile(text: str, build_args: dict[str, str]) -> Dockerfile:
    """ARG, ENV, WORKDIR, CMD and ENTRYPOINT of the final stage, with build args substituted."""
    result = Dockerfile()
    variables: dict[str, str] = {}
    for line in _logical_lines(text):
        instruction, _, argument = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            result = Dockerfile()
            variables = {}
        elif instruction == "ARG":
            name, has_default, default = argument.strip().partition("=")
            value = build_args.get(name, default.strip().strip('"') if has_default else "")
            variables[name] = value
        elif instruction == "ENV":
            for token in shlex.split(argument):
                key, has_value, value = token.partition("=")
                if has_value:
                    value = _substitute(value, {**variables, **result.env})
                    result.env[key] = value
                    variables[key] = value
        elif instruction == "WORKDIR":
            path = _substitute(argument.strip(), {**variables, **result.env})
            result.workdir = path if path.startswith("/") else f"{result.workdir.rstrip('/')}/{path}"
        elif instruction == "CMD":
            result.cmd = _exec_or_shell(argument)
        elif instruction == "ENTRYPOINT":
            result.entrypoint = _exec_or_shell(argument)
    return result
