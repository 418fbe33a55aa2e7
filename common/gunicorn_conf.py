"""gunicorn settings shared by every Parley service: `gunicorn --config python:common.gunicorn_conf server:app`.

Run from the service's folder. One worker, so a model is loaded once per service; threads serve
concurrent requests (an LLM service's engine schedules their generation). Environment:
`SERVICE_PORT` (the port bound on 0.0.0.0; unset, the service's own default from its settings.py),
`GUNICORN_THREADS` (default 32) and `GUNICORN_TIMEOUT` (seconds a silent worker may take before it
is restarted, default 600).
"""

import importlib
import os
import sys
from pathlib import Path

from common.settings_support import REPO_ROOT


def _service_port() -> int:
    raw = os.environ.get("SERVICE_PORT", "").strip()
    if not raw:  # the default the service's Settings document, e.g. 8180 for services/transformers_lm
        try:
            folder = Path.cwd().resolve().relative_to(REPO_ROOT)
            settings = importlib.import_module(".".join(folder.parts) + ".settings")
            return settings.Settings.model_fields["service_port"].default
        except (ValueError, ImportError, AttributeError, KeyError):
            sys.exit(f"SERVICE_PORT is not set, and {Path.cwd()} is not a service's folder with a default: set it")
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        sys.exit(f"SERVICE_PORT must be a port number (1-65535), not {raw!r}")
    return int(raw)


bind = f"0.0.0.0:{_service_port()}"
workers = 1
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
# Generation can take minutes on a CPU; a worker that is busy generating must not be killed.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "600"))
graceful_timeout = 10
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# Import the app in the worker, not the master: models load in a background thread of the worker.
preload_app = False
