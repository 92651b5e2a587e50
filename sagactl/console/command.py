"""`saga console`: serve the console on 127.0.0.1:CONSOLE_PORT (8000)."""

from __future__ import annotations

import logging
import signal
import threading

import click
from werkzeug.serving import make_server

from sagactl.console import assets, auth
from sagactl.console.app import create_app
from sagactl.console.monitor import Connections, Monitor
from service_runtime.config import console_port
from service_runtime.logs import setup_logging


@click.command()
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port on 127.0.0.1 (default: CONSOLE_PORT, else 8000).",
)
def console(port: int | None) -> None:
    """The running system in the browser: overview, orders, dead letters (loopback only).

    Reads what `saga streams`, `saga outbox`, `saga dead-letters` and `saga trace` read (the
    environment, else the stack of `make run-all`). Re-driving a dead letter asks for the
    operator password kept in the run folder's secrets (console-operator).
    """
    setup_logging("saga", "console")
    log = logging.getLogger("saga.console")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request (polling)
    port = port or console_port()
    auth.operator_password()  # created now, so the operator can read it before the first re-drive
    if missing := assets.missing():
        log.warning(
            "console: browser assets missing (%s): run `make console-assets`", ", ".join(missing)
        )
    connections = Connections()
    monitor = Monitor(connections)
    app = create_app(port=port, monitor=monitor, connections=connections)
    server = make_server("127.0.0.1", port, app, threaded=True)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    monitor.start()
    log.info("console on http://127.0.0.1:%s (operator password in %s)", port, auth.password_file())
    try:
        server.serve_forever()
    finally:
        monitor.stop()
        server.server_close()


COMMANDS: list[click.Command] = [console]
