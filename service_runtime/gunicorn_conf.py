"""gunicorn settings shared by the three web processes (`saga web SERVICE` passes this file).

Read by the gunicorn master before any worker imports the app, which is what lets the
multiprocess metrics directory and the JSON log format apply to every worker.
"""

import json
import os

from gunicorn import util as gunicorn_util

from service_runtime import connection
from service_runtime.logs import dict_config
from service_runtime.metrics import mark_worker_dead

_service = os.environ.get("SAGA_SERVICE", "web")

worker_class = "gthread"
workers = int(os.environ.get("WEB_WORKERS", "2"))
threads = int(os.environ.get("WEB_THREADS", "4"))
control_socket_disable = True
accesslog = "-"
access_log_format = "%(m)s %(U)s%(q)s %(s)s %(b)s %(M)sms"

logconfig_dict = dict_config(_service, "web", extra_loggers=("gunicorn.error", "gunicorn.access"))


def child_exit(_server: object, worker: object) -> None:
    mark_worker_dead(worker.pid)


def pre_request(worker: object, req: object) -> None:
    # gthread runs this hook and the app on the same thread: the app may ask to close (413).
    connection.serving(req)


def post_request(worker: object, req: object, environ: dict, resp: object) -> None:
    connection.served()


def _json_error(sock: object, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own error answers (414 URI too long, 400 bad header, ...) as the JSON every
    other error is (DESIGN.md §4), instead of its HTML page. gunicorn has no hook for the body,
    so this replaces `gunicorn.util.write_error`, which its workers call for every one of them;
    the connection is closed after it, as gunicorn does."""
    body = json.dumps(
        {"code": status_int, "status": reason, "message": mesg or reason}, separators=(",", ":")
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    gunicorn_util.write_nonblock(sock, head + body)


gunicorn_util.write_error = _json_error
