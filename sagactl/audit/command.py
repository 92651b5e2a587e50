"""The `saga audit` command: collect, check, print; exit code 1 on any violation."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import click
import psycopg

from sagactl.audit.collect import collect
from sagactl.audit.invariants import check_all, summary
from service_runtime import config

DEFAULT_GRACE_SECONDS = 10.0


def run_audit(db_urls: Mapping[str, str], grace_seconds: float = DEFAULT_GRACE_SECONDS) -> dict:
    """The audit as a JSON-ready report; `violations` is the total over all invariants."""
    snapshot = collect(db_urls)
    results = check_all(snapshot, timedelta(seconds=grace_seconds))
    violations = sum(result.violations for result in results)
    return {
        "ok": violations == 0,
        "violations": violations,
        "checked_at": snapshot.now.isoformat(),
        "grace_seconds": grace_seconds,
        "summary": summary(snapshot),
        "invariants": [result.as_dict() for result in results],
    }


def format_report(report: Mapping[str, Any]) -> str:
    by_status = report["summary"]["orders_by_status"]
    counts = ", ".join(f"{status} {n}" for status, n in by_status.items()) or "none"
    lines = [f"audit at {report['checked_at']}: orders {counts}"]
    for item in report["invariants"]:
        verdict = "ok" if not item["violations"] else f"{item['violations']} VIOLATIONS"
        notes = ", ".join(f"{key} {value}" for key, value in item["notes"].items())
        lines.append(f"  {item['invariant']}. {item['title']}: {verdict}  ({notes})")
        lines.extend(f"       {json.dumps(example, default=str)}" for example in item["examples"])
        hidden = item["violations"] - len(item["examples"])
        if hidden > 0:
            lines.append(f"       ... and {hidden} more")
    total = report["violations"]
    lines.append("all invariants hold" if not total else f"{total} violations")
    return "\n".join(lines)


@click.command()
@click.option(
    "--grace-seconds",
    type=click.FloatRange(min=0),
    default=DEFAULT_GRACE_SECONDS,
    show_default=True,
    help="A pending order is a violation only this long after its payment deadline.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def audit(grace_seconds: float, as_json: bool) -> None:
    """Check the consistency invariants across orders, inventory and billing (exit 1 if broken).

    Meant for a quiet system: orders still in flight are counted, not judged, until their
    payment deadline plus the grace has passed.
    """
    try:
        urls = {service: config.database_url(service) for service in config.SERVICES}
        report = run_audit(urls, grace_seconds)
    except config.ConfigError as err:
        raise click.ClickException(str(err)) from err
    except psycopg.Error as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise click.ClickException(f"database error: {first_line}") from err
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(format_report(report))
    if not report["ok"]:
        sys.exit(1)
