"""gunicorn settings shared by every Parley service: `gunicorn --config python:common.gunicorn_conf server:app`.

Run from the service's folder. One worker, so a model is loaded once per service; threads serve
concurrent requests (an LLM service's engine schedules their generation). Environment:
`SERVICE_PORT` (the port bound on 0.0.0.0), `GUNICORN_THREADS` (default 32) and
`GUNICORN_TIMEOUT` (seconds a silent worker may take before it is restarted, default 600).
"""

import os

bind = f"0.0.0.0:{int(os.environ.get('SERVICE_PORT', '8000'))}"
workers = 1
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
# Generation can take minutes on a CPU; a worker that is busy generating must not be killed.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "600"))
graceful_timeout = 10
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# Import the app in the worker, not the master: models load in a background thread of the worker.
preload_app = False
