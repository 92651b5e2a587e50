"""Knob dataclasses read their overrides from the environment, defaults stay on the class."""

from __future__ import annotations

from outbox_relay.relay import RelaySettings
from service_runtime.config import from_env
from service_runtime.consumer import ConsumerSettings


def test_overrides_come_from_prefixed_variables(monkeypatch):
    monkeypatch.setenv("CONSUMER_BATCH_SIZE", "7")
    monkeypatch.setenv("CONSUMER_LEASE_MS", "2500")
    settings = from_env(ConsumerSettings, "CONSUMER_", group="g", consumer="c", partitions=4)
    assert (settings.batch_size, settings.lease_ms, settings.partitions) == (7, 2500, 4)
    assert settings.block_ms == ConsumerSettings.block_ms  # not set: the class default


def test_given_values_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("RELAY_BATCH_SIZE", "9")
    monkeypatch.setenv("RELAY_PARTITIONS", "3")
    settings = from_env(RelaySettings, "RELAY_", producer="orders", partitions=8)
    assert (settings.partitions, settings.batch_size) == (8, 9)
