"""`saga asyncapi` and `saga diagram`: the system's event documents, generated from code."""

from __future__ import annotations

import json

import click

from sagactl.inspect.diagrams import designed_saga
from service_runtime import asyncapi as asyncapi_docs
from service_runtime.config import SERVICES, ConfigError, stream_partitions


@click.command()
@click.option(
    "--service",
    type=click.Choice(SERVICES),
    help="Only this service's part (what it serves at /asyncapi.json).",
)
def asyncapi(service: str | None) -> None:
    """Print the AsyncAPI 3.0 document of the system's events (JSON), generated from contracts/.

    Channels are the streams (with their partitioning: STREAM_PARTITIONS), messages the event
    types and versions, operations what each service sends and receives."""
    try:
        partitions = stream_partitions()
    except ConfigError as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(asyncapi_docs.document(service, partitions), indent=2))


@click.command()
def diagram() -> None:
    """Print the designed saga as a Mermaid sequenceDiagram, from the reaction tables in code
    (each service's reactions.HANDLERS and contracts' PRODUCER_OF_EVENT)."""
    click.echo(designed_saga(), nl=False)


COMMANDS: list[click.Command] = [asyncapi, diagram]
