"""The agent's settings, read once from the environment (names as Dream's agent uses them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.settings_support import CommaList, RepoPath, ServiceSettings, SettingsError

DEFAULT_PIPELINE = "assistant_dists/universal_prompted_assistant/pipeline_conf.json"


__all__ = ["Settings", "SettingsError"]


class Settings(ServiceSettings):
    """Everything the agent reads from its environment, documented by field."""

    service_name: str = Field("agent", description="the name in logs and /health")
    service_port: int = Field(4242, ge=1, le=65535, description="the port gunicorn binds on 0.0.0.0")
    pipeline_config: RepoPath = Field(
        DEFAULT_PIPELINE, validate_default=True,
        description="the distribution's pipeline_conf.json (relative to the repository root)",
    )
    state_db_path: RepoPath = Field(
        ".parley/agent-state.sqlite3", validate_default=True,
        description="the SQLite file of users, dialogs and utterances (relative to the repository root), where STATE_URL is unset",
    )
    state_url: str | None = Field(
        None,
        description="where dialogs live: sqlite:///PATH (one agent) or postgresql://USER:PASSWORD@HOST:PORT/DB "
        "(shared by every agent replica); unset: sqlite:/// + STATE_DB_PATH",
    )
    state_pool_size: int = Field(10, ge=1, description="PostgreSQL connections per agent process, at most")
    state_connect_timeout: float = Field(60.0, gt=0, description="seconds to wait at start for the PostgreSQL server")
    wait_hosts: CommaList = Field((), description="`host:port, ...` that must accept connections before /health is 200")
    response_time_limit: float = Field(
        90.0, gt=0, description="seconds a turn may take before the timeout_service answers"
    )
    max_request_bytes: int = Field(64 * 1024, ge=1024, description="the largest request body")
    max_payload_chars: int = Field(4000, ge=1, description="the longest user utterance")
    service_threads: int = Field(32, ge=1, description="calls to services that may run at once")
    language: Literal["EN", "RU"] = Field(
        "EN", description="the distribution's language (Dream's LANGUAGE): the stop words the skill selector leaves out, "
        "and the agent's own answer when nothing answered and the pipeline has no last-chance service",
    )

    @field_validator("language", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def state_location(self) -> str:
        """The STATE_URL the agent opens: STATE_URL, else the SQLite file STATE_DB_PATH."""
        return self.state_url or "sqlite:///" + str(self.state_db_path)
