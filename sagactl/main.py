"""Entry point of the `saga` console script; each command group lives in its own module."""

from __future__ import annotations

import click

from benchmarks import cli as benchmarks_cli
from sagactl import audit, chaos, inspect, processes, recovery, stack_commands
from sagactl.console import command as console_command


@click.group()
def cli() -> None:
    """Choreographed order saga: processes, dev stack and inspection."""


for module in (
    processes,
    recovery,
    stack_commands,
    inspect,
    audit,
    chaos,
    benchmarks_cli,
    console_command,
):
    for command in module.COMMANDS:
        cli.add_command(command)


if __name__ == "__main__":
    cli()
