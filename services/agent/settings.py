"""The agent's settings, read once from the environment (names as Dream's agent uses them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.settings_support import REPO_ROOT, SettingsError, env_values, resolve_repo_path, settings_error

DEFAULT_PIPELINE = "assistant_dists/universal_prompted_assistant/pipeline_conf.json"


__all__ = ["Settings", "SettingsError"]


class Settings(BaseModel):
    """Everything the agent reads from its environment, documented by field."""

    model_config = ConfigDict(frozen=True)

    service_name: str = Field("agent", description="SERVICE_NAME: the name in logs and /health")
    service_port: int = Field(4242, description="SERVICE_PORT: the port gunicorn binds")
    pipeline_config: Path = Field(
        REPO_ROOT / DEFAULT_PIPELINE,
        description="PIPELINE_CONFIG: the distribution's pipeline_conf.json (relative to the repository root)",
    )
    state_db_path: Path = Field(
        REPO_ROOT / ".parley" / "agent-state.sqlite3",
        description="STATE_DB_PATH: the SQLite file of users, dialogs and utterances, where STATE_URL is unset",
    )
    state_url: str | None = Field(
        None,
        description="STATE_URL: where dialogs live: sqlite:///PATH (one agent) or postgresql://USER:PASSWORD@HOST:PORT/DB "
        "(shared by every agent replica); unset: sqlite:/// + STATE_DB_PATH",
    )
    state_pool_size: int = Field(10, ge=1, description="STATE_POOL_SIZE: PostgreSQL connections per agent process, at most")
    state_connect_timeout: float = Field(
        60.0, gt=0, description="STATE_CONNECT_TIMEOUT: seconds to wait at start for the PostgreSQL server"
    )
    wait_hosts: list[str] = Field(
        default_factory=list, description="WAIT_HOSTS: `host:port, ...` that must accept connections before /health is 200"
    )
    response_time_limit: float = Field(
        90.0, gt=0, description="RESPONSE_TIME_LIMIT: seconds a turn may take before the timeout_service answers"
    )
    max_request_bytes: int = Field(64 * 1024, ge=1024, description="MAX_REQUEST_BYTES: the largest request body")
    max_payload_chars: int = Field(4000, ge=1, description="MAX_PAYLOAD_CHARS: the longest user utterance")
    service_threads: int = Field(32, ge=1, description="SERVICE_THREADS: calls to services that may run at once")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict = env_values(
            env,
            ("service_name", "service_port", "response_time_limit", "max_request_bytes", "max_payload_chars", "service_threads",
             "state_url", "state_pool_size", "state_connect_timeout"),
        )
        for field, value in env_values(env, ("pipeline_config", "state_db_path")).items():
            values[field] = resolve_repo_path(value)
        values["wait_hosts"] = [host.strip() for host in env.get("WAIT_HOSTS", "").split(",") if host.strip()]
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise settings_error(error) from None

    @property
    def state_location(self) -> str:
        """The STATE_URL the agent opens: STATE_URL, else the SQLite file STATE_DB_PATH."""
        return self.state_url or "sqlite:///" + str(self.state_db_path)


