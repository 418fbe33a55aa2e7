"""Fixtures shared by the whole suite.

- `tiny_model_path`: the folder of the tiny Llama the tests build (support/tiny_model.py), for fast
  unit tests of the LLM service;
- `tiny_llm`, `tiny_skill`: real gunicorn processes on loopback, started once per session: the
  LLM service on the tiny model, and the prompted skill asking it (support/tiny_stack.py);
- `embedded_lm`: the LLM service on the embedded SmolLM2 (the transformers backend, which runs the
  same everywhere), started once per session, for the behaviour users see;
- `postgres`: a real PostgreSQL server for the session (support/postgres.py); each test makes its own database.

Each server takes a free port, is polled on /health until ready, shows its log if it dies and is
stopped at the end of the session. A test that changes a server's settings starts its own with
`support.servers.service_server`.
"""

import sys
from pathlib import Path

import pytest

# tests/support is imported as `support` by every test module.
sys.path.insert(0, str(Path(__file__).parent))

from support.servers import service_server  # noqa: E402
from support.tiny_model import tiny_model_dir  # noqa: E402
from support.tiny_stack import llm_service, skill_service  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_stack_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-stack")


@pytest.fixture(scope="session")
def tiny_llm(tiny_stack_folder):
    with llm_service(tiny_stack_folder) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_skill(tiny_stack_folder, tiny_llm):
    with skill_service(tiny_stack_folder, tiny_llm) as server:
        yield server


@pytest.fixture(scope="session")
def embedded_lm():
    env = {"PRETRAINED_MODEL_NAME_OR_PATH": "smollm2-135m-instruct", "BACKEND": "transformers"}
    with service_server("transformers_lm", env, startup_timeout_seconds=300) as server:
        yield server


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/support/postgres.py); each test makes its own database."""
    from support.postgres import postgres_server

    with postgres_server() as server:
        yield server
