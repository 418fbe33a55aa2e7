"""What gunicorn imports: `gunicorn --config python:common.gunicorn_conf server:app`."""

from common.service_main import app_or_exit
from services.agent.app import create_app

app = app_or_exit(create_app, "agent")
