"""Knob dataclasses read their overrides from the environment, defaults stay on the class."""

from __future__ import annotations

import dataclasses

import pytest
import redis

from contracts import DEFAULT_PARTITIONS
from outbox_relay.relay import RelaySettings
from service_runtime.config import (
    ConfigError,
    from_env,
    payment_sweep_seconds,
    redis_cluster,
    rq_redis_url,
    stream_partitions,
)
from service_runtime.consumer import ConsumerSettings
from service_runtime.consumer_group import pool_size
from service_runtime.redis_client import connect


def test_overrides_come_from_prefixed_variables(monkeypatch):
    monkeypatch.setenv("CONSUMER_BATCH_SIZE", "7")
    monkeypatch.setenv("CONSUMER_LEASE_MS", "1500")
    monkeypatch.setenv("CONSUMER_HEARTBEAT_MS", "250")
    settings = from_env(ConsumerSettings, "CONSUMER_", group="g", consumer="c", partitions=4)
    assert (settings.batch_size, settings.lease_ms, settings.heartbeat_ms) == (7, 1500, 250)
    assert settings.partitions == 4
    assert settings.block_ms == ConsumerSettings.block_ms  # not set: the class default


@pytest.mark.parametrize("block_ms", ["0", "-5", "15000"])
def test_a_consumer_block_that_would_hang_or_time_out_is_refused(monkeypatch, block_ms):
    monkeypatch.setenv("CONSUMER_BLOCK_MS", block_ms)
    with pytest.raises(ValueError, match=f"CONSUMER_BLOCK_MS must be from 1 to 14999.*{block_ms}"):
        from_env(ConsumerSettings, "CONSUMER_", group="g", consumer="c")
    monkeypatch.setenv("CONSUMER_BLOCK_MS", "14999")
    assert from_env(ConsumerSettings, "CONSUMER_", group="g", consumer="c").block_ms == 14999


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_consumer_with_no_transaction_at_a_time_is_refused(monkeypatch, value):
    monkeypatch.setenv("CONSUMER_MAX_TRANSACTIONS", value)
    with pytest.raises(ValueError, match=f"CONSUMER_MAX_TRANSACTIONS must be 1 or more.*{value}"):
        from_env(ConsumerSettings, "CONSUMER_", group="g", consumer="c")


def test_the_workers_pool_holds_one_connection_per_transaction_at_once_up_to_the_partitions(
    monkeypatch,
):
    monkeypatch.setenv("CONSUMER_MAX_TRANSACTIONS", "2")
    settings = from_env(ConsumerSettings, "CONSUMER_", group="g", consumer="c", partitions=8)
    assert pool_size(settings) == 2
    assert pool_size(dataclasses.replace(settings, partitions=1)) == 1


@pytest.mark.parametrize("name", ["", "inventory 1", "inventory\n1", "caf\u00e9-1"])
def test_a_consumer_name_redis_would_refuse_as_a_connection_name_is_refused(name):
    """The consumer's name also names its Redis connections (to wake its blocked reads);
    CLIENT SETNAME takes printable ASCII without spaces only."""
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        ConsumerSettings(group="g", consumer=name)
    assert ConsumerSettings(group="g", consumer="inventory-host.example-42_1").consumer


def test_given_values_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("RELAY_BATCH_SIZE", "9")
    monkeypatch.setenv("RELAY_PARTITIONS", "3")
    settings = from_env(RelaySettings, "RELAY_", producer="orders", partitions=8)
    assert (settings.partitions, settings.batch_size) == (8, 9)


@pytest.mark.parametrize(
    "name, read, default, good, bads",
    [
        ("STREAM_PARTITIONS", stream_partitions, DEFAULT_PARTITIONS, 16,
         ("0", "-1", "eight", "100000")),
        ("PAYMENT_SWEEP_SECONDS", payment_sweep_seconds, 5, 1, ("0", "1.5", "soon", "3601")),
    ],
)  # fmt: skip
def test_whole_number_settings_default_and_bounds(monkeypatch, name, read, default, good, bads):
    monkeypatch.delenv(name, raising=False)
    assert read() == default
    monkeypatch.setenv(name, str(good))
    assert read() == good
    for bad in bads:
        monkeypatch.setenv(name, bad)
        with pytest.raises(ConfigError, match=name):
            read()


# -- rq's Redis beside a Redis Cluster (DESIGN.md §6a) --------------------------------------------


@pytest.fixture
def no_stack(monkeypatch, tmp_path):
    """No embedded stack's stack.env to fall back on; no Redis variables set."""
    monkeypatch.setenv("SAGA_RUN_DIR", str(tmp_path))
    for name in ("REDIS_URL", "REDIS_CLUSTER", "RQ_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_rq_uses_redis_url_when_there_is_no_cluster(no_stack):
    no_stack.setenv("REDIS_URL", "redis://streams:6379/0")
    assert rq_redis_url() == "redis://streams:6379/0"


def test_rq_redis_url_wins(no_stack):
    no_stack.setenv("REDIS_URL", "redis://streams:6379/0")
    no_stack.setenv("REDIS_CLUSTER", "1")
    no_stack.setenv("RQ_REDIS_URL", "redis://rq:6379/0")
    assert rq_redis_url() == "redis://rq:6379/0"


def test_a_cluster_without_rq_redis_url_is_a_config_error(no_stack):
    no_stack.setenv("REDIS_URL", "redis://streams:6379/0")
    no_stack.setenv("REDIS_CLUSTER", "1")
    with pytest.raises(ConfigError, match="RQ_REDIS_URL"):
        rq_redis_url()


@pytest.mark.parametrize(
    ("value", "cluster"), [("1", True), ("yes", True), ("0", False), ("", False)]
)
def test_redis_cluster_setting(no_stack, value, cluster):
    no_stack.setenv("REDIS_CLUSTER", value)
    assert redis_cluster() is cluster


def test_connect_without_redis_cluster_is_a_plain_lazy_redis(no_stack):
    client = connect("redis://127.0.0.1:1/0")  # nothing listens: a plain client connects lazily
    assert type(client) is redis.Redis
    assert client.get_connection_kwargs()["decode_responses"] is True
