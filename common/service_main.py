"""What every service's `server.py` does for gunicorn: set up logging, build the app, and stop with
one line, not a traceback, when the service cannot start (a setting it cannot use, a model it cannot load)."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from flask import Flask

from common.settings_support import SettingsError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# gunicorn's "worker failed to boot": the master stops instead of starting the worker again.
WORKER_BOOT_ERROR = 3


def app_or_exit(
    create_app: Callable[[], Flask],
    service: str,
    startup_errors: tuple[type[Exception], ...] = (SettingsError,),
) -> Flask:
    """The service's app; on one of `startup_errors`, log `cannot start: <message>` and exit."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        return create_app()
    except startup_errors as error:
        logging.getLogger(service).error("cannot start: %s", error)
        sys.exit(WORKER_BOOT_ERROR)
