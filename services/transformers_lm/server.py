"""What gunicorn imports: `gunicorn server:app`, run from this folder (its gunicorn.conf.py holds the settings)."""

from transformers.utils import logging as transformers_logging

from common.service_main import app_or_exit
from services.transformers_lm.app import create_app

transformers_logging.disable_progress_bar()
app = app_or_exit(create_app, "transformers_lm")
