"""Inspection commands of the `saga` CLI: streams, tail, pending, dead letters, outbox, trace,
and the generated documents (AsyncAPI, Mermaid)."""

from __future__ import annotations

import click

from sagactl.inspect import dead_letters, documents, outbox, streams, trace

COMMANDS: list[click.Command] = [
    *streams.COMMANDS,
    *dead_letters.COMMANDS,
    *outbox.COMMANDS,
    *trace.COMMANDS,
    *documents.COMMANDS,
]
