"""The loss-detection rule (outbox_relay/positions.py), pure and on fakeredis."""

from __future__ import annotations

import fakeredis
import pytest

from outbox_relay.durability import Durability
from outbox_relay.positions import behind, id_key, is_behind, recreate_groups, redis_last_ids


def test_entry_ids_compare_as_numbers_not_text():
    assert id_key("10-0") > id_key("9-5")
    assert not is_behind("1714557600000-10", "1714557600000-9")


@pytest.mark.parametrize(
    ("redis_last", "recorded", "lost"),
    [
        (None, "5-0", True),  # no stream: restarted empty, flushed
        ("0-0", "5-0", True),  # recreated empty (a consumer's MKSTREAM)
        ("4-9", "5-0", True),  # an old AOF, a lagging replica
        ("5-0", "5-0", False),  # in step
        ("6-0", "5-0", False),  # ahead: sent but not yet marked (crash, WAIT failed)
        (None, None, False),  # nothing recorded: nothing to compare
    ],
)
def test_redis_is_behind_when_its_last_generated_id_is_below_the_recorded_one(
    redis_last, recorded, lost
):
    assert is_behind(redis_last, recorded) is lost


def test_last_generated_id_survives_trimming_and_a_missing_stream_is_none():
    r = fakeredis.FakeRedis(decode_responses=True)
    last = [r.xadd("s.{p0}", {"a": "1"}) for _ in range(3)][-1]
    r.xtrim("s.{p0}", maxlen=0)
    assert redis_last_ids(r, ["s.{p0}", "gone.{p0}"]) == {"s.{p0}": last, "gone.{p0}": None}
    assert behind(
        {"s.{p0}": last, "gone.{p0}": "1-1"}, redis_last_ids(r, ["s.{p0}", "gone.{p0}"])
    ) == {"gone.{p0}": "0-0"}


def test_vanished_groups_are_recreated_at_zero_and_live_ones_left_alone():
    r = fakeredis.FakeRedis(decode_responses=True)
    r.xadd("orders.events.{p1}", {"a": "1"})
    r.xgroup_create("orders.events.{p1}", "inventory", id="$")
    recreate_groups(r, ["orders.events.{p1}"])
    groups = {g["name"]: g["last-delivered-id"] for g in r.xinfo_groups("orders.events.{p1}")}
    assert groups["billing"] == "0-0" and groups["inventory"] != "0-0"
    assert "orders" not in groups  # orders does not read its own stream


@pytest.mark.parametrize(
    ("text", "command"),
    [("ack", None), ("replicas:2", ("WAIT", 2, 100)), ("fsync", ("WAITAOF", 1, 0, 100))],
)
def test_durability_modes(text, command):
    assert Durability.parse(text).wait_command(100) == command
