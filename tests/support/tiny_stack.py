"""The universal prompted assistant as real gunicorn processes on loopback, on the tiny model:
LLM service -> prompted skill -> agent. For tests that need the whole stack fast (fuzzing, soak);
tests/conftest.py offers the LLM and the skill as session fixtures (`tiny_llm`, `tiny_skill`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from support.servers import REPO_ROOT, RunningServer, service_server
from support.tiny_model import tiny_model_dir

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
    with service_server("transformers_lm", {
        "SERVICE_NAME": "transformers-lm-tiny", "BACKEND": "transformers",
        "PRETRAINED_MODEL_NAME_OR_PATH": str(tiny_model_dir()), "GENERATIVE_CONFIG": str(config),
        "DEVICE": "cpu", "OMP_NUM_THREADS": "1", **TINY_CAPS, **env,
    }) as server:
        yield server


def tiny_generative_config(folder: Path) -> Path:
    path = folder / "tiny-generative-config.json"
    path.write_text(json.dumps(TINY_GENERATIVE_CONFIG))
    return path


@contextlib.contextmanager
def skill_service(folder: Path, llm: RunningServer, **env: str) -> Iterator[RunningServer]:
    """skills/prompted_skill asking `llm`, with the tiny generative config."""
    llm_url = llm.url("/respond")
    with service_server("prompted_skill", {
        "SERVICE_NAME": "prompted_skill", "GENERATIVE_SERVICE_URL": llm_url,
        "GENERATIVE_SERVICE_CONFIG": str(tiny_generative_config(folder)),
        "GENERATIVE_TIMEOUT": "20", "PROMPT": "Respond like a friendly chatbot.",
        "LLM_ENDPOINTS": json.dumps({llm_url: {"key_env_vars": []}}), **env,
    }) as server:
        yield server


def write_pipeline(folder: Path, skill: RunningServer) -> Path:
    """The distribution's pipeline, its prompted skill pointing at `skill`."""
    pipeline = json.loads(DIST_PIPELINE.read_text())
    pipeline["services"]["skills"]["prompted_skill"]["connector"]["url"] = skill.url("/respond")
    path = folder / "pipeline_conf.json"
    path.write_text(json.dumps(pipeline))
    return path


@contextlib.contextmanager
def agent_service(folder: Path, skill: RunningServer, state_db: Path, port: int | None = None,
                  **env: str) -> Iterator[RunningServer]:
    """services/agent running the distribution's pipeline with `skill`, its state in `state_db`."""
    with service_server("agent", {
        "PIPELINE_CONFIG": str(write_pipeline(folder, skill)), "STATE_DB_PATH": str(state_db),
        "WAIT_HOSTS": skill.base_url.removeprefix("http://"), **env,
    }, port=port) as server:
        yield server
