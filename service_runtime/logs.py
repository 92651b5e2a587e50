"""Structured JSON logs: one object per line with service and process role."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime

_CONTEXT_KEYS = ("event_id", "correlation_id", "order_id", "event_type", "stream")


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


def setup_logging(service: str, role: str) -> None:
    """Level from LOG_LEVEL (default INFO)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service, role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
