"""`saga audit`: the consistency invariants of DESIGN.md §3 checked across the three services."""

from __future__ import annotations

import click

from sagactl.audit.command import audit, run_audit

COMMANDS: list[click.Command] = [audit]

__all__ = ["COMMANDS", "run_audit"]
