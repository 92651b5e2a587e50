"""gunicorn settings shared by the three web processes (`saga web SERVICE` passes this file).

Read by the gunicorn master before any worker imports the app, which is what lets the
multiprocess metrics directory and the JSON log format apply to every worker.
"""

import os

from service_runtime.metrics import mark_worker_dead

_service = os.environ.get("SAGA_SERVICE", "web")

worker_class = "gthread"
workers = int(os.environ.get("WEB_WORKERS", "2"))
threads = int(os.environ.get("WEB_THREADS", "4"))
control_socket_disable = True
accesslog = "-"
access_log_format = "%(m)s %(U)s%(q)s %(s)s %(b)s %(M)sms"

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {
            "()": "service_runtime.logs.JsonFormatter",
            "service": _service,
            "role": "web",
        }
    },
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json"}},
    "root": {"handlers": ["stdout"], "level": os.environ.get("LOG_LEVEL", "INFO").upper()},
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
        "gunicorn.access": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
    },
}


def child_exit(_server: object, worker: object) -> None:
    mark_worker_dead(worker.pid)
