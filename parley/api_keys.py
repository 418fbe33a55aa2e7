"""The distribution's API keys on this machine: `.env_secret`, which `parley secrets init` writes.

Every service of a distribution reads the file through its compose `env_file` (optional: without it
the services run without keys, and warn at start when they listen beyond this machine), so
`docker compose` and `parley up` give every service the same PARLEY_API_KEYS. The file is
git-ignored and left out of the images (.dockerignore) and of `parley export`'s bundles (the site
that imports one gets its own key); `parley stack` passes the key to a swarm as the Docker secret
`parley_api_keys`, never as plain environment.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap

SECRET_FILE = ".env_secret"
VARIABLE = "PARLEY_API_KEYS"
# The Docker secret a swarm stack reads the keys from (`docker secret create parley_api_keys -`).
DOCKER_SECRET = "parley_api_keys"
KEY_BYTES = 32
HEADER = (
    "# Written by `parley secrets init`: the API keys of this checkout's distributions (PARLEY_API_KEYS,\n"
    "# comma-separated; every route but /health and /ping needs one). Compose files read it (env_file);\n"
    "# git ignores it. Never commit it, never paste it into a compose file.\n"
)


class SecretsError(RuntimeError):
    """The key file cannot be written or read; the message says how to fix it."""


def new_key() -> str:
    """A random key: 32 bytes from the OS's generator, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(KEY_BYTES)


def secret_env_file() -> CommentedMap:
    """The compose `env_file` entry every service of a distribution has (`parley check` verifies it):
    `{path: .env_secret, required: false}`, so a checkout without keys still runs."""
    entry = CommentedMap([("path", SECRET_FILE), ("required", False)])
    entry.fa.set_flow_style()
    return entry


def env_file_paths(service: Any) -> list[str]:
    """The paths of a compose service's `env_file` (a string, a `{path, required}` entry, or a list of them)."""
    env_files = (service or {}).get("env_file") if isinstance(service, dict) else None
    if isinstance(env_files, (str, dict)):
        env_files = [env_files]
    return [str(item.get("path") if isinstance(item, dict) else item) for item in env_files or []]


def secret_path(folder: Path) -> Path:
    return folder / SECRET_FILE


def write_key_file(folder: Path, *, replace: bool = False) -> Path:
    """Write `.env_secret` with a new random key (readable by its owner only); SecretsError if one
    exists and `replace` is not set (its key is in use: replacing it locks clients out)."""
    path = secret_path(folder)
    if path.exists() and not replace:
        raise SecretsError(f"{path} exists already (its key is in use); pass --force to replace it with a new key")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"{HEADER}{VARIABLE}={new_key()}\n")
    path.chmod(0o600)
    return path


def read_keys(folder: Path) -> list[str]:
    """The keys in `.env_secret` (empty when there is no file)."""
    path = secret_path(folder)
    if not path.is_file():
        return []
    keys: list[str] = []
    for line in path.read_text().splitlines():
        name, separator, value = line.strip().partition("=")
        if separator and name.strip() == VARIABLE:
            keys.extend(part.strip().strip("'\"") for part in value.split(",") if part.strip())
    return keys


def first_key(folder: Path) -> str:
    """The key clients use (the first); SecretsError when there is none."""
    keys = read_keys(folder)
    if not keys:
        raise SecretsError(f"no key in {secret_path(folder)}: run `parley secrets init` first")
    return keys[0]
