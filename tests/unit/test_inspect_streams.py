"""`saga streams` / the console's report of a group, read while its consumer is live."""

from __future__ import annotations

from typing import Any

import fakeredis

from sagactl.inspect.streams import group_report

STREAM = "orders.events.{p0}"
GROUP = "inventory"


class AckedMeanwhile:
    """A client on which the consumer's XACK lands between XINFO GROUPS and XPENDING."""

    def __init__(self, client: fakeredis.FakeRedis) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def xpending(self, stream: str, group: str) -> Any:
        ids = [p["message_id"] for p in self.client.xpending_range(stream, group, "-", "+", 100)]
        self.client.xack(stream, group, *ids)
        return self.client.xpending(stream, group)


def test_a_group_whose_pending_entries_were_acked_meanwhile_is_reported_without_an_oldest():
    client = fakeredis.FakeRedis(decode_responses=True)
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    client.xadd(STREAM, {"event_type": "OrderPlaced"})
    client.xreadgroup(GROUP, "inventory-1", {STREAM: ">"})
    [info] = client.xinfo_groups(STREAM)
    assert info["pending"] == 1

    report = group_report(AckedMeanwhile(client), STREAM, info, {})
    assert report["pending"] == 1  # as XINFO counted them
    assert (report["oldest_pending_id"], report["oldest_pending_idle_ms"]) == (None, None)


def test_a_group_with_a_pending_entry_reports_the_oldest():
    client = fakeredis.FakeRedis(decode_responses=True)
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    first = client.xadd(STREAM, {"event_type": "OrderPlaced"})
    client.xadd(STREAM, {"event_type": "OrderPlaced"})
    client.xreadgroup(GROUP, "inventory-1", {STREAM: ">"})
    [info] = client.xinfo_groups(STREAM)

    report = group_report(client, STREAM, info, {})
    assert report["oldest_pending_id"] == first
    assert report["oldest_pending_idle_ms"] >= 0
