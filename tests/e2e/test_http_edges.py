"""What gunicorn itself answers (issue 9.5-7): over the real web processes, on raw sockets where
the client must misbehave in ways an HTTP library will not."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest
import requests

from service_runtime.web import MAX_BODY_BYTES
from tests import tokens

SERVICES = ("orders", "inventory", "billing")
WRITE_PATH = {"orders": "/orders", "inventory": "/products/p1", "billing": "/accounts/a1"}
WRITE_METHOD = {"orders": "POST", "inventory": "PUT", "billing": "PUT"}


# an operator's token: these requests must reach the body handling (a 401 comes first)
_AUTH = f"Authorization: Bearer {tokens.admin(ttl_seconds=4 * 3600)}\r\n"


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (all of ours have one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _oversized_json() -> bytes:
    return json.dumps({"name": "x" * (MAX_BODY_BYTES + 10)}).encode()


@pytest.mark.parametrize("service", SERVICES)
def test_an_oversized_chunked_body_is_a_413_like_a_sized_one(system, service):
    body = _oversized_json()
    with _connect(system.urls[service]) as sock:
        sock.sendall(
            f"{WRITE_METHOD[service]} {WRITE_PATH[service]} HTTP/1.1\r\nHost: x\r\n{_AUTH}"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        status, headers, payload = _read_response(sock)
    assert status == 413, payload
    assert headers["content-type"] == "application/json"
    assert json.loads(payload)["code"] == 413


@pytest.mark.parametrize("chunked", [False, True])
def test_after_a_413_the_connection_is_closed_and_says_so(system, chunked):
    body = _oversized_json()
    framing = (
        b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
        if chunked
        else f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    with _connect(system.urls["inventory"]) as sock:
        sock.sendall(
            b"PUT /products/p1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + _AUTH.encode()
            + framing
        )
        status, headers, _ = _read_response(sock)
        assert status == 413
        # A client that believes the header must not lose its next request.
        assert headers["connection"] == "close"


def test_a_client_session_keeps_working_after_a_413(system):
    with requests.Session() as session:
        for _ in range(5):
            too_big = session.put(
                f"{system.urls['inventory']}/products/p1",
                data=_oversized_json(),
                headers={"Content-Type": "application/json"},
            )
            assert too_big.status_code == 413
            assert session.get(f"{system.urls['inventory']}/health").status_code == 200


@pytest.mark.parametrize("service", SERVICES)
def test_a_url_over_the_limit_is_a_json_414(system, service):
    response = requests.get(f"{system.urls[service]}/{'a' * 9000}")
    assert response.status_code == 414
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["code"] == 414 and response.json()["message"]


@pytest.mark.parametrize("service", SERVICES)
def test_a_header_with_a_control_character_is_a_json_400(system, service):
    with _connect(system.urls[service]) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n")
        status, headers, payload = _read_response(sock)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert {"code", "status", "message"} <= set(json.loads(payload))
