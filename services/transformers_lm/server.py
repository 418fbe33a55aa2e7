"""What gunicorn imports: `gunicorn --config python:common.gunicorn_conf server:app`, run from this folder."""

import logging
import sys

from transformers.utils import logging as transformers_logging

from services.transformers_lm.app import StartupError, create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
transformers_logging.disable_progress_bar()
try:
    app = create_app()
except StartupError as error:
    logging.getLogger("transformers_lm").error("cannot start: %s", error)
    sys.exit(3)  # gunicorn's "worker failed to boot": the master stops instead of retrying
