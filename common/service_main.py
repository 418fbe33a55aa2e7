"""What every service's `server.py` does for gunicorn: set up logging, build the app, and stop with
one line, not a traceback, when the service cannot start (any `common.validation.StartupError`:
a setting it cannot use, a model it cannot load, a pipeline it cannot run)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from flask import Flask

from common import logs
from common.validation import StartupError

# gunicorn's "worker failed to boot": the master stops instead of starting the worker again.
WORKER_BOOT_ERROR = 3


def app_or_exit(create_app: Callable[[], Flask], service: str) -> Flask:
    """The service's app; on a StartupError, log `cannot start: <message>` and exit."""
    logs.configure()  # text until the app reads LOG_FORMAT (common/service_layer.py)
    try:
        return create_app()
    except StartupError as error:
        logging.getLogger(service).error("cannot start: %s", error)
        sys.exit(WORKER_BOOT_ERROR)


def stop_worker(logger: logging.Logger, message: str) -> None:
    """Stop the process from any thread (a model that failed to load in the background): log
    `cannot start: <message>` and exit as a worker that failed to boot, so gunicorn stops too."""
    logger.error("cannot start: %s", message)
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)
