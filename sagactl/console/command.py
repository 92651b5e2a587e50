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
from service_runtime.auth import AuthConfigError, Verifier
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
    environment, else the stack of `make run-all`). Every page needs an operator's login: an
    admin token (`saga token admin`) verified like the REST APIs verify it (AUTH_PUBLIC_KEY_FILE
    or AUTH_JWKS_URL); the session is signed with a key in the run folder's secrets.
    """
    setup_logging("saga", "console")
    log = logging.getLogger("saga.console")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request (polling)
    port = port or console_port()
    try:
        verifier = Verifier.from_settings()  # the APIs' own settings: the same tokens log in
    except (AuthConfigError, OSError) as err:
        raise click.ClickException(f"the console cannot verify operator logins: {err}") from err
    auth.session_key()  # created now (0600), not by the first request
    if missing := assets.missing():
        log.warning(
            "console: browser assets missing (%s): run `make console-assets`", ", ".join(missing)
        )
    connections = Connections()
    monitor = Monitor(connections)
    app = create_app(port=port, monitor=monitor, connections=connections, verifier=verifier)
    server = make_server("127.0.0.1", port, app, threaded=True)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    monitor.start()
    log.info("console on http://127.0.0.1:%s (log in with `saga token admin`)", port)
    try:
        server.serve_forever()
    finally:
        monitor.stop()
        server.server_close()


COMMANDS: list[click.Command] = [console]
