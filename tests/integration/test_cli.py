"""The inspection commands of `saga` (streams, tail, pending, dead-letters, outbox, trace) run
through click's CliRunner against a real saga on real PostgreSQL and Redis."""

from __future__ import annotations

import json
import threading
import uuid

import psycopg
import pytest
import redis as redis_lib
from click.testing import CliRunner, Result

from contracts import (
    ENVELOPE_FIELDS,
    ORDERS_EVENTS,
    SUBSCRIPTIONS,
    dead_letter_stream,
    redrive_stream,
)
from devstack.osutil import free_port
from inventory_service.reactions import HANDLERS as INVENTORY_HANDLERS
from outbox_relay.relay import Relay, RelaySettings
from sagactl.inspect.streams import follow_entries
from sagactl.main import cli
from service_runtime.consumer import ConsumerSettings, StreamConsumer
from tests.helpers import wait_until

SAGA_TYPES = ["OrderPlaced", "StockReserved", "PaymentCaptured", "OrderConfirmed"]


@pytest.fixture
def cli_env(clean_state, monkeypatch, tmp_path):
    """The commands read os.environ (never a stack.env of a dev stack on this machine)."""
    monkeypatch.setenv("SAGA_RUN_DIR", str(tmp_path))
    for key, value in clean_state.env.items():
        monkeypatch.setenv(key, value)
    return clean_state


def saga(*args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(cli, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    return result


def saga_json(*args: str) -> dict:
    return json.loads(saga(*args, "--json").stdout)


def failed(*args: str) -> str:
    """Output of a command that must fail with a clear message, not a traceback."""
    result = saga(*args, ok=False)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.output


@pytest.fixture
def shop(shop, cli_env):
    """The stocked saga driver, with the CLI's environment pointing at the same servers."""
    return shop


def redis_major(client: redis_lib.Redis) -> int:
    return int(client.info("server")["redis_version"].split(".")[0])


# -- streams, tail, pending --------------------------------------------------------------------


def test_streams_reports_lengths_groups_lag_and_pending(shop):
    shop.place("alice", [("apple", 2)])
    shop.settle()

    report = {s["stream"]: s for s in saga_json("streams")["streams"]}
    assert list(report) == [
        "orders.events",
        "inventory.events",
        "billing.events",
        # the consumers created their re-drive streams; no dead-letter stream exists yet
        "billing.redrive",
        "inventory.redrive",
        "orders.redrive",
    ]
    assert report["orders.events"]["length"] == 2  # OrderPlaced, OrderConfirmed
    assert report["inventory.events"]["length"] == 1
    assert report["billing.events"]["length"] == 1
    orders = report["orders.events"]
    assert orders["first_entry_at"] <= orders["last_entry_at"]
    groups = {g["group"]: g for g in orders["groups"]}
    assert set(groups) == {"inventory", "billing"}
    for group in groups.values():
        assert (group["pending"], group["lag"], group["dead_letters"]) == (0, 0, 0)
        assert group["consumers"] == 1
        assert group["oldest_pending_idle_ms"] is None
    expected_source = "redis" if redis_major(shop.redis) >= 7 else "counted"
    assert groups["inventory"]["lag_source"] == expected_source

    text = saga("streams").output
    assert "orders.events" in text and "LAG" in text and "DEAD LETTERS" in text
    assert "inventory.redrive" in text

    # One order published but not delivered (lag), one entry read but never acknowledged.
    shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    shop.redis.xreadgroup("inventory", "inventory-9", {ORDERS_EVENTS: ">"}, count=1)
    groups = {
        g["group"]: g
        for s in saga_json("streams")["streams"]
        if s["stream"] == ORDERS_EVENTS
        for g in s["groups"]
    }
    assert (groups["inventory"]["pending"], groups["inventory"]["lag"]) == (1, 0)
    assert groups["inventory"]["consumers"] == 2
    assert groups["inventory"]["oldest_pending_idle_ms"] >= 0
    assert (groups["billing"]["pending"], groups["billing"]["lag"]) == (0, 1)

    pending = saga_json("pending", "inventory")
    entries = [e for s in pending["streams"] for e in s["entries"]]
    assert len(entries) == 1
    assert entries[0]["consumer"] == "inventory-9"
    assert entries[0]["deliveries"] == 1
    assert entries[0]["event_type"] == "OrderPlaced"
    assert entries[0]["idle_ms"] >= 0
    text = saga("pending", "inventory", ORDERS_EVENTS).output
    assert "inventory-9" in text and "OrderPlaced" in text
    assert "nothing pending" in saga("pending", "billing").output
    assert "unknown group" in failed("pending", "shipping")
    assert "does not read" in failed("pending", "orders", ORDERS_EVENTS)


def test_tail_decodes_filters_and_follows(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()

    events = saga_json("tail", ORDERS_EVENTS)["entries"]
    assert [e["event_type"] for e in events] == ["OrderPlaced", "OrderConfirmed"]
    assert {e["correlation_id"] for e in events} == {order_id}
    assert events[0]["payload"]["items"] == [{"sku": "apple", "quantity": 2}]
    assert events[1]["payload"]["total_cents"] == 300

    only = saga_json("tail", ORDERS_EVENTS, "--type", "OrderConfirmed")["entries"]
    assert [e["event_type"] for e in only] == ["OrderConfirmed"]
    last = saga_json("tail", ORDERS_EVENTS, "--count", "1")["entries"]
    assert [e["event_type"] for e in last] == ["OrderConfirmed"]

    text = saga("tail", "billing.events").output
    assert "PaymentCaptured" in text and order_id in text and '"amount_cents":300' in text
    assert "no entries" in saga("tail", "orders.dead-letters").output  # known, not written yet
    assert "no stream named" in failed("tail", "nope.events")

    # --follow: XREAD BLOCK from the newest entry on, so only what comes after
    newest = shop.redis.xrevrange(ORDERS_EVENTS, count=1)[0][0]
    shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    entry_id, fields = next(follow_entries(shop.redis, ORDERS_EVENTS, newest, block_ms=100))
    assert entry_id > newest and fields["event_type"] == "OrderPlaced"


# -- outbox ------------------------------------------------------------------------------------


def test_outbox_shows_backlog_and_the_active_relay(shop, cli_env):
    shop.place("alice", [("apple", 1)])
    report = saga_json("outbox")["outbox"]
    assert list(report) == ["orders", "inventory", "billing"]
    assert report["orders"]["unpublished"] == 1
    assert report["orders"]["oldest_unpublished_age_ms"] >= 0
    assert report["inventory"]["unpublished"] == 0
    assert report["inventory"]["oldest_unpublished_age_ms"] is None
    assert not report["orders"]["relay"]["lock_held"]
    assert report["orders"]["relay"]["holder"] is None

    relay = Relay(
        cli_env.db_urls["orders"],
        shop.redis,
        RelaySettings(producer="orders", stream=ORDERS_EVENTS, poll_seconds=0.1),
    )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: relay.published == 1, message="the relay did not publish")
        report = saga_json("outbox")["outbox"]
        orders = report["orders"]
        assert orders["unpublished"] == 0
        assert orders["relay"]["lock_held"] is True
        assert orders["relay"]["holder"]
        assert orders["relay"]["published"] == 1
        assert orders["relay"]["last_publish_at"] >= orders["relay"]["active_since"]
        assert orders["relay"]["last_publish_age_ms"] >= 0
        assert orders["last_published_at"]
        assert not report["billing"]["relay"]["lock_held"]  # advisory locks are per database
        text = saga("outbox").output
        row = next(line for line in text.splitlines() if line.startswith("orders"))
        assert " yes " in row and orders["relay"]["holder"] in row
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


# -- trace -------------------------------------------------------------------------------------


def test_trace_shows_the_saga_timeline_and_each_services_state(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()

    report = saga_json("trace", order_id)
    events = report["events"]
    assert [e["event_type"] for e in events] == SAGA_TYPES
    assert [e["producer"] for e in events] == ["orders", "inventory", "billing", "orders"]
    for event in events:
        assert event["committed_at"] <= event["published_at"]
        assert event["commit_to_publish_ms"] >= 0
    handled = {
        (e["event_type"], d["group"]): d for e in events for d in e["deliveries"] if d["handles"]
    }
    assert set(handled) == {
        ("OrderPlaced", "inventory"),
        ("StockReserved", "billing"),
        ("StockReserved", "orders"),
        ("PaymentCaptured", "orders"),
    }
    for delivery in handled.values():
        assert delivery["processed_at"] is not None
        assert delivery["publish_to_processed_ms"] >= 0
    placed = {d["group"]: d for d in events[0]["deliveries"]}
    assert placed["billing"] == {
        "group": "billing",
        "handles": False,
        "processed_at": None,
        "publish_to_processed_ms": None,
    }
    # each event names its cause: the saga is one chain from OrderPlaced
    assert events[1]["causation_id"] == events[0]["event_id"]
    assert events[2]["causation_id"] == events[1]["event_id"]
    assert events[3]["causation_id"] == events[2]["event_id"]
    state = report["state"]
    assert state["orders"]["status"] == "confirmed" and state["orders"]["total_cents"] == 300
    assert state["inventory"]["status"] == "held"
    assert state["billing"]["status"] == "captured" and state["billing"]["amount_cents"] == 300

    text = saga("trace", order_id).output
    positions = [text.index(name) for name in SAGA_TYPES]
    assert positions == sorted(positions)
    assert "(not handled)" in text
    for word in ("confirmed", "held", "captured", "COMMIT->PUBLISH", "PUBLISH->PROCESSED"):
        assert word in text

    assert "no order" in failed("trace", str(uuid.uuid4()))
    assert "not an order id" in failed("trace", "banana")


# -- dead letters ------------------------------------------------------------------------------


def test_dead_letters_list_show_and_redrive_to_the_failing_group_only(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.publish("orders")
    # inventory's handler fails and gives up at once; billing ignores OrderPlaced and acks it
    broken = {"failing": True}

    def flaky(uow, event):
        if broken["failing"]:
            raise RuntimeError("stock database on fire")
        INVENTORY_HANDLERS["OrderPlaced"](uow, event)

    settings = ConsumerSettings(
        group="inventory",
        consumer="inventory-7",
        streams=SUBSCRIPTIONS["inventory"],
        max_deliveries=1,
    )
    failing = StreamConsumer(shop.redis, shop.pools["inventory"], settings, {"OrderPlaced": flaky})
    assert failing.read_new_once() == 1
    assert failing.stats.dead_lettered == 1
    assert shop.deliver("billing") == 1

    letters = saga_json("dead-letters", "list")
    assert letters["totals"] == {"orders": 0, "inventory": 1, "billing": 0}
    (letter,) = letters["dead_letters"]
    assert letter["group"] == "inventory"
    assert letter["event_type"] == "OrderPlaced"
    assert letter["correlation_id"] == order_id
    assert letter["original_stream"] == ORDERS_EVENTS
    assert letter["attempts"] == 1
    assert "stock database on fire" in letter["error"]
    assert "stock database on fire" in saga("dead-letters", "list", "inventory").output
    streams = {s["stream"]: s for s in saga_json("streams")["streams"]}
    counts = {
        (s, g["group"]): (g["dead_letters"], g["dead_letters_from_stream"])
        for s in (ORDERS_EVENTS, "billing.events")
        for g in streams[s]["groups"]
    }
    assert counts[(ORDERS_EVENTS, "inventory")] == (1, 1)
    assert counts[("billing.events", "inventory")] == (1, 0)  # it came from orders.events
    assert counts[(ORDERS_EVENTS, "billing")] == (0, 0)
    assert "no dead letters" in saga("dead-letters", "list", "billing").output

    shown = saga_json("dead-letters", "show", letter["id"])
    assert shown["group"] == "inventory"
    assert shown["payload"]["order_id"] == order_id
    assert shown["fields"]["original_id"] == letter["original_id"]
    text = saga("dead-letters", "show", letter["id"], "--group", "inventory").output
    assert "RuntimeError: stock database on fire" in text and order_id in text
    assert "no dead letter" in failed("dead-letters", "show", "1-1")
    assert "not a stream entry id" in failed("dead-letters", "show", "abc")

    assert "no dead letter 1-1" in failed("dead-letters", "redrive", "1-1", "--group", "inventory")
    assert shop.redis.xlen(dead_letter_stream("inventory")) == 1  # nothing moved
    assert failed("dead-letters", "redrive", "--group", "inventory")  # neither ids nor --all

    orders_length = shop.redis.xlen(ORDERS_EVENTS)
    moved = saga_json("dead-letters", "redrive", letter["id"], "--group", "inventory")
    assert [m["id"] for m in moved["redriven"]] == [letter["id"]]
    assert shop.redis.xlen(dead_letter_stream("inventory")) == 0
    ((_, fields),) = shop.redis.xrange(redrive_stream("inventory"))
    assert set(fields) == set(ENVELOPE_FIELDS)  # the original envelope, not the dead letter
    assert shop.redis.xlen(ORDERS_EVENTS) == orders_length  # the original stream is untouched

    # billing, the other group on orders.events, never sees it again
    assert shop.deliver("billing") == 0
    # inventory, fixed, handles it from its re-drive stream, and the saga completes
    broken["failing"] = False
    assert failing.read_new_once() == 1
    assert failing.stats.processed == 1
    with psycopg.connect(shop.db_urls["inventory"]) as conn:
        stream = conn.execute(
            "SELECT stream FROM inbox WHERE consumer_group = 'inventory'"
            " AND event_type = 'OrderPlaced'"
        ).fetchone()[0]
    assert stream == redrive_stream("inventory")
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"


def test_redrive_all_takes_only_what_is_there_now(shop):
    # An entry that breaks its contract: every group that handles its type dead-letters it
    # at once (inventory and billing both react to OrderCancelled).
    shop.redis.xadd(ORDERS_EVENTS, {"event_type": "OrderCancelled", "payload": "{not json"})
    assert shop.deliver("inventory") == 1 and shop.deliver("billing") == 1
    letters = saga_json("dead-letters", "list")
    assert letters["totals"] == {"orders": 0, "inventory": 1, "billing": 1}
    assert all(d["error"].startswith("contract:") for d in letters["dead_letters"])
    old_id = next(d["id"] for d in letters["dead_letters"] if d["group"] == "billing")
    assert saga_json("dead-letters", "show", old_id)["payload"] == "{not json"

    text = saga("dead-letters", "redrive", "--all", "--group", "billing").output
    assert "1 re-driven to billing" in text
    # still broken: billing dead-letters it again, under a new id; inventory's stays put
    assert shop.deliver("billing") == 1
    again = saga_json("dead-letters", "list", "billing")["dead_letters"]
    assert len(again) == 1 and again[0]["id"] != old_id
    assert again[0]["original_stream"] == redrive_stream("billing")
    assert shop.redis.xlen(dead_letter_stream("inventory")) == 1
    nothing = saga("dead-letters", "redrive", "--all", "--group", "orders").output
    assert "no dead letters for orders" in nothing


# -- errors ------------------------------------------------------------------------------------


def test_unreachable_servers_give_one_clear_line(cli_env, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    for command in (["streams"], ["tail", ORDERS_EVENTS], ["dead-letters", "list"]):
        output = failed(*command)
        assert "cannot reach Redis at 127.0.0.1:" in output
        assert len(output.strip().splitlines()) == 1

    monkeypatch.setenv("REDIS_URL", cli_env.redis_url)
    monkeypatch.setenv("ORDERS_DATABASE_URL", f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    assert "cannot reach the orders database" in failed("outbox")
    assert "cannot reach the orders database" in failed("trace", str(uuid.uuid4()))

    monkeypatch.delenv("REDIS_URL")  # and no stack.env in SAGA_RUN_DIR either
    assert "REDIS_URL is not set" in failed("streams")
