"""A real `saga chaos` at toy size: two consumers per service, consumers killed (SIGKILL) or
stopped (SIGTERM) while the others own the rest of the partitions; then the audit. The long
soaks stay behind `make chaos`; this only keeps the soak and its report working (no figure is
judged here beyond being plausible)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sagactl.main import cli

pytestmark = pytest.mark.e2e


def _toy_chaos(tmp_path, monkeypatch, *options: str) -> tuple[dict, str]:
    """`saga chaos` at toy size with `options`; its report and output (the run must pass).
    A short lease, so that a consumer's partitions move within the toy soak."""
    monkeypatch.setenv("CONSUMER_LEASE_MS", "2000")
    monkeypatch.setenv("CONSUMER_HEARTBEAT_MS", "400")
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(
        cli,
        [
            "chaos",
            "--clients", "2",
            "--consumers", "2",
            "--partitions", "4",
            "--grace-seconds", "2",
            "--quiet-timeout", "120",
            "--report", str(report_path),
            *options,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(report_path.read_text()), result.output


def test_consumer_kills_and_stops_move_partitions_and_break_no_invariant(tmp_path, monkeypatch):
    """consumer (SIGKILL: its leases expire) and consumer-stop (SIGTERM: it wakes its blocked
    reads and hands its partitions back); each restarts and joins again."""
    report, output = _toy_chaos(
        tmp_path, monkeypatch,
        "--orders", "6", "--faults", "consumer,consumer-stop", "--duration", "4",
        "--fault-interval", "0.7", "--seed", "5",  # the first two faults: a kill, a stop
    )  # fmt: skip

    assert report["violations"] == 0 and report["failures"] == []
    assert report["orders"]["placed"] == 6
    assert report["settings"]["consumers_per_service"] == 2
    assert report["settings"]["partitions"] == 4
    consumers = [name for name in report["processes"] if "-consumer-" in name]
    assert len(consumers) == 6
    assert report["faults"]["by_kind"]["consumer"] >= 1  # the first comes within 1.05 s
    assert report["faults"]["by_kind"]["consumer-stop"] >= 1

    ownership = report["ownership"]
    assert ownership["changes"] >= 1  # a killed consumer's partitions were acquired again
    assert sum(ownership["changes_by_group"].values()) == ownership["changes"]
    assert ownership["consumer_metrics"].get("acquired", 0) >= 1
    assert ownership["samples"] > 0 and ownership["unended_gaps"] == 0
    assert ownership["longest_no_owner_s"] >= 0
    assert isinstance(report["conflicts_retried"], int) and report["conflicts_retried"] >= 0
    assert all(d["total"] == 0 for d in report["dead_letters"].values())
    for line in ("ownership changes", "longest without owner", "conflicts retried"):
        assert line in output


def test_paused_consumers_are_fenced_and_their_partitions_finished_in_order(tmp_path, monkeypatch):
    """consumer-pause: SIGSTOP a consumer past its lease, then SIGCONT. Others own its
    partitions meanwhile; when it goes on, its workers' first reads are refused by the fence
    (or taken, once, into its pending list: the new owners claim those entries). The audit
    checks that no order broke an invariant and nothing is left pending."""
    report, _output = _toy_chaos(
        tmp_path, monkeypatch,
        "--orders", "30", "--faults", "consumer-pause", "--duration", "6",
        "--fault-interval", "0.5", "--seed", "5",
    )  # fmt: skip

    assert report["violations"] == 0 and report["failures"] == []
    assert report["faults"]["by_kind"]["consumer-pause"] >= 1
    [event, *_] = report["faults"]["events"]
    assert event["kind"] == "consumer-pause" and "paused" in event["target"]
    assert report["ownership"]["changes"] >= 1  # the paused consumer's partitions moved
    assert all(d["total"] == 0 for d in report["dead_letters"].values())
