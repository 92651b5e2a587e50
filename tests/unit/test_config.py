"""Knob dataclasses read their overrides from the environment, defaults stay on the class."""

from __future__ import annotations

import pytest

from contracts import DEFAULT_PARTITIONS
from outbox_relay.relay import RelaySettings
from service_runtime.config import ConfigError, from_env, stream_partitions
from service_runtime.consumer import ConsumerSettings


def test_overrides_come_from_prefixed_variables(monkeypatch):
    monkeypatch.setenv("CONSUMER_BATCH_SIZE", "7")
    monkeypatch.setenv("CONSUMER_LEASE_MS", "1500")
    monkeypatch.setenv("CONSUMER_HEARTBEAT_MS", "250")
    settings = from_env(ConsumerSettings, "CONSUMER_", group="g", consumer="c", partitions=4)
    assert (settings.batch_size, settings.lease_ms, settings.heartbeat_ms) == (7, 1500, 250)
    assert settings.partitions == 4
    assert settings.block_ms == ConsumerSettings.block_ms  # not set: the class default


def test_given_values_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("RELAY_BATCH_SIZE", "9")
    monkeypatch.setenv("RELAY_PARTITIONS", "3")
    settings = from_env(RelaySettings, "RELAY_", producer="orders", partitions=8)
    assert (settings.partitions, settings.batch_size) == (8, 9)


def test_partition_count_defaults_and_bounds(monkeypatch):
    monkeypatch.delenv("STREAM_PARTITIONS", raising=False)
    assert stream_partitions() == DEFAULT_PARTITIONS
    monkeypatch.setenv("STREAM_PARTITIONS", "16")
    assert stream_partitions() == 16
    for bad in ("0", "-1", "eight", "100000"):
        monkeypatch.setenv("STREAM_PARTITIONS", bad)
        with pytest.raises(ConfigError, match="STREAM_PARTITIONS"):
            stream_partitions()
