"""What gunicorn imports: `gunicorn --config python:common.gunicorn_conf server:app`."""

import logging
import sys

from skills.prompted_skill.app import create_app
from skills.prompted_skill.settings import SettingsError

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
try:
    app = create_app()
except SettingsError as error:
    logging.getLogger("prompted_skill").error("cannot start: %s", error)
    sys.exit(3)  # gunicorn's "worker failed to boot": the master stops instead of retrying
