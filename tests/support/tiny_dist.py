"""A tiny distribution for `parley up` tests: two http.server services built from their own Dockerfiles."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

# One service: /health (503 for HEALTHY_AFTER seconds, then 200), /env (what it was started with),
# /fetch (GETs UPSTREAM_URL: proves the hostname rewriting). DIE_AFTER makes it exit with code 3.
SERVER = textwrap.dedent(
    '''
    import json, os, sys, threading, time, urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    started = time.monotonic()
    port = int(os.environ["SERVICE_PORT"])
    upstream_healthy_at_start = None
    if os.environ.get("UPSTREAM_URL"):
        health = os.environ["UPSTREAM_URL"].rsplit("/", 1)[0] + "/health"
        try:
            upstream_healthy_at_start = urllib.request.urlopen(health, timeout=2).status == 200
        except Exception:
            upstream_healthy_at_start = False
    config_file = os.environ.get("CONFIG_FILE")

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                ready = time.monotonic() - started >= float(os.environ.get("HEALTHY_AFTER", "0"))
                self._send(200 if ready else 503, {"ready": ready})
            elif self.path == "/env":
                self._send(200, {
                    "pid": os.getpid(),
                    "cwd": os.getcwd(),
                    "env": {key: os.environ.get(key) for key in ("UPSTREAM_URL", "CONFIG_FILE", "GREETING", "PYTHONPATH", "DATA_DIR", "STATE_FILE")},
                    "config": open(config_file).read() if config_file else None,
                    "upstream_healthy_at_start": upstream_healthy_at_start,
                })
            elif self.path == "/fetch":
                self._send(200, {"upstream": urllib.request.urlopen(os.environ["UPSTREAM_URL"], timeout=5).read().decode()})
            elif self.path == "/hello":
                self._send(200, {"greeting": os.environ.get("GREETING", "")})
            else:
                self._send(404, {"error": {"message": "no such path", "field": None}})

        def log_message(self, format, *args):
            print("request", self.path, flush=True)

    if os.environ.get("DIE_AFTER"):
        threading.Timer(float(os.environ["DIE_AFTER"]), lambda: os._exit(3)).start()
    print(f"listening on {port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    '''
)

DOCKERFILE = textwrap.dedent(
    '''
    # A service of the tiny test distribution.
    ARG BASE_IMAGE=python:3.11-slim
    FROM ${BASE_IMAGE}
    ARG SERVICE_PORT=8000
    ENV SERVICE_PORT=${SERVICE_PORT} \\
        PYTHONPATH=/app \\
        DATA_DIR=/var/lib/tiny
    WORKDIR /app/services/{name}
    CMD ["python", "server.py"]
    '''
)


def write_tiny_distribution(root: Path, alpha_port: int, beta_port: int, *, beta_environment: dict | None = None) -> Path:
    """A checkout with distribution `tiny`: beta depends on alpha and calls it by its compose name."""
    for name in ("alpha", "beta"):
        folder = root / "services" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "server.py").write_text(SERVER)
        (folder / "Dockerfile").write_text(DOCKERFILE.replace("{name}", name))
    (root / "services" / "beta" / "config.json").write_text(json.dumps({"alpha": f"http://alpha:{alpha_port}/hello"}))
    (root / "components").mkdir(exist_ok=True)
    (root / "docker-compose.yml").write_text("services: {}\n")
    dist = root / "assistant_dists" / "tiny"
    dist.mkdir(parents=True, exist_ok=True)
    beta_env = {
        "UPSTREAM_URL": f"http://alpha:{alpha_port}/hello",
        "CONFIG_FILE": "services/beta/config.json",
        **(beta_environment or {}),
    }
    override = {
        "services": {
            "alpha": {
                "build": {"context": ".", "dockerfile": "services/alpha/Dockerfile", "args": {"SERVICE_PORT": alpha_port}},
                "environment": {"GREETING": "hello from alpha", "HEALTHY_AFTER": "1"},
            },
            "beta": {
                "build": {"context": ".", "dockerfile": "services/beta/Dockerfile", "args": {"SERVICE_PORT": beta_port}},
                "environment": beta_env,
                "depends_on": {"alpha": {"condition": "service_healthy"}},
            },
        }
    }
    (dist / "docker-compose.override.yml").write_text(json.dumps(override, indent=2))
    return root
