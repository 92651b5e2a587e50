"""Every log line is one JSON object with service, role and the event context."""

from __future__ import annotations

import json
import logging

from service_runtime.logs import JsonFormatter


def record(**extra) -> logging.LogRecord:
    rec = logging.LogRecord("saga.test", logging.WARNING, __file__, 1, "handled %s", ("x",), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_a_line_carries_service_role_and_event_context():
    line = json.loads(
        JsonFormatter("inventory", "consumer").format(
            record(event_id="e-1", correlation_id="c-1", order_id="o-1", unrelated="dropped")
        )
    )
    assert line["service"] == "inventory"
    assert line["role"] == "consumer"
    assert line["level"] == "warning"
    assert line["message"] == "handled x"
    assert (line["event_id"], line["correlation_id"], line["order_id"]) == ("e-1", "c-1", "o-1")
    assert "unrelated" not in line


def test_exceptions_are_kept_inside_the_json_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record()
        rec.exc_info = sys.exc_info()
    text = JsonFormatter("orders", "web").format(rec)
    assert "\n" not in text  # one line, even with a multi-line traceback
    assert "ValueError: boom" in json.loads(text)["error"]
