"""Settings module for `rq worker -c service_runtime.rq_settings`: JSON logs like every process."""

from service_runtime.logs import dict_config
from service_runtime.tracing import configure_tracing

DICT_CONFIG = dict_config("saga", "worker", extra_loggers=("rq.worker",))
# The deadline sweep runs every few seconds (PAYMENT_SWEEP_SECONDS); rq's per-job INFO lines
# would drown everything else.
DICT_CONFIG["loggers"]["rq.worker"]["level"] = "WARNING"

# The worker's composition root: the jobs, run in this process, use its tracing set-up
# (OTEL_*; off without them).
configure_tracing("orders", "worker")
