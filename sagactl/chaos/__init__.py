"""`saga chaos`: a soak of the whole system under process kills and server crashes, then the
audit. Pieces: servers (embedded PostgreSQL/Redis and their crashes), supervisor (restartable
processes from the Procfile), load (clients), faults (the injector), observe (measurements)."""

from __future__ import annotations

import click

from sagactl.chaos.command import chaos

COMMANDS: list[click.Command] = [chaos]
