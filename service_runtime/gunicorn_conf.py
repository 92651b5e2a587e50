"""gunicorn settings shared by the three web processes (`saga web SERVICE` passes this file).

Read by the gunicorn master before any worker imports the app, which is what lets the
multiprocess metrics directory and the JSON log format apply to every worker.
"""

import os

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
