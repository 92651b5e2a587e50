"""Settings module for `rq worker -c service_runtime.rq_settings`: JSON logs like every process."""

# rq forks a work-horse for every job, which imports the job's module unless this process
# already has: imported here once, a payment sweep (every few seconds) costs its query, not
# ~170 ms of imports in every work-horse (4.6% of a core, measured with the system idle).
import orders_service.jobs  # noqa: F401
import service_runtime.retention  # noqa: F401
from service_runtime.logs import dict_config
from service_runtime.tracing import configure_tracing

DICT_CONFIG = dict_config("saga", "worker", extra_loggers=("rq.worker", "rq.scheduler"))
# The deadline sweep runs every second; rq's per-job INFO lines would drown everything else.
DICT_CONFIG["loggers"]["rq.worker"]["level"] = "WARNING"

# The worker's composition root: the jobs, forked from this process, inherit the tracing set-up
# (OTEL_*; off without them).
configure_tracing("orders", "worker")
