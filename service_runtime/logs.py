"""Structured JSON logs: one object per line with service and process role."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime

# operator: who acted, on the console
_CONTEXT_KEYS = ("event_id", "correlation_id", "order_id", "event_type", "stream", "operator")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, role: str) -> None:
        super().__init__()
        self.service = service
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "role": self.role,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT_KEYS:
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def dict_config(service: str, role: str, extra_loggers: tuple[str, ...] = ()) -> dict:
    """logging.config.dictConfig settings, for processes whose framework configures logging
    itself (gunicorn's logconfig_dict, rq's DICT_CONFIG)."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": "service_runtime.logs.JsonFormatter", "service": service, "role": role}
        },
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json"}},
        "root": {"handlers": ["stdout"], "level": level},
        "loggers": {
            name: {"handlers": ["stdout"], "level": level, "propagate": False}
            for name in extra_loggers
        },
    }


def setup_logging(service: str, role: str) -> None:
    """Level from LOG_LEVEL (default INFO)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service, role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
