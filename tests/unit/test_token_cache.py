"""The verifier remembers a verified token until it expires, and only a verified one."""

from __future__ import annotations

import time

import pytest

from devstack import issuer
from service_runtime import auth
from service_runtime.auth import CUSTOMER, InvalidToken, Verifier


@pytest.fixture
def keys(tmp_path):
    issuer.ensure_key_pair(tmp_path)
    private = issuer.private_key_file(tmp_path).read_bytes()
    return private, Verifier(public_key_pem=issuer.public_key_file(tmp_path).read_bytes())


def test_a_remembered_token_still_expires(keys, monkeypatch):
    private, verifier = keys
    monkeypatch.setattr(auth, "LEEWAY_SECONDS", 0)  # else a token outlives its exp by 30 s
    token = issuer.sign(private, "alice", (CUSTOMER,), ttl_seconds=1)
    assert verifier.verify(token).subject == "alice"
    assert verifier.verify(token).subject == "alice"  # from memory
    expires = time.time() + 3
    while time.time() < expires:
        try:
            verifier.verify(token)
        except InvalidToken as err:
            assert "expired" in str(err)
            return
        time.sleep(0.05)
    pytest.fail("a remembered token was still accepted after it expired")


def test_a_rejected_token_is_not_remembered_and_a_forgery_never_rides_on_a_good_one(keys):
    private, verifier = keys
    good = issuer.sign(private, "alice", (CUSTOMER,))
    verifier.verify(good)
    header, payload, signature = good.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    for _ in range(2):
        with pytest.raises(InvalidToken):
            verifier.verify(forged)
    assert verifier.verify(good).subject == "alice"
