"""What gunicorn imports: `gunicorn --config python:common.gunicorn_conf server:app`."""

from common.service_main import app_or_exit
from common.settings_support import SettingsError
from services.agent.app import create_app
from services.agent.store import StoreError

app = app_or_exit(create_app, "agent", (SettingsError, StoreError))
