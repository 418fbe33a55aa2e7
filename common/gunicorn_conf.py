"""gunicorn's settings for every Parley service, taken from the service's own Settings.

Each service folder holds a `gunicorn.conf.py` that calls `gunicorn_settings(Settings)`. gunicorn
reads that file from its working directory, so Dream's habit, a plain `gunicorn server:app` run
from the service's folder, gets the right port and threaded worker. The values come from the
settings every service has (`common/settings_support.ServiceSettings`): SERVICE_PORT (bound on
0.0.0.0), GUNICORN_THREADS, GUNICORN_TIMEOUT, GUNICORN_GRACEFUL_TIMEOUT and LOG_LEVEL. One worker, so
a model is loaded once per service; threads serve concurrent requests (an LLM service's engine
schedules their generation). The worker drains on SIGTERM (common/gunicorn_worker.py): it answers
new requests 503 and stops once those it has are answered, within GUNICORN_GRACEFUL_TIMEOUT.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from gunicorn.glogging import Logger

from common import logs
from common.service_main import WORKER_BOOT_ERROR
from common.settings_support import ServiceSettings, SettingsError

# The service's LOG_FORMAT, for GunicornLogger (gunicorn builds its logger after reading this config).
_log_format = "text"


class GunicornLogger(Logger):
    """gunicorn's logger with the service's format: each line has the request's trace id, and is
    JSON with LOG_FORMAT=json. The access line is written in the thread that served the request,
    where the trace id is still the request's."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                logs.prepare_handler(handler, _log_format)


def gunicorn_settings(settings_class: type[ServiceSettings]) -> dict[str, Any]:
    """gunicorn's settings for a service; a setting that cannot be used stops gunicorn with one line."""
    global _log_format
    try:
        settings = settings_class.from_env()
    except SettingsError as error:
        logs.configure()
        logging.getLogger("gunicorn.conf").error("cannot start: %s", error)
        sys.exit(WORKER_BOOT_ERROR)
    _log_format = settings.log_format
    host = f"[{settings.service_host}]" if ":" in settings.service_host else settings.service_host
    return {
        "bind": f"{host}:{settings.service_port}",
        "workers": 1,
        "worker_class": "common.gunicorn_worker.DrainingThreadWorker",
        "threads": settings.gunicorn_threads,
        # Generation can take minutes on a CPU; a worker that is busy generating must not be killed.
        "timeout": settings.gunicorn_timeout,
        # How long a stopping worker may finish its requests before the master kills it.
        "graceful_timeout": settings.gunicorn_graceful_timeout,
        "keepalive": 5,
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": settings.log_level,
        "logger_class": GunicornLogger,
        # Import the app in the worker, not the master: models load in a background thread of the worker.
        "preload_app": False,
    }
