"""The console's pure parts: the Mermaid sequence diagram of a trace, the flow drawing's numbers,
and the Flask app's guards (loopback Host only, same-site forms, the operator login and its
session, the re-drive's confirmation), with the inspection functions replaced so no server is
needed. Tokens are real JWTs of the test session's issuer (tests/tokens.py), verified with
AUTH_PUBLIC_KEY_FILE as the REST APIs verify them."""

from __future__ import annotations

import logging
import tempfile
import time
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from devstack import issuer
from sagactl.console import app as console_app
from sagactl.console import auth, views
from sagactl.console.login import local_path
from sagactl.console.monitor import Monitor
from sagactl.inspect.diagrams import order_sequence_diagram
from tests import tokens


def _event(event_type: str, producer: str, *deliveries: tuple[str, str, float | None]):
    return {
        "event_type": event_type,
        "producer": producer,
        "commit_to_publish_ms": 10.0,
        "published_at": "2026-01-01T00:00:00.000Z",
        "deliveries": [
            {
                "group": group,
                "status": status,
                "publish_to_processed_ms": ms,
                "failed_attempts": 3 if status == "failing" else None,
                "dead_letter": {"id": "1-0"} if status == "dead_lettered" else None,
            }
            for group, status, ms in deliveries
        ],
    }


TRACE = {
    "order_id": "o",
    "partition": 1,
    "events": [
        _event(
            "OrderPlaced",
            "orders",
            ("inventory", "processed", 13.0),
            ("billing", "not_handled", None),
        ),
        _event(
            "StockReserved",
            "inventory",
            ("orders", "processed", 2.5),
            ("billing", "processed", 1500.0),
        ),
        _event("OrderConfirmed", "orders", ("inventory", "not_handled", None)),
        _event(
            "OrderCancelled",
            "orders",
            ("inventory", "dead_lettered", None),
            ("billing", "processed", 4.0),
        ),
        _event("PaymentRefunded", "billing", ("orders", "failing", None)),
    ],
    "state": {},
}


def test_the_sequence_diagram_has_the_services_one_arrow_per_reaction_and_compensations_apart():
    text = order_sequence_diagram(TRACE)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[:4] == [
        "sequenceDiagram",
        "participant orders",
        "participant inventory",
        "participant billing",
    ]
    assert "orders ->> inventory: OrderPlaced (23 ms)" in lines  # commit -> processed
    assert "inventory ->> billing: StockReserved (1.5 s)" in lines
    assert "Note over orders: OrderConfirmed (no service reacts)" in lines
    assert not any("orders ->> billing: OrderPlaced" in line for line in lines)  # not handled
    # compensations: dashed, in one shaded block; a dead letter ends in a cross
    start = lines.index(next(line for line in lines if line.startswith("rect ")))
    assert lines[start + 1] == "orders --x inventory: OrderCancelled DEAD-LETTERED"
    assert lines[start + 2] == "orders -->> billing: OrderCancelled (14 ms)"
    assert lines[start + 3] == "billing --x orders: PaymentRefunded failing (attempt 3)"
    assert lines[start + 4] == "end"


def test_labels_cannot_break_the_diagram():
    trace = {"events": [_event("Bad;Type#x", "orders", ("inventory", "processed", 1.0))]}
    assert "orders ->> inventory: Bad Type x (11 ms)" in order_sequence_diagram(trace)
    assert "no events in any outbox" in order_sequence_diagram({"events": []})


def _streams(lag: int, pending: int, dead: int) -> dict[str, Any]:
    def part(stream: str, group: str) -> dict[str, Any]:
        return {
            "stream": stream,
            "groups": [
                {
                    "group": group,
                    "lag": lag,
                    "pending": pending,
                    "lag_capped": False,
                    "dead_letters_from_stream": dead,
                    "oldest_pending_idle_ms": 5.0 if pending else None,
                }
            ],
        }

    return {
        "streams": [
            {
                "stream": "orders.events",
                "partitions": [part("orders.events.{p0}", "inventory")] * 2,
            },
            {"stream": "inventory.events", "partitions": []},
            {"stream": "billing.events", "partitions": []},
        ]
    }


def test_each_arrow_of_the_flow_sums_its_group_over_the_partitions():
    edges = {(e["stream"], e["group"]): e for e in views.stream_edges(_streams(3, 1, 2))}
    assert len(edges) == 6
    edge = edges[("orders.events", "inventory")]
    assert (edge["producer"], edge["lag"], edge["pending"], edge["dead_letters"]) == (
        "orders",
        6,
        2,
        4,
    )
    assert edge["state"] == "bad" and edges[("orders.events", "billing")]["state"] == "ok"


@pytest.fixture
def client(monkeypatch, tmp_path):
    monkeypatch.setenv("SAGA_RUN_DIR", str(tmp_path))
    letter = {
        "group": "inventory",
        "partition": 2,
        "stream": "orders.events.{p2}",
        "entry_id": "5-0",
        "id": 7,
        "fields": {"event_type": "OrderPlaced"},
        "payload": {},
        "event_type": "OrderPlaced",
        "error": "boom",
        "state": "dead",
        "redrive_outcome": None,
        "correlation_id": None,
    }
    redriven: list[Any] = []

    class FakeConnections:
        def client(self):
            return object()

        def partitions(self):
            return 8

    monkeypatch.setattr(console_app, "get_dead_letter", lambda *a, **k: letter)
    monkeypatch.setattr(
        console_app, "list_dead_letters", lambda group: {"totals": {}, "dead_letters": []}
    )

    def request_redrive(group, ids):
        redriven.append((group, ids))
        return [
            {
                "id": 7,
                "partition": 2,
                "stream": "orders.events.{p2}",
                "entry_id": "5-0",
                "event_type": "OrderPlaced",
                "event_id": "e",
            }
        ]

    monkeypatch.setattr(console_app, "request_redrive", request_redrive)
    # no verifier given: the console reads AUTH_PUBLIC_KEY_FILE, as the services do
    app = console_app.create_app(port=8000, connections=FakeConnections())
    app.testing = True
    test_client = app.test_client()
    test_client.redriven = redriven
    return test_client


PAGES = ["/", "/orders", "/orders/6b1f1bd8-0a4e-4e55-a9c1-2c86d1ef1b0c", "/dead-letters"]
PAGES += ["/dead-letters/inventory/7"]
FRAGMENTS = ["/fragments/overview", "/fragments/orders/6b1f1bd8-0a4e-4e55-a9c1-2c86d1ef1b0c"]


def _log_in(client, token: str | None = None, next_page: str | None = None, **kwargs):
    data = {"token": token if token is not None else tokens.admin()}
    if next_page is not None:
        data["next"] = next_page
    return client.post("/login", data=data, **kwargs)


def _login_target(response, header: str = "Location") -> tuple[str, dict[str, list[str]]]:
    """Where a refused request is sent: the path and the query."""
    location = urlsplit(response.headers[header])
    return location.path, parse_qs(location.query)


def _session_cookie(client):
    return client.get_cookie("saga_console_session")


def _session_contents(client) -> dict[str, Any]:
    """What the signed cookie carries (readable by whoever holds it, only not forgeable)."""
    app = client.application
    return app.session_interface.get_signing_serializer(app).loads(_session_cookie(client).value)


def test_only_loopback_host_names_are_answered(client):
    for base in ("http://127.0.0.1:8000", "http://localhost:8000"):
        _log_in(client, base_url=base)  # a cookie per host name
        assert client.get("/dead-letters/inventory/7", base_url=base).status_code == 200
    assert client.get("/", base_url="http://attacker.example:8000").status_code == 421
    assert client.get("/login", base_url="http://attacker.example:8000").status_code == 421


@pytest.mark.parametrize("page", PAGES)
def test_a_page_without_a_login_goes_to_the_login_page(client, page):
    response = client.get(page)
    assert response.status_code == 303
    assert _login_target(response) == ("/login", {"next": [page]})


def test_the_page_asked_for_comes_back_with_its_query_after_the_login(client):
    response = client.get("/orders?q=ab&status=confirmed")
    path, query = _login_target(response)
    assert path == "/login" and query["next"] == ["/orders?q=ab&status=confirmed"]
    login_page = client.get(response.headers["Location"])
    assert login_page.status_code == 200
    assert 'value="/orders?q=ab&amp;status=confirmed"' in login_page.get_data(as_text=True)
    done = _log_in(client, next_page=query["next"][0])
    assert done.status_code == 303 and done.headers["Location"] == "/orders?q=ab&status=confirmed"


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_a_live_fragment_without_a_login_sends_the_browser_to_the_login_page(client, fragment):
    response = client.get(
        fragment,
        headers={"HX-Request": "true", "HX-Current-URL": "http://localhost:8000/orders?q=1"},
    )
    assert response.status_code == 401
    assert _login_target(response, "HX-Redirect") == ("/login", {"next": ["/orders?q=1"]})
    assert "<form" not in response.get_data(as_text=True)  # nothing to swap into the page
    samples = client.get("/api/samples")
    assert samples.status_code == 401 and samples.json["login"].startswith("/login")
    assert samples.headers["HX-Redirect"].startswith("/login")


def test_the_login_page_and_the_static_files_need_no_login(client):
    page = client.get("/login")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert 'id="login-form"' in body and "saga token admin" in body
    assert 'aria-label="Main"' not in body  # no navigation to pages it cannot show yet
    assert client.get("/static/console.css").status_code == 200
    assert client.get("/assets/htmx.min.js").status_code in (200, 404)  # 404: not installed


def _foreign_admin_token() -> str:
    with tempfile.TemporaryDirectory() as other:
        issuer.ensure_key_pair(other)
        return issuer.sign(issuer.private_key_file(other).read_bytes(), "mallory", ("admin",))


@pytest.mark.parametrize(
    "token, status, says",
    [
        (lambda: "not-a-token", 401, "malformed"),
        (lambda: "", 401, "Paste"),
        (_foreign_admin_token, 401, "signature"),
        (lambda: tokens.admin(ttl_seconds=-120), 401, "expired"),
        (lambda: tokens.customer("alice"), 403, "admin"),
    ],
    ids=["garbage", "empty", "other-issuer", "expired", "customer"],
)
def test_a_token_that_is_not_a_live_operator_s_gets_the_login_page_again(
    client, token, status, says
):
    given = token()
    response = _log_in(client, given)
    assert response.status_code == status
    body = response.get_data(as_text=True)
    assert 'id="login-problem"' in body and says in body and 'id="login-form"' in body
    if given:
        assert given not in body  # never echoed back
    assert _session_cookie(client) is None
    assert client.get("/").status_code == 303


def test_an_expired_token_within_the_verifier_s_leeway_starts_no_session(client):
    response = _log_in(client, tokens.admin(ttl_seconds=-5))  # accepted for clock skew by APIs
    assert response.status_code == 401 and "expired" in response.get_data(as_text=True)
    assert _session_cookie(client) is None


def test_an_admin_token_logs_in_to_a_session_that_keeps_no_token(client, tmp_path):
    token = tokens.admin(ttl_seconds=600)
    response = _log_in(client, token)
    assert response.status_code == 303 and response.headers["Location"] == "/"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
    contents = _session_contents(client)
    assert set(contents) == {"sub", "scopes", "ends", "sid"}
    assert contents["sub"] == "operator" and contents["scopes"] == ["admin"]
    assert abs(contents["ends"] - (time.time() + 600)) < 5  # the token's expiry
    key = tmp_path / "secrets" / auth.SESSION_SECRET
    assert key.stat().st_mode & 0o777 == 0o600
    for page in ("/", "/dead-letters", "/dead-letters/inventory/7"):
        served = client.get(page)
        assert served.status_code == 200, page
        body = served.get_data(as_text=True)
        assert 'id="signed-in-as">operator<' in body and token not in body
    assert client.get("/fragments/overview", headers={"HX-Request": "true"}).status_code == 200
    assert client.get("/api/samples").status_code == 200
    assert client.get("/login").headers["Location"] == "/"  # already in


def test_a_session_ends_with_its_token(client, monkeypatch):
    _log_in(client, tokens.admin(ttl_seconds=60))
    assert client.get("/").status_code == 200
    later = time.time() + 61
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: later))
    response = client.get("/orders")
    assert response.status_code == 303
    assert _login_target(response) == ("/login", {"next": ["/orders"], "ended": ["1"]})
    assert _session_cookie(client) is None  # the ended session's cookie is removed
    assert "session has ended" in client.get(response.headers["Location"]).get_data(as_text=True)


def test_a_long_lived_token_still_logs_in_for_a_working_day_at_most(client):
    _log_in(client, tokens.admin(ttl_seconds=7 * 86400))
    ends = _session_contents(client)["ends"]
    assert abs(ends - (time.time() + auth.MAX_SESSION_SECONDS)) < 5


def test_a_forged_or_tampered_session_is_no_session(client):
    _log_in(client)
    cookie = _session_cookie(client).value
    client.set_cookie("saga_console_session", "x" + cookie[1:])
    assert client.get("/").status_code == 303


def test_logout_ends_the_session_even_for_a_copy_of_its_cookie(client):
    _log_in(client)
    assert client.get("/logout").status_code == 405  # a link cannot log anyone out
    copy = _session_cookie(client).value
    response = client.post("/logout")
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert _session_cookie(client) is None
    assert client.get("/").status_code == 303
    client.set_cookie("saga_console_session", copy)  # replayed
    assert client.get("/").status_code == 303


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "/\t/evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/login",
        "/logout",
    ],
)
def test_next_never_leads_off_the_console(client, target):
    assert local_path(target) == "/"
    assert _log_in(client, next_page=target).headers["Location"] == "/"


def test_next_keeps_the_console_s_own_paths():
    for target in ("/", "/orders?q=a", "/dead-letters/inventory/7", "/orders/x#history"):
        assert local_path(target) == target


def test_a_redrive_needs_a_login_and_the_confirmation_and_names_the_operator(client, caplog):
    url = "/dead-letters/inventory/7/redrive"
    anonymous = client.post(url, data={"confirm": "7"})
    assert anonymous.status_code == 303 and anonymous.headers["Location"].startswith("/login")
    assert client.redriven == []
    _log_in(client, tokens.issuer.admin_token(tokens.run_dir(), subject="ada"))
    page = client.get("/dead-letters/inventory/7").get_data(as_text=True)
    assert 'id="confirm"' in page and 'type="password"' not in page  # no password any more
    unconfirmed = client.post(url, data={})
    assert unconfirmed.status_code == 400 and client.redriven == []
    assert "Tick the confirmation" in unconfirmed.get_data(as_text=True)
    with caplog.at_level(logging.INFO, logger="saga.console"):
        done = client.post(url, data={"confirm": "7"})
    assert done.status_code == 200 and client.redriven == [("inventory", [7])]
    body = done.get_data(as_text=True)
    assert "Re-drive requested" in body and "partition 2" in body and "ada" in body
    assert "default-src 'self'" in done.headers["Content-Security-Policy"]
    logged = [r for r in caplog.records if "re-drive" in r.getMessage()]
    assert logged and logged[0].operator == "ada" and "dead letter 7" in logged[0].getMessage()


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # another port of 127.0.0.1 is another origin
        {"Origin": "http://evil.example"},
        {"Origin": "http://127.0.0.1:8001"},
    ],
)
def test_forms_from_another_site_are_refused(client, headers):
    _log_in(client)
    refused = client.post(
        "/dead-letters/inventory/7/redrive", data={"confirm": "7"}, headers=headers
    )
    assert refused.status_code == 403 and client.redriven == []
    assert client.post("/logout", headers=headers).status_code == 403
    assert client.post("/login", data={"token": tokens.admin()}, headers=headers).status_code == 403


def test_our_own_forms_pass_as_a_browser_sends_them(client):
    # Referrer-Policy no-referrer: Chromium sends "Origin: null" with Sec-Fetch-Site
    same = {"Sec-Fetch-Site": "same-origin", "Origin": "null"}
    assert client.post("/login", data={"token": tokens.admin()}, headers=same).status_code == 303
    done = client.post("/dead-letters/inventory/7/redrive", data={"confirm": "7"}, headers=same)
    assert done.status_code == 200


def test_without_a_key_to_verify_with_the_login_says_so(client, monkeypatch):
    token = tokens.admin()
    monkeypatch.delenv("AUTH_PUBLIC_KEY_FILE")  # and SAGA_RUN_DIR has no stack.env
    response = _log_in(client, token)
    assert response.status_code == 503
    assert "AUTH_PUBLIC_KEY_FILE" in response.get_data(as_text=True)
    assert client.get("/").status_code == 303


# -- the sampler: live while watched, next to nothing when not ---------------------------------


class CountingMonitor(Monitor):
    def __init__(self) -> None:
        super().__init__(None, interval=0.05, unwatched_interval=3600, watched_for=0.5)
        self.samples_taken = 0

    def sample(self) -> None:
        self.samples_taken += 1


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)


def test_an_unwatched_console_samples_rarely_and_a_request_wakes_it_at_once():
    monitor = CountingMonitor()
    monitor.start()
    try:
        _wait_for(lambda: monitor.samples_taken == 1)  # the first sample, at start
        monitor.watched()  # a page: sampled again at once, then every interval
        _wait_for(lambda: monitor.samples_taken >= 5)
        # no request for watched_for: back to the unwatched interval (an hour here)
        _wait_for(lambda: not monitor._is_watched())
        settled = monitor.samples_taken
        assert monitor._wake.wait(timeout=0.3) is False  # asleep: nothing wakes it
        assert monitor.samples_taken <= settled + 1
    finally:
        monitor.stop()


def test_only_an_operator_s_pages_keep_the_sampler_live(client):
    monitor = client.application.extensions["saga_monitor"]
    client.get("/")  # no login: the login page, and the sampler stays unwatched
    client.get("/login")
    assert not monitor._is_watched()
    _log_in(client)
    client.get("/fragments/overview")
    assert monitor._is_watched()
