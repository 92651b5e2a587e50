"""STREAM_PARTITIONS is fixed when a deployment is created: `saga run-all` with another count
refuses to start before any process runs, and says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import stack
from service_runtime.config import ConfigError

SAGA = str(Path(sys.executable).parent / "saga")


def test_the_first_start_records_the_count_and_another_is_refused(clean_state, monkeypatch):
    env = clean_state.env
    monkeypatch.setenv("STREAM_PARTITIONS", "8")
    stack.migrate_all(env)  # records 8 in every service database
    stack.migrate_all(env)  # the same count again: fine
    monkeypatch.setenv("STREAM_PARTITIONS", "4")
    with pytest.raises(ConfigError, match="STREAM_PARTITIONS=8"):
        stack.migrate_all(env)


def test_run_all_with_another_count_exits_before_starting_anything(
    clean_state, tmp_path, monkeypatch
):
    monkeypatch.setenv("STREAM_PARTITIONS", "8")
    stack.migrate_all(clean_state.env)  # the deployment was created with 8
    env = {**os.environ, **clean_state.env, "SAGA_RUN_DIR": str(tmp_path)}
    env["STREAM_PARTITIONS"] = "16"
    result = subprocess.run([SAGA, "run-all"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "STREAM_PARTITIONS=8" in result.stderr and "STREAM_PARTITIONS=16" in result.stderr
    assert "supervisor" not in result.stdout  # no process was started
