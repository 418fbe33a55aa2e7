"""How every service writes its log: a line per record that carries the request's trace id, as text
or, with LOG_FORMAT=json, as one JSON object per line.

`TraceIdFilter` sits on the handlers (a filter on a logger would miss records that propagate from
its children) and gives each record `trace_id`: the current request's (common/tracing.py), or "-"
outside a request. gunicorn's own handlers get the same filter and formatter through
`common.gunicorn_conf.GunicornLogger`, so its access lines carry the id too.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from common import tracing

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [trace %(trace_id)s]: %(message)s"
LOG_FORMATS = ("text", "json")


class TraceIdFilter(logging.Filter):
    """Adds `trace_id` to every record: the current request's, or "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id = tracing.current_trace_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, trace_id, and the
    traceback as `exception` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", None) or tracing.current_trace_id() or "-",
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def prepare_handler(handler: logging.Handler, log_format: str) -> None:
    """Give a handler the trace id filter (once) and the formatter of `log_format`."""
    if not any(isinstance(existing, TraceIdFilter) for existing in handler.filters):
        handler.addFilter(TraceIdFilter())
    handler.setFormatter(formatter(log_format))


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """The root logger of a service process: one handler to stderr, with the trace id on each line."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        prepare_handler(handler, log_format)
    root.setLevel(level)
