"""Prometheus for a Parley distribution: write its scrape config from the environment, then run it.

The same script runs in the image (services/prometheus/Dockerfile) and under `parley up
--monitoring` (Debian's `prometheus` binary on this machine): stdlib only, no Parley imports.

Environment (monitoring.yml sets it; `parley generate` writes SCRAPE_TARGETS from the cards):
  SCRAPE_TARGETS           `job=host:port, ...`: every service of the distribution
  SCRAPE_INTERVAL          how often each is scraped (default 5s)
  PARLEY_API_KEYS          the distribution's keys (or PARLEY_API_KEYS_FILE, a Docker secret): the
                           first is sent as `Authorization: Bearer`, read from a file of its own
                           (mode 600) in DATA_DIR, never written into the config
  SERVICE_HOST, SERVICE_PORT   where Prometheus listens (default 0.0.0.0:9090)
  DATA_DIR                 its storage, the written config and the key file
  RETENTION                how long samples are kept (default 7d)

In a Swarm stack a service name stands for its replicas: where `tasks.<service>` resolves, each
replica is found by DNS (dns_sd_configs) and scraped on its own; elsewhere (compose, parley up) the
`host:port` itself is the target.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable, Mapping

DEFAULT_PORT = 9090


class ConfigError(ValueError):
    """The environment does not describe a usable Prometheus; the message names the variable."""


def parse_targets(text: str) -> list[tuple[str, str, int]]:
    """`job=host:port, ...` as (job, host, port) triples."""
    targets = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        job, separator, address = entry.partition("=")
        host, _, port = address.rpartition(":")
        if not separator or not job or not host or not port.isdigit():
            raise ConfigError(f"SCRAPE_TARGETS: {entry!r} is not job=host:port")
        targets.append((job.strip(), host.strip(), int(port)))
    if not targets:
        raise ConfigError("SCRAPE_TARGETS is empty: list the services to scrape as job=host:port, ...")
    return targets


def first_key(environ: Mapping[str, str]) -> str | None:
    """The key scrapes send: the first of PARLEY_API_KEYS, else of the file PARLEY_API_KEYS_FILE."""
    keys = [part.strip() for part in environ.get("PARLEY_API_KEYS", "").split(",") if part.strip()]
    file_name = environ.get("PARLEY_API_KEYS_FILE", "").strip()
    if not keys and file_name:
        for line in Path(file_name).read_text().splitlines():
            line = line.strip().removeprefix("PARLEY_API_KEYS=")
            if line and not line.startswith("#"):
                keys.extend(part.strip() for part in line.split(",") if part.strip())
    return keys[0] if keys else None


def swarm_tasks(host: str) -> str | None:
    """`tasks.<host>` when that name resolves (a Swarm service's replicas), else None."""
    try:
        socket.getaddrinfo(f"tasks.{host}", None)
    except OSError:
        return None
    return f"tasks.{host}"


def scrape_config(
    targets: list[tuple[str, str, int]],
    *,
    interval: str = "5s",
    key_file: str | None = None,
    replicas_name: Callable[[str], str | None] = lambda host: None,
) -> dict:
    """Prometheus' configuration: one job per service, each scraped with the key when there is one."""
    jobs = []
    for job, host, port in targets:
        entry: dict = {"job_name": job, "metrics_path": "/metrics", "scrape_interval": interval}
        if key_file:
            entry["authorization"] = {"type": "Bearer", "credentials_file": key_file}
        replicas = replicas_name(host)
        if replicas:
            entry["dns_sd_configs"] = [{"names": [replicas], "type": "A", "port": port}]
        else:
            entry["static_configs"] = [{"targets": [f"{host}:{port}"]}]
        jobs.append(entry)
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": jobs}


def prepare(environ: Mapping[str, str]) -> list[str]:
    """Write the config (and the key file) into DATA_DIR; the command line that runs Prometheus."""
    data_dir = Path(environ.get("DATA_DIR") or "/var/lib/parley/prometheus")
    data_dir.mkdir(parents=True, exist_ok=True)
    targets = parse_targets(environ.get("SCRAPE_TARGETS", ""))
    key = first_key(environ)
    key_file = None
    if key:
        key_path = data_dir / "scrape-key"
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(key)
        key_file = str(key_path)
    config = scrape_config(targets, interval=environ.get("SCRAPE_INTERVAL") or "5s", key_file=key_file,
                           replicas_name=swarm_tasks)
    config_path = data_dir / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    host = environ.get("SERVICE_HOST") or "0.0.0.0"
    port = environ.get("SERVICE_PORT") or str(DEFAULT_PORT)
    print(f"prometheus: scraping {', '.join(f'{job} ({h}:{p})' for job, h, p in targets)} every "
          f"{config['global']['scrape_interval']}, {'with' if key_file else 'without'} an API key; "
          f"listening on {host}:{port}", flush=True)
    return [
        "prometheus",
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data_dir / 'data'}",
        f"--storage.tsdb.retention.time={environ.get('RETENTION') or '7d'}",
        f"--web.listen-address={host}:{port}",
    ]


def main() -> None:
    try:
        command = prepare(os.environ)
    except (ConfigError, OSError) as error:
        sys.exit(f"prometheus: cannot start: {error}")
    if shutil.which(command[0]) is None:
        sys.exit("prometheus: cannot start: no `prometheus` binary on PATH (Debian: apt-get install prometheus)")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
