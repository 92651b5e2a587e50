"""`saga bench` at toy sizes against the test servers: every figure is there and sane.

No figure is compared with a target here (DESIGN.md §9: measure with the benchmark command,
never with timed assertions); these tests only keep the measurements runnable.
"""

from __future__ import annotations

import pytest

from benchmarks import (
    consumer_throughput,
    consumer_wakeups,
    end_to_end,
    raw_limits,
    relay_drain,
    relay_latency,
    report,
)
from contracts import ORDERS_EVENTS, partition_stream
from service_runtime.db import connect
from service_runtime.redis_client import connect as redis_connect
from tests.conftest import cluster_tests_enabled


def assert_percentiles(figures: dict) -> None:
    assert 0 < figures["p50"] <= figures["p95"] <= figures["p99"] <= figures["max"]


def test_relay_and_consumer_measurements(clean_state):
    orders, inventory = clean_state.db_urls["orders"], clean_state.db_urls["inventory"]
    redis_url = clean_state.redis_url
    results = {
        "raw_limits": raw_limits.measure(
            orders, redis_url, xadd_single=50, xadd_pipelined=1_000, pg_commits=40
        ),
        "relay_drain": relay_drain.measure(orders, redis_url, rows=200, batch_size=50),
        "relay_latency": relay_latency.measure(orders, redis_url, rate=50, seconds=1),
        "consumer_throughput": consumer_throughput.measure(inventory, redis_url, entries=200),
    }

    raw = results["raw_limits"]
    assert raw["xadd_single_per_s"] > 0 and raw["xadd_pipelined_per_s"] > 0
    assert set(raw["pg_commit_per_s"]) == {"1", "4"}
    assert all(rate > 0 for rate in raw["pg_commit_per_s"].values())

    drain = results["relay_drain"]
    assert drain["events_per_s"] > 0 and drain["fill_rows_per_s"] > 0
    assert drain["stream_length"] == 200  # every row published, none twice

    latency = results["relay_latency"]
    assert latency["rows"] == 50 and latency["missing"] == 0
    assert latency["achieved_rate"] > 0
    assert_percentiles(latency["latency_ms"])

    consumer = results["consumer_throughput"]
    assert consumer["events_per_s"] > 0
    assert consumer["inbox_rows"] == 200 and consumer["left_pending"] == 0

    report.evaluate(results)
    ratios = results["ratios"]
    assert ratios.pop("consumer_vs_faststream") is None  # its yardstick was not run
    assert all(value > 0 for value in ratios.values()), ratios
    checks = {check["target"]: check for check in results["checks"]}
    for target in report.TARGETS[:4]:  # the ones these measurements feed
        assert checks[target.text]["measured"] > 0
        assert checks[target.text]["met"] in (True, False)
    table = report.render(results)
    assert all(target.text in table for target in report.TARGETS)


def test_consumer_wakeups_settle_every_entry_and_report_cpu_per_entry(clean_state):
    inventory, redis_url = clean_state.db_urls["inventory"], clean_state.redis_url
    result = consumer_wakeups.measure(inventory, redis_url, rate=40, seconds=1, partitions=4)

    for phase in ("ignored", "handled"):
        figures = result[phase]
        assert figures["entries"] == 40
        assert figures["consumer_cpu_us_per_entry"] > 0 and figures["redis_cpu_us_per_entry"] > 0
    with connect(inventory) as conn:  # only the handled ones went through a transaction
        assert conn.execute("SELECT count(*) FROM inbox").fetchone()[0] == 40
    with redis_connect(redis_url) as client:
        for partition in range(4):
            stream = partition_stream(ORDERS_EVENTS, partition)
            if client.exists(stream):
                assert client.xpending(stream, consumer_throughput.GROUP)["pending"] == 0
    table = report.render({"consumer_wakeups": result})
    assert "ignored entries one at a time" in table and "handled entries one at a time" in table


def test_faststream_yardstick_handles_every_entry(clean_state):
    pytest.importorskip("faststream.redis", reason="the bench extra: pip install -e .[bench]")
    from benchmarks import faststream_yardstick

    inventory, redis_url = clean_state.db_urls["inventory"], clean_state.redis_url
    result = faststream_yardstick.measure(inventory, redis_url, entries=200, batch_size=50)

    assert result["events_per_s"] > 0 and result["version"]
    assert result["inbox_rows"] == 200 and result["left_pending"] == 0
    with redis_connect(redis_url) as client:
        entries = client.xrange(faststream_yardstick.STREAM)
    with connect(inventory) as conn:
        inbox = conn.execute("SELECT event_id::text, stream, entry_id FROM inbox").fetchall()
    assert sorted(inbox) == sorted(
        (fields["event_id"], faststream_yardstick.STREAM, entry_id) for entry_id, fields in entries
    )

    results = report.evaluate(
        {
            "consumer_throughput": {
                "entries": 200,
                "events_per_s": 3 * result["events_per_s"],
                **faststream_yardstick.alongside(inventory, redis_url, entries=200, batch_size=50),
            }
        }
    )
    assert results["consumer_throughput"]["faststream"]["left_pending"] == 0
    [check] = [c for c in results["checks"] if c["key"] == "consumer_vs_faststream"]
    assert check["measured"] > 0 and check["met"] in (True, False)
    assert "FastStream" in report.render(results)


def test_faststream_yardstick_is_skipped_when_not_installed(monkeypatch):
    from benchmarks import faststream_yardstick

    monkeypatch.setattr(faststream_yardstick, "faststream_version", lambda: None)
    figures = faststream_yardstick.alongside("unused", "unused", entries=200, batch_size=50)
    assert figures == {
        "faststream_events_per_s": None,
        "faststream": {"skipped": "skipped: pip install -e .[bench]"},
    }
    results = report.evaluate(
        {"consumer_throughput": {"entries": 200, "events_per_s": 5_000.0, **figures}}
    )
    assert results["ratios"]["consumer_vs_faststream"] is None
    [check] = [c for c in results["checks"] if c["key"] == "consumer_vs_faststream"]
    assert check["measured"] is None and check["met"] is None
    assert "skipped: pip install -e .[bench]" in report.render(results)


@pytest.mark.e2e
def test_end_to_end_measurement_with_two_consumers_per_service(clean_state):
    result = end_to_end.measure(
        clean_state.db_urls,
        clean_state.redis_url,
        rates=(5,),
        step_seconds=2,
        rise_by=0,
        senders=4,
        consumers=2,
        partitions=4,
        idle_seconds=1,  # the default minute is the bench's; here only that it is measured
    )

    [step] = result["steps"]
    assert step["orders"] == 10 and step["errors"] == 0
    assert step["confirmed"] == 10
    assert_percentiles(step["latency_ms"])
    assert step["confirmed_per_s"] > 0
    assert 0 <= step["system_cpu_percent"] <= 100
    assert step["cpu_seconds"] > 0 and step["cpu_ms_per_confirmed"] > 0
    assert (result["consumers"], result["partitions"]) == (2, 4)
    # every process is watched (both consumers of each service), and the load generator
    names = ("orders-web", "orders-relay", "orders-consumer-1", "billing-consumer-2")
    for name in (*names, "bench load generator"):
        assert step["cpu_percent"][name] >= 0
        assert result["memory_mb_at_end"][name]["rss"] > 0
    idle = result["idle"]
    # an idle second may cost every process less than one clock tick (10 ms): 0 is possible
    assert idle["seconds"] == 1 and idle["cpu_percent_total"] >= 0
    for name in (*names, "worker", "supervisor"):
        assert idle["cpu_percent"][name] >= 0  # every process and server is watched
    assert idle["cpu_percent_total"] == pytest.approx(sum(idle["cpu_percent"].values()))
    assert result["highest_sustained_rate"] in (0, 5)  # kept up or not: timing, not judged
    if result["highest_sustained_rate"]:
        assert result["cpu_ms_per_confirmed"] == step["cpu_ms_per_confirmed"]

    results = report.evaluate({"end_to_end": end_to_end.combine([result, result])})
    table = report.render(results)
    assert "Scale-out" in table and "CPU-ms/order" in table
    assert "2 consumer(s) per service, 4 partitions" in table


def test_procfile_consumers_are_replaced_by_n_per_service(tmp_path):
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        "orders-web: saga web orders\norders-consumer: saga consume orders\n"
        "billing-consumer: saga consume billing\nworker: saga worker\n"
    )
    lines = end_to_end.procfile_with_consumers(procfile, 2).splitlines()
    assert lines == [
        "orders-web: saga web orders",
        "orders-consumer-1: saga consume orders --instance 1",
        "orders-consumer-2: saga consume orders --instance 2",
        "billing-consumer-1: saga consume billing --instance 1",
        "billing-consumer-2: saga consume billing --instance 2",
        "worker: saga worker",
    ]


def test_consumer_counts_parse_as_a_list_or_repeated():
    from click.testing import CliRunner

    from benchmarks.cli import bench

    result = CliRunner().invoke(bench, ["--consumers", "1,x", "--only", "raw_limits"])
    assert result.exit_code == 2 and "whole numbers" in result.output
    from benchmarks.cli import _counts

    assert _counts(None, None, ("1,2", "4", "2")) == (1, 2, 4)  # type: ignore[arg-type]
    assert _counts(None, None, ()) == (1,)  # type: ignore[arg-type]


@pytest.mark.skipif(cluster_tests_enabled(), reason="a replica of the one embedded Redis")
def test_relay_per_durability_mode(clean_state):
    from benchmarks import relay_durability
    from tests.helpers import replica_cannot_follow

    if reason := replica_cannot_follow(clean_state.redis_url):
        pytest.skip(reason)  # CI's second pass: the machine's Redis 7 as the primary

    results = relay_durability.measure(
        clean_state.db_urls["orders"],
        clean_state.redis_url,
        rows=200,
        rate=50,
        seconds=1,
        batch_size=50,
        partitions=8,
    )
    assert set(results) == {"ack", "replicas:1", "fsync"}
    for mode in ("ack", "replicas:1"):
        assert results[mode]["drain"]["stream_length"] == 200, mode
        assert results[mode]["latency"]["missing"] == 0, mode
    if "unsupported" in results["fsync"]:  # Redis before 7.2: the relay's own start-up error
        assert "7.2 or later" in results["fsync"]["unsupported"]
    assert "RELAY_DURABILITY" in report._durability_section(results)
