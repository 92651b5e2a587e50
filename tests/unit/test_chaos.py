"""The pure pieces of `saga chaos`: Procfile parsing, consumers per service, load shape,
retries, counters, ownership gaps, quiet."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime, timedelta

import pytest

from sagactl.chaos import load, observe
from sagactl.supervisor import ProcessSpec, parse_procfile, with_standby_relays


def test_procfile_parsing_and_standby_relays(tmp_path):
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        "# comment\n\norders-web: saga web orders\n"
        "orders-relay: saga relay orders\nworker: rq worker --url $REDIS_URL saga\n"
    )
    specs = parse_procfile(procfile)
    assert [s.name for s in specs] == ["orders-web", "orders-relay", "worker"]
    assert specs[2].command == "rq worker --url $REDIS_URL saga"
    assert with_standby_relays(specs)[-1] == ProcessSpec(
        "orders-relay-standby", "saga relay orders"
    )


def test_the_project_procfile_gets_one_standby_per_relay():
    from service_runtime.config import PROJECT_ROOT

    names = [s.name for s in with_standby_relays(parse_procfile(PROJECT_ROOT / "Procfile"))]
    for service in ("orders", "inventory", "billing"):
        assert f"{service}-relay" in names and f"{service}-relay-standby" in names


def test_orders_use_the_catalogue_with_sane_lines():
    rng = random.Random(1)
    catalogue = load.Catalogue.sized_for(500, rng)
    assert len(catalogue.products) >= 4 and len(catalogue.accounts) >= 4
    for _ in range(200):
        order = catalogue.random_order(rng)
        skus = [item["sku"] for item in order["items"]]
        assert 1 <= len(skus) <= 3 and len(set(skus)) == len(skus)
        assert all(1 <= item["quantity"] <= 3 for item in order["items"])


def test_a_request_is_repeated_identically_until_a_definitive_answer(monkeypatch):
    answers = iter([ConnectionRefusedError(), (503, None), (201, {"order_id": "o1"})])
    seen = []

    def fake_call(method, url, body=None, headers=None, timeout=10.0):
        seen.append((method, url, body, headers))
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(load, "http_call", fake_call)
    monkeypatch.setattr(load.time, "sleep", lambda _s: None)
    retries = []
    status, body = load.call_with_retry(
        "POST", "http://x/orders", {"a": 1}, {"Idempotency-Key": "k"}, on_retry=retries.append
    )
    assert (status, body) == (201, {"order_id": "o1"})
    assert retries == ["connection", "http_503"]
    assert len(set(map(repr, seen))) == 1  # the very same request each time


def test_chaos_runs_n_consumers_per_service_each_with_its_metrics_port():
    from sagactl.chaos.command import with_consumers
    from sagactl.processes import consumer_metrics_offset
    from service_runtime.config import PROJECT_ROOT

    procfile = with_standby_relays(parse_procfile(PROJECT_ROOT / "Procfile"))
    specs, ports = with_consumers(procfile, 3, 40_000)
    consumers = [s for s in specs if "saga consume" in s.command]
    assert len(consumers) == 9 and len(set(ports.values())) == 9
    spec = next(s for s in specs if s.name == "billing-consumer-2")
    assert spec.command == "saga consume billing --instance 2"
    # `saga consume billing --instance 2` serves on METRICS_PORT_BASE + its offset
    assert ports["billing-consumer-2"] == 40_000 + consumer_metrics_offset("billing", 2)
    assert [s.name for s in specs if "saga consume" not in s.command] == [
        s.name for s in procfile if "saga consume" not in s.command
    ]


def test_consumer_fault_targets_are_the_consumer_processes():
    from sagactl.chaos.faults import is_consumer_process

    assert is_consumer_process("orders-consumer-3")
    assert is_consumer_process("orders-consumer", "orders")
    assert not is_consumer_process("orders-consumer-3", "billing")
    assert not is_consumer_process("orders-relay-standby")


def test_consumer_counters_add_up_over_restarts(monkeypatch):
    """A restarted consumer starts from zero: the old process's last counts are kept."""
    pages = {
        "a": 'saga_consumer_events_total{event_type="X",group="orders",outcome="duplicate"} 2.0\n'
        'saga_consumer_events_total{event_type="X",group="orders",outcome="processed"} 5.0\n'
        'saga_consumer_conflicts_total{group="orders"} 3.0\n'
        'saga_partition_ownership_changes_total{change="acquired",group="orders"} 4.0\n',
        "b": 'saga_consumer_events_total{event_type="Y",group="orders",outcome="duplicate"} 1.0\n'
        'saga_consumer_conflicts_total{group="orders"} 1.0\n'
        'saga_partition_ownership_changes_total{change="acquired",group="orders"} 2.0\n'
        'saga_partition_ownership_changes_total{change="lost",group="orders"} 1.0\n',
    }
    current = {"pid": 1, "page": "a"}
    monkeypatch.setattr(
        observe.urllib.request,
        "urlopen",
        lambda url, timeout: io.BytesIO(pages[current["page"]].encode()),
    )
    counters = observe.ConsumerCounters({"orders-consumer-1": 1}, lambda _name: current["pid"])
    counters.scrape("orders-consumer-1")
    assert counters.totals() == {"duplicate": 2, "processed": 5}
    current.update(pid=2, page="b")  # killed and restarted
    counters.scrape("orders-consumer-1")
    assert counters.totals() == {"duplicate": 3, "processed": 5}
    assert counters.conflicts() == 4
    assert counters.ownership_changes() == {"acquired": 6, "lost": 1}


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def lease(partition, epoch, acquired, expires):
    return {
        "partition": partition,
        "owner": "x",
        "epoch": epoch,
        "live": None,
        "acquired_at": T0 + timedelta(seconds=acquired),
        "expires_at": T0 + timedelta(seconds=expires),
    }


def test_a_partition_without_owner_is_a_gap_until_the_next_acquisition():
    sampler = observe.OwnershipSampler({}, partitions=2)
    at = lambda seconds: T0 + timedelta(seconds=seconds)  # noqa: E731
    sampler.observe("orders", [lease(0, 1, 0, 5), lease(1, 1, 0, 5)], at(1))
    sampler.observe("orders", [lease(0, 1, 0, 5), lease(1, 1, 0, 5)], at(6))  # expired at 5
    assert sampler.summary()["unended_gaps"] == 2
    sampler.observe("orders", [lease(0, 2, 7.5, 12.5), lease(1, 1, 0, 5)], at(8))
    summary = sampler.summary()
    assert summary["gaps"] == 2 and summary["unended_gaps"] == 1
    assert summary["longest_no_owner_s"] == 3.0  # partition 1: 5 -> 8, still open
    sampler.observe("orders", [lease(0, 2, 7.5, 12.5), lease(1, 2, 8.2, 13)], at(8.5))
    gaps = {g["partition"]: g for g in sampler.summary()["top_gaps"]}
    assert gaps[0]["seconds"] == 2.5 and gaps[0]["ended"]  # 5 -> 7.5
    assert gaps[1]["seconds"] == 3.2 and gaps[1]["ended"]  # 5 -> 8.2


def test_a_hand_over_between_two_samples_counts_its_gap():
    sampler = observe.OwnershipSampler({}, partitions=1)
    sampler.observe("billing", [lease(0, 3, 0, 5)], T0 + timedelta(seconds=1))
    # released and taken again between the samples: no sample saw it without an owner
    sampler.observe("billing", [lease(0, 4, 5.4, 10)], T0 + timedelta(seconds=6))
    summary = sampler.summary()
    assert summary["longest_no_owner_s"] == 0.4 and summary["gaps"] == 1
    sampler.observe("billing", [lease(0, 5, 9, 14)], T0 + timedelta(seconds=9.5))
    assert sampler.summary()["gaps"] == 1  # taken over before the lease ran out: no gap


def test_quiet_means_several_empty_checks_in_a_row(monkeypatch):
    monkeypatch.setattr(observe.time, "sleep", lambda _s: None)
    results = iter([{"pending orders": 2}, {}, {"pending orders": 1}, {}, {}, {}])
    quiet_at, left = observe.wait_for_quiet(lambda: next(results), timeout=60, stable=3)
    assert quiet_at is not None and left == {}


def test_not_quiet_in_time():
    quiet_at, left = observe.wait_for_quiet(lambda: {"pending orders": 1}, timeout=0)
    assert quiet_at is None and left == {"pending orders": 1}


@pytest.mark.parametrize("bad", ["nope", "consumer,nope"])
def test_unknown_fault_kinds_are_refused(bad):
    from click.testing import CliRunner

    from sagactl.main import cli

    result = CliRunner().invoke(cli, ["chaos", "--faults", bad])
    assert result.exit_code == 2
    assert "unknown" in result.output


def test_redis_cluster_needs_the_cluster_support(monkeypatch):
    import sys

    from click.testing import CliRunner

    from sagactl.main import cli

    monkeypatch.setitem(sys.modules, "devstack.redis_cluster", None)  # not installed
    result = CliRunner().invoke(cli, ["chaos", "--redis-cluster", "--orders", "1"])
    assert result.exit_code == 1
    assert "Redis Cluster support not installed" in result.output


def test_the_soak_fails_on_an_undelivered_event_not_on_a_late_one():
    from sagactl.chaos.command import _failures
    from sagactl.chaos.load import LoadStats

    audit = {"violations": 0}
    records = {
        "acknowledged_but_missing": 0,
        "stored_without_key": 0,
        "keys_sharing_an_order": 0,
        "payment_timeout": 18,  # the deadline ran out during outages: reported, not a failure
    }
    assert _failures(audit, True, {}, records, LoadStats(), undelivered=0) == []
    assert _failures(audit, True, {}, records, LoadStats(), undelivered=2) == [
        "2 events never reached a group that reacts to them"
    ]
