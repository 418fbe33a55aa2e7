"""gunicorn's settings for the autoscaler, which gunicorn reads from its working directory: a plain
`gunicorn server:app` run from this folder binds SERVICE_PORT with the threaded worker."""

import sys
from pathlib import Path

# The repository root (/app in the image), so `common` and `services` import without PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.gunicorn_conf import gunicorn_settings  # noqa: E402
from services.autoscaler.settings import Settings  # noqa: E402

globals().update(gunicorn_settings(Settings))
