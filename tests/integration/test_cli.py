"""The inspection commands of `saga` (streams, tail, pending, dead-letters, outbox, trace) run
through click's CliRunner against a real saga on real PostgreSQL and Redis."""

from __future__ import annotations

import importlib
import json
import threading
import uuid
from collections import Counter

import psycopg
import pytest
import redis as redis_lib
from click.testing import CliRunner, Result

from contracts import (
    ORDERS_EVENTS,
    partition_of,
    partition_stream,
    redrive_stream,
    relay_status_key,
)
from devstack.osutil import free_port
from inventory_service.reactions import HANDLERS as INVENTORY_HANDLERS
from outbox_relay.relay import Relay, RelaySettings
from sagactl.inspect.common import iso
from sagactl.inspect.partitions import all_bases
from sagactl.inspect.streams import follow_entries
from sagactl.main import cli
from service_runtime.consumer import ConsumerSettings, PartitionWorker
from service_runtime.ownership import PartitionLeases
from tests.helpers import EXPIRE_LEASES, stream_total, wait_until
from tests.partition_steps import drain, own_partitions

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


P = 8  # the driver's (and the default) partition count


def part(order_id: str) -> int:
    return partition_of(order_id, P)


def take_over(shop, group: str, name: str, handlers=None, **settings) -> tuple[list, Counter]:
    """Replace `group`'s consumer in the driver by `name` owning every partition (a new
    epoch for each), with `handlers` (default: the group's own); its outcomes are counted."""
    with shop.pools[group].connection() as conn:
        # expired, not deleted: the new owner takes them under a new epoch (fencing the old)
        conn.execute(EXPIRE_LEASES, (group,))
    outcomes: Counter = Counter()
    workers = own_partitions(
        shop.redis,
        shop.pools[group],
        ConsumerSettings(group=group, consumer=name, partitions=P, **settings),
        handlers or importlib.import_module(f"{group}_service.reactions").HANDLERS,
        on_outcome=lambda _type, outcome, _s: outcomes.update([outcome]),
    )
    shop.consumers[group] = workers
    return workers, outcomes


def worker_of(workers: list[PartitionWorker], partition: int) -> PartitionWorker:
    return next(w for w in workers if w.partition == partition)


# -- streams, tail, pending --------------------------------------------------------------------


def test_streams_reports_lengths_groups_lag_and_pending_per_partition(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()
    p = part(order_id)

    report = saga_json("streams")
    assert report["partitions"] == P
    bases = {s["stream"]: s for s in report["streams"]}
    assert list(bases) == all_bases()
    assert bases["orders.events"]["length"] == 2  # OrderPlaced, OrderConfirmed
    assert bases["orders.events"]["partitions_present"] == P  # the consumers created them all
    assert bases["inventory.events"]["length"] == 1
    assert bases["billing.events"]["length"] == 1
    orders = {x["partition"]: x for x in bases["orders.events"]["partitions"]}
    assert orders[p]["stream"] == partition_stream(ORDERS_EVENTS, p)
    assert orders[p]["length"] == 2
    assert sum(x["length"] for x in orders.values()) == 2
    assert orders[p]["first_entry_at"] <= orders[p]["last_entry_at"]
    groups = {g["group"]: g for g in orders[p]["groups"]}
    assert set(groups) == {"inventory", "billing"}
    for group in groups.values():
        assert (group["pending"], group["lag"], group["dead_letters_from_stream"]) == (0, 0, 0)
        assert group["consumers"] == 1
        assert group["oldest_pending_idle_ms"] is None
    expected_source = "redis" if redis_major(shop.redis) >= 7 else "counted"
    assert groups["inventory"]["lag_source"] == expected_source
    summaries = {(s["group"], s["partition"]): s for s in report["groups"]}
    assert len(summaries) == 3 * P
    for (group, _p), s in summaries.items():
        assert (s["owner"], s["epoch"], s["lease_live"]) == (f"{group}-1", 1, True)
        assert (s["pending"], s["lag"], s["dead_letters"]) == (0, 0, 0)

    text = saga("streams").output
    for word in ("orders.events", "PARTITION", "OWNER", "EPOCH", "LAG", "DEAD LETTERS"):
        assert word in text
    assert "inventory-1" in text and "live" in text
    assert partition_stream(ORDERS_EVENTS, p) in saga("streams", "--by-partition").output

    # One order published but not delivered (lag), one entry read but never acknowledged by a
    # consumer that does not own the partition.
    second = shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    q = part(second)
    stream = partition_stream(ORDERS_EVENTS, q)
    shop.redis.xreadgroup("inventory", "inventory-9", {stream: ">"}, count=1)
    report = saga_json("streams")
    summaries = {(s["group"], s["partition"]): s for s in report["groups"]}
    assert (summaries[("inventory", q)]["pending"], summaries[("inventory", q)]["lag"]) == (1, 0)
    assert summaries[("inventory", q)]["oldest_pending_idle_ms"] >= 0
    assert (summaries[("billing", q)]["pending"], summaries[("billing", q)]["lag"]) == (0, 1)
    part_q = next(
        x
        for b in report["streams"]
        if b["stream"] == ORDERS_EVENTS
        for x in b["partitions"]
        if x["partition"] == q
    )
    assert {g["group"]: g["consumers"] for g in part_q["groups"]}["inventory"] == 2

    pending = saga_json("pending", "inventory")
    assert [o["partition"] for o in pending["owners"]] == list(range(P))
    owner_q = pending["owners"][q]
    assert (owner_q["owner"], owner_q["epoch"], owner_q["live"], owner_q["pending"]) == (
        "inventory-1",
        1,
        True,
        1,
    )
    entries = [e for s in pending["streams"] for e in s["entries"]]
    assert len(entries) == 1
    assert entries[0]["consumer"] == "inventory-9"
    assert entries[0]["held_by_owner"] is False
    assert entries[0]["deliveries"] == 1
    assert entries[0]["event_type"] == "OrderPlaced"
    assert entries[0]["idle_ms"] >= 0
    text = saga("pending", "inventory", ORDERS_EVENTS).output
    assert "inventory-9 (not owner)" in text and "OrderPlaced" in text
    assert "inventory-9" in saga("pending", "inventory", stream).output
    only_q = saga_json("pending", "inventory", "--partition", str(q))
    assert [o["partition"] for o in only_q["owners"]] == [q]
    assert "nothing pending" in saga("pending", "billing").output
    assert "unknown group" in failed("pending", "shipping")
    assert "does not read" in failed("pending", "orders", ORDERS_EVENTS)
    assert "no partition" in failed("pending", "orders", "--partition", str(P))


def test_streams_and_pending_show_who_owns_each_partition(shop):
    order_id = shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    p = part(order_id)
    # inventory's partitions shared by two consumers, as two live members would share them
    first, second = shop.split("inventory", 2)
    mine = {w.partition for w in second}
    # one lease of the first consumer ran out (a paused or dead consumer), and one of the
    # second's ran out and was taken by a third consumer (a new epoch)
    lost = min(w.partition for w in first)
    moved = min(mine)
    expire = (
        "UPDATE partition_leases SET expires_at = clock_timestamp() - interval '1 second'"
        " WHERE consumer_group = 'inventory' AND partition = %s"
    )
    with shop.pools["inventory"].connection() as conn:
        # split() took every partition under a new epoch (the driver's first consumer had 1)
        [(epoch,)] = conn.execute(
            "SELECT DISTINCT epoch FROM partition_leases WHERE consumer_group = 'inventory'"
        ).fetchall()
        conn.execute(expire, (lost,))
        conn.execute(expire, (moved,))
        taken = PartitionLeases("inventory", "inventory-5", 60).acquire(conn, moved)
        assert taken.epoch == epoch + 1

    summaries = {
        s["partition"]: s for s in saga_json("streams")["groups"] if s["group"] == "inventory"
    }
    for partition, s in summaries.items():
        if partition == moved:
            assert (s["owner"], s["epoch"], s["lease_live"]) == ("inventory-5", epoch + 1, True)
        else:
            expected = "inventory-1" if partition in mine else "inventory-0"
            assert (s["owner"], s["epoch"]) == (expected, epoch)
            assert s["lease_live"] is (partition != lost)
    text = saga("streams").output
    rows = [line.split() for line in text.splitlines() if line.startswith("inventory ")]
    by_partition = {int(row[1]): row for row in rows}
    assert by_partition[lost][2:5] == ["(inventory-0)", str(epoch), "expired"]
    assert by_partition[moved][2:5] == ["inventory-5", str(epoch + 1), "live"]
    live = max(mine)
    assert by_partition[live][2:5] == ["inventory-1", str(epoch), "live"]

    # the owner of the order's partition reads the entry but has not acknowledged it yet
    owner = worker_of(first + second, p)
    owner.redis.xreadgroup("inventory", owner.settings.consumer, {owner.streams[0]: ">"})
    pending = saga_json("pending", "inventory")
    owners = {o["partition"]: o for o in pending["owners"]}
    assert owners[p]["pending"] == 1
    assert owners[lost]["live"] is False
    (entry,) = [e for s in pending["streams"] for e in s["entries"]]
    assert entry["consumer"] == owner.settings.consumer
    # held by its owner, unless its lease ran out or moved to inventory-5 meanwhile
    assert entry["held_by_owner"] is (p not in (lost, moved))
    text = saga("pending", "inventory").output
    assert "EXPIRES" in text and "expired" in text and owner.settings.consumer in text


def test_tail_decodes_filters_and_follows_across_partitions(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()

    events = saga_json("tail", ORDERS_EVENTS)["entries"]
    assert [e["event_type"] for e in events] == ["OrderPlaced", "OrderConfirmed"]
    assert {e["correlation_id"] for e in events} == {order_id}
    assert {e["stream"] for e in events} == {partition_stream(ORDERS_EVENTS, part(order_id))}
    assert events[0]["payload"]["items"] == [{"sku": "apple", "quantity": 2}]
    assert events[1]["payload"]["total_cents"] == 300

    only = saga_json("tail", ORDERS_EVENTS, "--type", "OrderConfirmed")["entries"]
    assert [e["event_type"] for e in only] == ["OrderConfirmed"]
    last = saga_json("tail", ORDERS_EVENTS, "--count", "1")["entries"]
    assert [e["event_type"] for e in last] == ["OrderConfirmed"]
    one = partition_stream(ORDERS_EVENTS, part(order_id))
    assert len(saga_json("tail", one)["entries"]) == 2

    # orders in other partitions merge in time order (entries of one pipelined batch share
    # a millisecond: across streams their order within it is unknown, so a set here)
    others = [shop.place("alice", [("apple", 1)]) for _ in range(6)]
    shop.publish("orders")
    placed = saga_json("tail", ORDERS_EVENTS, "--type", "OrderPlaced", "-n", "6")["entries"]
    assert {e["correlation_id"] for e in placed} == set(others)
    assert [e["time"] for e in placed] == sorted(e["time"] for e in placed)
    assert len({e["stream"] for e in placed}) > 1  # six orders in one partition: unlikely

    text = saga("tail", "billing.events").output
    assert "PaymentCaptured" in text and order_id in text and '"amount_cents":300' in text
    assert "no entries" in saga("tail", "orders.redrive").output  # known, not written yet
    assert "no stream named" in failed("tail", "orders.dead-letters")  # rows in a database now
    assert "no stream named" in failed("tail", "nope.events")
    assert "no stream named" in failed("tail", partition_stream(ORDERS_EVENTS, P))

    # --follow: from each partition's newest entry on, so only what comes after, also what
    # arrives while it waits (XREAD BLOCK; on a cluster each partition's slot read in turn)
    streams = [partition_stream(ORDERS_EVENTS, i) for i in range(P)]
    newest = {s: (shop.redis.xrevrange(s, count=1) or [("0-0", {})])[0][0] for s in streams}
    followed = follow_entries(shop.redis, newest, block_ms=100)
    later = shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    stream, (_entry_id, fields) = next(followed)
    assert stream == partition_stream(ORDERS_EVENTS, part(later))
    assert fields["event_type"] == "OrderPlaced" and fields["correlation_id"] == later
    got: list = []
    follower = threading.Thread(target=lambda: got.append(next(followed)), daemon=True)
    follower.start()
    wait_until(lambda: follower.is_alive() or got, timeout=5)
    latest = shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    follower.join(timeout=10)
    assert not follower.is_alive(), "the follow never saw the new entry"
    [(stream, (_entry_id, fields))] = got
    assert stream == partition_stream(ORDERS_EVENTS, part(latest))
    assert fields["correlation_id"] == latest


# -- outbox ------------------------------------------------------------------------------------


def last_published_at(url: str) -> str:
    with psycopg.connect(url) as conn:
        return iso(conn.execute("SELECT max(published_at) FROM outbox").fetchone()[0])


def test_outbox_shows_backlog_and_the_active_relay(shop, cli_env):
    shop.place("alice", [("apple", 1)])
    report = saga_json("outbox")["outbox"]
    assert list(report) == ["orders", "inventory", "billing"]
    assert report["orders"]["unpublished"] == 1
    assert report["orders"]["oldest_unpublished_age_ms"] >= 0
    assert report["orders"]["last_published_at"] is None
    assert report["inventory"]["unpublished"] == 0
    assert report["inventory"]["oldest_unpublished_age_ms"] is None
    assert not report["orders"]["relay"]["lock_held"]
    assert report["orders"]["relay"]["holder"] is None

    relay = Relay(
        cli_env.db_urls["orders"],
        shop.redis,
        RelaySettings(producer="orders", partitions=P, poll_seconds=0.1),
    )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: relay.published == 1, message="the relay did not publish")
        wait_until(lambda: shop.redis.hget(relay_status_key("orders"), "published") == "1")
        report = saga_json("outbox")["outbox"]
        orders = report["orders"]
        assert orders["unpublished"] == 0
        assert orders["relay"]["lock_held"] is True
        assert orders["relay"]["holder"]
        assert orders["relay"]["published"] == 1
        assert orders["last_published_at"] >= orders["relay"]["active_since"]
        assert orders["last_published_age_ms"] >= 0
        assert not report["billing"]["relay"]["lock_held"]  # advisory locks are per database
        text = saga("outbox").output
        row = next(line for line in text.splitlines() if line.startswith("orders"))
        assert " yes " in row and orders["relay"]["holder"] in row
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_outbox_last_publish_is_the_rows_published_at(shop, cli_env):
    """Issue 9 item 16: LAST PUBLISH is when the row was marked published, not the relay's
    status report (written at most once a second, so up to a second late)."""
    shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    truth = last_published_at(cli_env.db_urls["orders"])
    orders = saga_json("outbox")["outbox"]["orders"]
    assert orders["last_published_at"] == truth
    # a stale status hash (a relay that reported a second earlier) changes nothing
    shop.redis.hset(
        relay_status_key("orders"),
        mapping={"holder": "relay-1", "last_publish_at": "2000-01-01T00:00:00+00:00"},
    )
    assert saga_json("outbox")["outbox"]["orders"]["last_published_at"] == truth
    row = next(line for line in saga("outbox").output.splitlines() if line.startswith("orders"))
    assert truth.replace("T", " ").rstrip("Z") in row
    shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    newer = last_published_at(cli_env.db_urls["orders"])
    assert newer > truth
    assert saga_json("outbox")["outbox"]["orders"]["last_published_at"] == newer


# -- trace -------------------------------------------------------------------------------------


def test_trace_shows_the_saga_timeline_and_each_services_state(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()

    report = saga_json("trace", order_id)
    assert report["partition"] == part(order_id)
    events = report["events"]
    assert [e["event_type"] for e in events] == SAGA_TYPES
    assert [e["producer"] for e in events] == ["orders", "inventory", "billing", "orders"]
    for event in events:
        assert event["committed_at"] <= event["published_at"]
        assert event["commit_to_publish_ms"] >= 0
        assert event["stream"].endswith(f".{{p{part(order_id)}}}")
        ((_entry_id, fields),) = shop.redis.xrange(
            event["stream"], event["entry_id"], event["entry_id"]
        )
        assert fields["event_id"] == event["event_id"]
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
        assert delivery["status"] == "processed"
        assert delivery["processed_at"] is not None
        assert delivery["publish_to_processed_ms"] >= 0
    placed = {d["group"]: d for d in events[0]["deliveries"]}
    assert placed["billing"]["status"] == "not_handled"
    assert placed["billing"]["processed_at"] is None
    assert placed["billing"]["dead_letter"] is None
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
    assert "(not handled)" in text and f"(partition {part(order_id)})" in text
    for word in ("confirmed", "held", "captured", "COMMIT->PUBLISH", "PUBLISH->PROCESSED"):
        assert word in text

    assert "no order" in failed("trace", str(uuid.uuid4()))
    assert "not an order id" in failed("trace", "banana")


# -- dead letters ------------------------------------------------------------------------------


def failing_inventory(shop) -> tuple[list[PartitionWorker], Counter, dict]:
    """inventory's consumer replaced by one whose OrderPlaced handler fails (while
    broken["failing"]) and gives up at once."""
    broken = {"failing": True}

    def flaky(uow, event):
        if broken["failing"]:
            raise RuntimeError("stock database on fire")
        INVENTORY_HANDLERS["OrderPlaced"](uow, event)

    workers, outcomes = take_over(
        shop,
        "inventory",
        "inventory-7",
        {**INVENTORY_HANDLERS, "OrderPlaced": flaky},
        max_deliveries=1,
    )
    return workers, outcomes, broken


def test_trace_shows_a_dead_lettered_event_with_its_dead_letter_id(shop):
    """Issue 9 item 16: a dead-lettered event is "dead-lettered <id>", not "not yet"."""
    workers, outcomes, _broken = failing_inventory(shop)
    order_id = shop.place("alice", [("apple", 2)])
    shop.publish("orders")
    assert drain(workers) == 1 and outcomes["dead_lettered"] == 1
    ((letter_id, entry_id),) = dead_letter_rows(shop, "inventory")

    report = saga_json("trace", order_id)
    placed = {d["group"]: d for d in report["events"][0]["deliveries"]}
    assert placed["inventory"]["status"] == "dead_lettered"
    assert placed["inventory"]["dead_letter"] == {
        "id": letter_id,
        "stream": partition_stream(ORDERS_EVENTS, part(order_id)),
        "entry_id": entry_id,
    }
    assert placed["inventory"]["failed_attempts"] == 1
    assert "stock database on fire" in placed["inventory"]["last_error"]
    text = saga("trace", order_id).output
    assert f"dead-lettered {letter_id}" in text
    assert "not yet" not in text


def dead_letter_rows(shop, group: str) -> list[tuple[int, str]]:
    with psycopg.connect(shop.db_urls[group]) as conn:
        return conn.execute(
            "SELECT id, entry_id FROM dead_letters WHERE consumer_group = %s ORDER BY id", (group,)
        ).fetchall()


def test_dead_letters_list_show_and_redrive_to_the_failing_group_only(shop):
    workers, outcomes, broken = failing_inventory(shop)
    order_id = shop.place("alice", [("apple", 2)])
    p = part(order_id)
    shop.publish("orders")
    assert drain(workers) == 1
    assert outcomes["dead_lettered"] == 1
    assert shop.deliver("billing") == 1  # billing ignores OrderPlaced and acknowledges it

    letters = saga_json("dead-letters", "list")
    assert letters["totals"] == {"orders": 0, "inventory": 1, "billing": 0}
    (letter,) = letters["dead_letters"]
    assert letter["group"] == "inventory"
    assert (letter["partition"], letter["stream"]) == (p, partition_stream(ORDERS_EVENTS, p))
    assert letter["event_type"] == "OrderPlaced"
    assert letter["correlation_id"] == order_id
    assert letter["original_stream"] == partition_stream(ORDERS_EVENTS, p)
    assert letter["attempts"] == 1 and letter["state"] == "dead"
    assert "stock database on fire" in letter["error"]
    assert "stock database on fire" in saga("dead-letters", "list", "inventory").output
    assert saga_json("dead-letters", "list", "--partition", str((p + 1) % P))["dead_letters"] == []
    report = saga_json("streams")
    summaries = {(s["group"], s["partition"]): s for s in report["groups"]}
    assert summaries[("inventory", p)]["dead_letters"] == 1
    assert sum(s["dead_letters"] for s in summaries.values()) == 1
    counts = {
        (x["stream"], g["group"]): g["dead_letters_from_stream"]
        for b in report["streams"]
        for x in b["partitions"]
        if x["partition"] == p
        for g in x["groups"]
    }
    assert counts[(partition_stream(ORDERS_EVENTS, p), "inventory")] == 1
    assert counts[(partition_stream("billing.events", p), "inventory")] == 0
    assert counts[(partition_stream(ORDERS_EVENTS, p), "billing")] == 0
    assert "no dead letters" in saga("dead-letters", "list", "billing").output

    shown = saga_json("dead-letters", "show", str(letter["id"]))
    assert shown["group"] == "inventory" and shown["partition"] == p
    assert shown["payload"]["order_id"] == order_id
    assert shown["fields"]["original_id"] == letter["original_id"]
    text = saga("dead-letters", "show", str(letter["id"]), "--group", "inventory").output
    assert "RuntimeError: stock database on fire" in text and order_id in text
    assert "no dead letter" in failed("dead-letters", "show", "999")
    assert "abc" in failed("dead-letters", "show", "abc")

    assert "no dead letter 999" in failed("dead-letters", "redrive", "999", "--group", "inventory")
    assert failed("dead-letters", "redrive", "--group", "inventory")  # neither ids nor --all

    # Redis loses everything: the dead letter is in inventory's database, untouched
    orders_length = stream_total(shop.redis, ORDERS_EVENTS)
    requested = saga_json("dead-letters", "redrive", str(letter["id"]), "--group", "inventory")
    assert [(m["id"], m["partition"]) for m in requested["redrive_requested"]] == [
        (letter["id"], p)
    ]
    assert saga_json("dead-letters", "list")["dead_letters"][0]["state"] == "redrive requested"
    assert stream_total(shop.redis, ORDERS_EVENTS) == orders_length  # nothing written to Redis
    assert shop.redis.xlen(redrive_stream("inventory", p)) == 0

    # still broken: the re-drive fails, is recorded, and the dead letter stays one
    assert sum(w.redrive_requested() for w in workers) == 1
    (again,) = saga_json("dead-letters", "list")["dead_letters"]
    assert (again["state"], again["attempts"], again["redrives"]) == ("dead", 2, 1)
    assert again["redrive_outcome"].startswith("re-drive failed")

    # billing, the other group on orders.events, never sees it again
    assert shop.deliver("billing") == 0
    # inventory, fixed, handles it when re-driven, and the saga completes
    broken["failing"] = False
    saga("dead-letters", "redrive", "--all", "--group", "inventory")
    assert sum(w.redrive_requested() for w in workers) == 1
    assert outcomes["processed"] == 1
    assert saga_json("dead-letters", "list")["dead_letters"] == []
    (done,) = saga_json("dead-letters", "list", "--all")["dead_letters"]
    assert (done["state"], done["redrive_outcome"], done["redrives"]) == (
        "re-driven",
        "re-driven: processed",
        2,
    )
    assert "re-driven already" in failed(
        "dead-letters", "redrive", str(letter["id"]), "--group", "inventory"
    )
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"


def test_dead_letters_survive_redis_losing_its_data_and_can_be_redriven(shop):
    workers, outcomes, broken = failing_inventory(shop)
    order_id = shop.place("alice", [("apple", 2)])
    shop.publish("orders")
    assert drain(workers) == 1 and outcomes["dead_lettered"] == 1
    shop.redis.flushall()
    assert saga_json("dead-letters", "list")["totals"]["inventory"] == 1
    broken["failing"] = False
    saga("dead-letters", "redrive", "--all", "--group", "inventory")
    assert sum(w.redrive_requested() for w in workers) == 1
    assert outcomes["processed"] == 1
    assert saga_json("dead-letters", "list")["totals"]["inventory"] == 0
    with psycopg.connect(shop.db_urls["inventory"]) as conn:
        (status,) = conn.execute(
            "SELECT status FROM reservations WHERE order_id = %s", (order_id,)
        ).fetchone()
    assert status == "held"


def test_a_contract_breaking_entry_redriven_fails_again_and_stays_a_dead_letter(shop):
    # An entry that breaks its contract: every group that handles its type dead-letters it
    # at once (inventory and billing both react to OrderCancelled).
    order_id = str(uuid.uuid4())
    p = part(order_id)
    shop.redis.xadd(
        partition_stream(ORDERS_EVENTS, p),
        {"event_type": "OrderCancelled", "aggregate_id": order_id, "payload": "{not json"},
    )
    assert shop.deliver("inventory") == 1 and shop.deliver("billing") == 1
    letters = saga_json("dead-letters", "list")
    assert letters["totals"] == {"orders": 0, "inventory": 1, "billing": 1}
    assert all(d["error"].startswith("contract:") for d in letters["dead_letters"])
    old_id = next(d["id"] for d in letters["dead_letters"] if d["group"] == "billing")
    shown = saga_json("dead-letters", "show", str(old_id), "--group", "billing")
    assert shown["payload"] == "{not json"
    if old_id == next(d["id"] for d in letters["dead_letters"] if d["group"] == "inventory"):
        assert "say which" in failed("dead-letters", "show", str(old_id))

    text = saga("dead-letters", "redrive", "--all", "--group", "billing").output
    assert "1 re-drive requests recorded for billing" in text
    assert sum(w.redrive_requested() for w in shop.consumers["billing"]) == 1
    (again,) = saga_json("dead-letters", "list", "billing")["dead_letters"]
    assert (again["id"], again["state"], again["redrives"]) == (old_id, "dead", 1)
    assert again["partition"] == p
    assert saga_json("dead-letters", "list", "inventory")["totals"]["inventory"] == 1
    nothing = saga("dead-letters", "redrive", "--all", "--group", "orders").output
    assert "no dead letters to re-drive for orders" in nothing


def test_unreachable_servers_give_one_clear_line(cli_env, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    for command in (["streams"], ["tail", ORDERS_EVENTS]):
        output = failed(*command)
        assert "cannot reach Redis at 127.0.0.1:" in output
        assert len(output.strip().splitlines()) == 1

    monkeypatch.setenv("REDIS_URL", cli_env.redis_url)
    monkeypatch.setenv("ORDERS_DATABASE_URL", f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    assert "cannot reach the orders database" in failed("outbox")
    assert "cannot reach the orders database" in failed("trace", str(uuid.uuid4()))
    assert "cannot reach the orders database" in failed("dead-letters", "list")

    monkeypatch.delenv("REDIS_URL")  # and no stack.env in SAGA_RUN_DIR either
    assert "REDIS_URL is not set" in failed("streams")


def test_partition_count_comes_from_the_setting_else_the_deployment(shop, monkeypatch):
    from service_runtime.partitions import check_partition_count, partitions_in_use

    monkeypatch.delenv("STREAM_PARTITIONS", raising=False)
    assert partitions_in_use() == P  # nothing recorded: the default
    with psycopg.connect(shop.db_urls["inventory"], autocommit=True) as conn:
        check_partition_count(conn, 4, "inventory")
    assert partitions_in_use() == 4
    assert saga_json("streams")["partitions"] == 4
    monkeypatch.setenv("STREAM_PARTITIONS", "2")
    assert partitions_in_use() == 2
