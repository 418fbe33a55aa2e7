"""The universal prompted assistant as real gunicorn processes on loopback, on the tiny model:
LLM service -> prompted skill -> agent. For tests that need the whole stack fast (fuzzing, soak)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from support.servers import REPO_ROOT, VENV_BIN, RunningServer, free_port, running_server
from support.tiny_model import tiny_model_dir

GUNICORN = [str(VENV_BIN / "gunicorn"), "--config", "python:common.gunicorn_conf", "server:app"]
DIST_PIPELINE = REPO_ROOT / "assistant_dists" / "universal_prompted_assistant" / "pipeline_conf.json"
# Short answers keep each request in milliseconds; requests may ask for more up to the caps below.
TINY_GENERATIVE_CONFIG = {"max_new_tokens": 8, "min_new_tokens": 1, "do_sample": True, "temperature": 0.9,
                          "top_p": 0.9, "num_return_sequences": 1}
TINY_CAPS = {"MAX_NEW_TOKENS_CAP": "24", "MAX_NUM_RETURN_SEQUENCES": "3"}


@contextlib.contextmanager
def llm_service(folder: Path, **env: str) -> Iterator[RunningServer]:
    """services/transformers_lm serving the tiny model with the transformers backend.

    One torch thread (OMP_NUM_THREADS=1): on a busy 2-core machine more threads spin against each
    other and a one-token answer takes 0.6 s instead of 20 ms.
    """
    config = tiny_generative_config(folder)
    port = free_port()
    with running_server(GUNICORN, port=port, cwd=REPO_ROOT / "services" / "transformers_lm", env={
        "SERVICE_PORT": str(port), "SERVICE_NAME": "transformers-lm-tiny", "BACKEND": "transformers",
        "PRETRAINED_MODEL_NAME_OR_PATH": str(tiny_model_dir()), "GENERATIVE_CONFIG": str(config),
        "DEVICE": "cpu", "OMP_NUM_THREADS": "1", **TINY_CAPS, **env,
    }) as server:
        yield server


def tiny_generative_config(folder: Path) -> Path:
    path = folder / "tiny-generative-config.json"
    path.write_text(json.dumps(TINY_GENERATIVE_CONFIG))
    return path


def skill_env(llm: RunningServer, port: int, folder: Path) -> dict[str, str]:
    llm_url = llm.url("/respond")
    return {
        "SERVICE_PORT": str(port), "SERVICE_NAME": "prompted_skill", "GENERATIVE_SERVICE_URL": llm_url,
        "GENERATIVE_SERVICE_CONFIG": str(tiny_generative_config(folder)),
        "GENERATIVE_TIMEOUT": "20", "PROMPT": "Respond like a friendly chatbot.",
        "LLM_ENDPOINTS": json.dumps({llm_url: {"key_env_vars": []}}),
    }


@contextlib.contextmanager
def skill_service(folder: Path, llm: RunningServer, **env: str) -> Iterator[RunningServer]:
    port = free_port()
    with running_server(GUNICORN, port=port, cwd=REPO_ROOT / "skills" / "prompted_skill",
                        env={**skill_env(llm, port, folder), **env}) as server:
        yield server


def write_pipeline(folder: Path, skill: RunningServer) -> Path:
    """The distribution's pipeline, its prompted skill pointing at `skill`."""
    pipeline = json.loads(DIST_PIPELINE.read_text())
    pipeline["services"]["skills"]["prompted_skill"]["connector"]["url"] = skill.url("/respond")
    path = folder / "pipeline_conf.json"
    path.write_text(json.dumps(pipeline))
    return path


def agent_env(folder: Path, skill: RunningServer, port: int, state_db: Path) -> dict[str, str]:
    return {"SERVICE_PORT": str(port), "PIPELINE_CONFIG": str(write_pipeline(folder, skill)),
            "STATE_DB_PATH": str(state_db), "WAIT_HOSTS": skill.base_url.removeprefix("http://")}


@contextlib.contextmanager
def agent_service(folder: Path, skill: RunningServer, state_db: Path, port: int | None = None,
                  **env: str) -> Iterator[RunningServer]:
    port = port or free_port()
    with running_server(GUNICORN, port=port, cwd=REPO_ROOT / "services" / "agent",
                        env={**agent_env(folder, skill, port, state_db), **env}) as server:
        yield server
