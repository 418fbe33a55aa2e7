"""What gunicorn imports: `gunicorn --config python:common.gunicorn_conf server:app`."""

from common.service_main import app_or_exit
from skills.prompted_skill.app import create_app

app = app_or_exit(create_app, "prompted_skill")
