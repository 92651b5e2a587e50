"""The relay's own session (outbox_relay/relay.py, SESSION_OPTIONS). Real PostgreSQL.

- Its statements go by index even when planned on a new, empty outbox: psycopg prepares a
  statement after a few runs and PostgreSQL may keep its generic plan until autovacuum analyzes
  the table; a plan made while the outbox was empty would seq-scan it on every mark for
  minutes, at a cost that grows with the table.
- Its marks commit without waiting for the WAL flush (one lost with a crash is sent again); a
  repair's un-marking waits for it."""

from __future__ import annotations

import re

import pytest

from contracts import INVENTORY_EVENTS, partition_stream
from outbox_relay import positions, publisher
from outbox_relay.relay import connect_session
from service_runtime.db import connect

# (statement, its parameters as the relay sends them: one marked row, a claim of 500)
STATEMENTS = {
    "claim": (publisher._CLAIM_BATCH, ("500",)),
    "mark": (publisher._MARK_PUBLISHED, ("7", "s.0", "1-1", "s.0", "1-1")),
    "mark and claim": (
        publisher._MARK_AND_CLAIM_BATCH,
        ("7", "s.0", "1-1", "s.0", "1-1", "7", "500"),
    ),
    "claim next": (publisher._CLAIM_NEXT_BATCH, ("7", "7", "500")),
}


def generic_plan(conn, statement: str, params: tuple[str, ...]) -> str:
    """The plan PostgreSQL keeps for `statement` prepared now (a generic plan, as a prepared
    statement settles on after its first runs), as EXPLAIN prints it."""
    numbered = iter(range(1, len(params) + 1))
    text = re.sub(r"%s", lambda _m: f"${next(numbered)}", statement)
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute(f"PREPARE relay_statement AS {text}")
    values = ", ".join(f"'{value}'" for value in params)
    rows = conn.execute(f"EXPLAIN EXECUTE relay_statement({values})").fetchall()
    return "\n".join(row[0] for row in rows)


def outbox_scans(plan: str) -> list[str]:
    return [line.strip() for line in plan.splitlines() if re.search(r"Scan.* on outbox\b", line)]


@pytest.mark.parametrize("name", STATEMENTS)
def test_the_relays_session_plans_by_index_on_an_empty_outbox(db_url, db, name):
    assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    statement, params = STATEMENTS[name]

    with connect_session(db_url) as conn:
        scans = outbox_scans(generic_plan(conn, statement, params))

    assert scans, "the statement reads the outbox"
    assert all(re.match(r"(->  )?Index (Only )?Scan", scan) for scan in scans), scans


def test_a_plain_session_would_seq_scan_the_outbox_to_mark(db_url):
    """Why the relay's session needs its options: the same mark planned by a plain session."""
    statement, params = STATEMENTS["mark"]

    with connect(db_url) as conn:
        scans = outbox_scans(generic_plan(conn, statement, params))

    assert any("Seq Scan on outbox" in scan for scan in scans), scans


def test_the_relays_marks_do_not_wait_for_the_flush_and_a_repair_does(db_url, redis_client):
    stream = partition_stream(INVENTORY_EVENTS, 0)

    def synchronous_commit(conn) -> str:
        return conn.execute("SHOW synchronous_commit").fetchone()[0]

    with connect_session(db_url) as conn:
        assert synchronous_commit(conn) == "off"
        with conn.transaction():
            positions.record(conn, {stream: "5-0"})
            positions.repair(conn, redis_client, "inventory", {stream: "0-0"}, {stream: "5-0"})
            assert synchronous_commit(conn) == "on"
        assert synchronous_commit(conn) == "off"  # for that transaction only
        assert positions.load(conn) == {stream: "0-0"}
