"""The pure pieces of `saga chaos`: Procfile parsing, load shape, retries, counters, quiet."""

from __future__ import annotations

import io
import random

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


def test_consumer_counters_add_up_over_restarts(monkeypatch):
    """A restarted consumer starts from zero: the old process's last counts are kept."""
    pages = {
        "a": 'saga_consumer_events_total{event_type="X",group="orders",outcome="duplicate"} 2.0\n'
        'saga_consumer_events_total{event_type="X",group="orders",outcome="processed"} 5.0\n',
        "b": 'saga_consumer_events_total{event_type="Y",group="orders",outcome="duplicate"} 1.0\n',
    }
    current = {"pid": 1, "page": "a"}
    monkeypatch.setattr(
        observe.urllib.request,
        "urlopen",
        lambda url, timeout: io.BytesIO(pages[current["page"]].encode()),
    )
    counters = observe.ConsumerCounters({"orders": 1}, lambda _name: current["pid"])
    counters.scrape("orders-consumer")
    assert counters.totals() == {"duplicate": 2, "processed": 5}
    current.update(pid=2, page="b")  # killed and restarted
    counters.scrape("orders-consumer")
    assert counters.totals() == {"duplicate": 3, "processed": 5}


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
