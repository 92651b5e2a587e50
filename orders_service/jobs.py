"""rq jobs of the orders service: work driven by stored state, not by an event."""

from __future__ import annotations

from orders_service import commands, storage
from service_runtime import tracing
from service_runtime.config import database_url
from service_runtime.db import connect
from service_runtime.metrics import JOBS_RUN
from service_runtime.unit_of_work import UnitOfWork, count_emitted


def sweep_payment_deadlines(limit: int = 500, url: str | None = None) -> int:
    """Cancel pending orders whose payment deadline passed (reason payment_timeout).

    Runs every PAYMENT_SWEEP_SECONDS from the rq cron scheduler. Rows a reaction holds are
    skipped and looked at on the next sweep, so a payment landing at the same moment wins or
    loses cleanly: either confirmed first, or cancelled first and then refunded by billing.
    """
    with connect(url or database_url("orders")) as conn:
        with conn.transaction():
            uow = UnitOfWork(conn)
            overdue = storage.lock_overdue(conn, limit)
            for order_id in overdue:
                # a new trace per timed-out order: the compensations that follow join it
                with tracing.job_span("payment deadline passed", **{"saga.order_id": order_id}):
                    commands.cancel(uow, order_id, "payment_timeout")
        count_emitted("orders", uow.emitted)
    if overdue:
        tracing.flush()  # the compensations' traces start here: exported now, not later
    JOBS_RUN.labels("sweep_payment_deadlines").inc()
    return len(overdue)
