"""What gunicorn imports: `gunicorn server:app`, run from this folder (its gunicorn.conf.py holds the settings)."""

from common.service_main import app_or_exit
from services.autoscaler.app import create_app

app = app_or_exit(create_app, "autoscaler")
