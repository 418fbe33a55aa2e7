"""What gunicorn imports: `gunicorn --config python:common.gunicorn_conf server:app`."""

import logging

from services.openai_api_lm.app import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
