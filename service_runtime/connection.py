"""Telling gunicorn to close the connection after the current response.

gunicorn drops a `Connection` header set by the application (hop-by-hop) and decides keep-alive
itself; when the application leaves a request body unread, gunicorn drains at most 64 KiB and
otherwise closes the socket after announcing `Connection: keep-alive`, so the client's next
request on it fails. Its `pre_request` hook (service_runtime/gunicorn_conf.py) hands us the
request being served on this thread (gthread runs the hook and the app on the same thread), and
`close_after_response` marks it, which makes gunicorn say `Connection: close` and mean it.
Outside gunicorn (the Flask test client) there is no request registered and nothing happens.
"""

from __future__ import annotations

import threading
from typing import Any

_serving = threading.local()


def serving(server_request: Any) -> None:
    _serving.request = server_request


def served() -> None:
    _serving.request = None


def close_after_response() -> bool:
    """Ask the server to close after this response; False when no server request is known."""
    server_request = getattr(_serving, "request", None)
    if server_request is None or not hasattr(server_request, "force_close"):
        return False
    server_request.force_close()
    return True
