"""Secrets of the embedded stack: generated once per run folder, private, masked when shown."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from devstack.secrets import redact_url, secret
from sagactl.stack_commands import banner, stack


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cr3t@127.0.0.1:63790/0", "redis://:***@127.0.0.1:63790/0"),
        ("redis://user:s3cr3t@h:1/2", "redis://user:***@h:1/2"),
        (
            "postgresql://orders_svc:s3cr3t@127.0.0.1:5432/orders",
            "postgresql://orders_svc:***@127.0.0.1:5432/orders",
        ),
        (
            "postgresql://u@h/db?password=s3cr3t&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redact_url_masks_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_secret_is_generated_once_and_private(tmp_path) -> None:
    first = secret(tmp_path, "redis")
    assert secret(tmp_path, "redis") == first and len(first) >= 20
    assert secret(tmp_path, "other") != first
    assert oct((tmp_path / "secrets" / "redis").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "secrets").stat().st_mode & 0o777) == "0o700"
    assert [p.name for p in (tmp_path / "secrets").iterdir()].count("redis") == 1


def test_the_banner_masks_and_stack_env_exports_for_redis_cli(tmp_path, monkeypatch) -> None:
    env = {
        "REDIS_URL": "redis://:s3cr3t@127.0.0.1:63790/0",
        **{f"{s}_PORT": "1" for s in ("ORDERS", "INVENTORY", "BILLING")},
    }
    assert "s3cr3t" not in banner(env)
    monkeypatch.setenv("SAGA_RUN_DIR", str(tmp_path))
    (tmp_path / "stack.env").write_text(f"REDIS_URL={env['REDIS_URL']}\n")
    out = CliRunner().invoke(stack, ["env"]).output
    assert "export REDISCLI_AUTH=s3cr3t" in out  # eval'd by the user: its one job
