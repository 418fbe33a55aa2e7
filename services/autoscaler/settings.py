"""The autoscaler's settings, read once from the environment."""

from __future__ import annotations

from pydantic import Field, SecretStr

from common.settings_support import ServiceSettings, SettingsError

__all__ = ["Settings", "SettingsError"]


class Settings(ServiceSettings):
    """Everything the autoscaler reads from its environment, documented by field."""

    # PARLEY_API_KEYS holds keys: never quoted in an error.
    show_values_in_errors = False

    service_name: str = Field("autoscaler", description="the name in logs and /health")
    service_port: int = Field(8099, ge=1, le=65535, description="the port gunicorn binds on 0.0.0.0 (/health)")
    docker_host: str = Field(
        "unix:///var/run/docker.sock", description="the engine's API: a swarm manager's socket, mounted into the container"
    )
    stack_namespace: str | None = Field(
        None, description="the stack whose services it scales; default: its own stack, read from its container's labels"
    )
    autoscaler_interval_s: float = Field(
        5.0, gt=0, description="seconds between two looks at the replicas (Ray Serve's metrics_interval_s)"
    )
    load_timeout_s: float = Field(3.0, gt=0, description="seconds a replica may take to report its load")

    @property
    def api_key(self) -> SecretStr | None:
        """The key sent to the replicas' /metrics and /health, when the services want one: the first
        of the stack's PARLEY_API_KEYS (a swarm gives them as the Docker secret, PARLEY_API_KEYS_FILE)."""
        return self.parley_api_keys[0] if self.parley_api_keys else None
