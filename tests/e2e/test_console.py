"""`saga console` in a real browser (headless Debian chromium driven by Selenium) against the
real running system of `saga run-all`: the operator login (a token from `saga token admin`
pasted into /login), the overview, an order's sequence diagram, a poison event in the dead
letters, and a handler failure re-driven after its cause was fixed.

Screenshots: .artifacts/console/*.png (ignored by git; docs/console-*.png are copies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import psycopg
import psycopg.sql
import pytest
import requests
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By

from contracts import partition_of, partition_stream
from tests import tokens
from tests.e2e import browser as chromium_browser
from tests.e2e.conftest import RunningSystem, place_and_confirm
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e
PARTITIONS = 8  # STREAM_PARTITIONS of the run-all under test (the default)
FLOWS = {
    ("orders.events", "inventory"),
    ("orders.events", "billing"),
    ("inventory.events", "orders"),
    ("inventory.events", "billing"),
    ("billing.events", "orders"),
    ("billing.events", "inventory"),
}
OPERATOR = "e2e-operator"


@pytest.fixture(scope="module")
def console(system: RunningSystem) -> str:
    from sagactl.console import assets

    if missing := assets.missing():
        pytest.fail(f"console assets missing ({', '.join(missing)}): run `make console-assets`")

    def answers() -> bool:
        try:
            return requests.get(system.console_url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_until(answers, timeout=60, message=lambda: system.log_tail())
    return system.console_url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if reason := chromium_browser.missing():
        pytest.fail(reason)
    with chromium_browser.chromium() as driver:
        yield driver


def _saga_token(*args: str) -> str:
    """What `saga token ...` prints, run as an operator runs it: in the run folder of the
    issuer whose public key this system verifies with (AUTH_PUBLIC_KEY_FILE, the test
    session's development issuer, tests/tokens.py)."""
    saga = Path(sys.executable).parent / "saga"
    done = subprocess.run(
        [str(saga), "token", *args],
        env={**os.environ, "SAGA_RUN_DIR": str(tokens.run_dir())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def operator_token() -> str:
    return _saga_token("admin", "--subject", OPERATOR)


def _paste_token(driver, token: str) -> None:
    field = _wait_for(driver, "#login-form #token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type='submit']").click()


@pytest.fixture
def logged_in(console, browser, operator_token) -> None:
    """The browser with an operator's session (logged in through the form when it has none)."""
    browser.get(f"{console}/login")
    if urlsplit(browser.current_url).path == "/login":
        _paste_token(browser, operator_token)
    assert _wait_for(browser, "#signed-in-as").text == OPERATOR


def _wait_for(driver, css: str, timeout: float = 30.0, reload: bool = False):
    """The first element matching css, reloading the page meanwhile if asked."""

    def found():
        elements = driver.find_elements(By.CSS_SELECTOR, css)
        if not elements and reload:
            driver.refresh()
        return elements[0] if elements else None

    return wait_until(
        found, timeout=timeout, interval=0.5, message=f"no {css} on {driver.current_url}"
    )


def _fresh(action):
    """`action()`, or None when the page swapped the element under it (htmx refresh)."""
    try:
        return action()
    except (StaleElementReferenceException, NoSuchElementException):
        return None
    except WebDriverException as err:
        # Chrome's word for the same race when the swap lands mid-command
        if "does not belong to the document" in str(err.msg):
            return None
        raise


def _text_of(driver, css: str) -> str:
    elements = driver.find_elements(By.CSS_SELECTOR, css)
    return elements[0].text if elements else ""


def _click(driver, css: str) -> bool:
    driver.find_element(By.CSS_SELECTOR, css).click()
    return True


def _sequence_diagram(driver) -> dict[str, list[str]]:
    """The rendered diagram: an SVG (not the Mermaid text) with its participants and messages."""
    wait_until(
        lambda: driver.find_elements(By.CSS_SELECTOR, "#sequence[data-rendered='true'] svg"),
        timeout=30,
        interval=0.3,
        message=lambda: driver.find_element(By.ID, "sequence").get_attribute("outerHTML")[:2000],
    )
    svg = driver.find_element(By.CSS_SELECTOR, "#sequence svg")
    return {
        "actors": sorted(
            {t.text for t in svg.find_elements(By.CSS_SELECTOR, "text.actor") if t.text}
        ),
        "messages": [t.text for t in svg.find_elements(By.CSS_SELECTOR, "text.messageText")],
    }


def _at_login_page(driver, console: str) -> dict[str, list[str]] | None:
    """The login page's query (`next`) when the browser is on it, else None."""
    url = urlsplit(driver.current_url)
    if f"{url.scheme}://{url.netloc}" != console or url.path != "/login":
        return None
    return parse_qs(url.query)


def test_without_a_login_the_console_shows_the_login_page(console, browser, operator_token):
    browser.delete_all_cookies()
    browser.get(console)
    assert wait_until(lambda: _at_login_page(browser, console), timeout=10) == {"next": ["/"]}
    assert _wait_for(browser, "#login-form")
    assert not browser.find_elements(By.CSS_SELECTOR, "svg.flow")
    assert not browser.find_elements(By.CSS_SELECTOR, "nav[aria-label='Main']")
    chromium_browser.screenshot(browser, "login")

    # a customer's token is refused, and the form says why
    _paste_token(browser, _saga_token("customer", "alice"))
    assert "admin" in _wait_for(browser, "#login-problem").text
    assert _at_login_page(browser, console) is not None
    chromium_browser.screenshot(browser, "login-refused")

    # an operator's: the overview it asked for, the token nowhere on the page
    _paste_token(browser, operator_token)
    assert _wait_for(browser, "#signed-in-as").text == OPERATOR
    _wait_for(browser, "svg.flow")
    assert urlsplit(browser.current_url).path == "/"
    assert operator_token not in browser.page_source
    cookie = browser.get_cookie("saga_console_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert operator_token not in cookie["value"]

    # the session gone (as when its token expires): the live overview's next refresh (htmx,
    # every 2 s) takes the browser to the login page instead of swapping a form into the page
    browser.delete_cookie("saga_console_session")
    assert wait_until(lambda: _at_login_page(browser, console), timeout=15) == {"next": ["/"]}
    _paste_token(browser, operator_token)
    _wait_for(browser, "svg.flow")

    # logging out ends it
    browser.find_element(By.CSS_SELECTOR, "#logout-form button[type='submit']").click()
    wait_until(lambda: _at_login_page(browser, console) is not None, timeout=10)
    browser.get(f"{console}/dead-letters")
    assert wait_until(lambda: _at_login_page(browser, console), timeout=10) == {
        "next": ["/dead-letters"]
    }


def test_the_overview_shows_the_three_streams_and_their_groups(console, browser, logged_in):
    browser.get(console)
    _wait_for(browser, "svg.flow")

    def structure() -> dict:
        """What the overview shows, read in one go (htmx swaps parts of it every 2 s)."""
        flow = browser.find_element(By.CSS_SELECTOR, "svg.flow")
        return {
            "services": {
                g.get_attribute("data-service")
                for g in flow.find_elements(By.CSS_SELECTOR, "g.service")
            },
            "edges": {
                (g.get_attribute("data-stream"), g.get_attribute("data-group"))
                for g in flow.find_elements(By.CSS_SELECTOR, "g.edge")
            },
            "group_rows": {
                (r.find_element(By.TAG_NAME, "th").text, r.find_elements(By.TAG_NAME, "td")[0].text)
                for r in browser.find_elements(By.CSS_SELECTOR, "#group-streams tbody tr")
            },
            "streams": [
                r.find_element(By.TAG_NAME, "th").text
                for r in browser.find_elements(By.CSS_SELECTOR, "#streams tbody tr")
            ],
            "partitions": {
                group: len(browser.find_elements(By.CSS_SELECTOR, f"#partitions-{group} tbody tr"))
                for group in ("orders", "inventory", "billing")
            },
            "relays": [
                r.find_element(By.TAG_NAME, "th").text
                for r in browser.find_elements(By.CSS_SELECTOR, "#relays tbody tr")
            ],
        }

    shown = wait_until(lambda: _fresh(structure), timeout=30, interval=0.3)
    assert shown["services"] == {"orders", "inventory", "billing"}
    assert shown["edges"] == FLOWS
    assert shown["group_rows"] == FLOWS
    assert shown["streams"][:3] == ["orders.events", "inventory.events", "billing.events"]
    assert shown["partitions"] == dict.fromkeys(("orders", "inventory", "billing"), PARTITIONS)
    assert shown["relays"] == ["orders", "inventory", "billing"]
    # live: the status line changes without a page load (htmx), and both plots are drawn
    browser.execute_script("window.__sameDocument = true")
    status = lambda: _fresh(lambda: browser.find_element(By.ID, "overview-status").text)  # noqa: E731
    first = wait_until(status, timeout=10)
    wait_until(
        lambda: status() not in (None, first),
        timeout=15,
        interval=0.5,
    )
    assert browser.execute_script("return window.__sameDocument") is True
    wait_until(
        lambda: (
            len(browser.find_elements(By.CSS_SELECTOR, ".chart[data-ready='true'] canvas")) >= 2
        ),
        timeout=20,
        interval=0.5,
    )
    # landmarks and labels
    assert browser.find_elements(
        By.CSS_SELECTOR, "header nav[aria-label='Main'] a[aria-current='page']"
    )
    assert browser.find_elements(By.CSS_SELECTOR, "main#main h1")
    chromium_browser.screenshot(browser, "overview")


def test_an_order_appears_with_its_rendered_sequence_diagram(console, browser, system, logged_in):
    order_id, customer = place_and_confirm(system.urls)
    browser.get(f"{console}/orders")
    browser.find_element(By.ID, "customer").send_keys(customer)
    browser.find_element(By.CSS_SELECTOR, "form.search button[type='submit']").click()
    row_css = f"#orders tr[data-order-id='{order_id}']"
    # The table is live (htmx swaps it): read and click through fresh lookups, not a held element
    wait_until(
        lambda: "confirmed" in (_fresh(lambda: _text_of(browser, row_css)) or ""),
        timeout=30,
        interval=0.3,
        message=f"no confirmed {row_css} on {browser.current_url}",
    )
    chromium_browser.screenshot(browser, "orders")
    wait_until(lambda: _fresh(lambda: _click(browser, f"{row_css} a")), timeout=30)

    diagram = _sequence_diagram(browser)
    assert diagram["actors"] == ["billing", "inventory", "orders"]
    messages = " | ".join(diagram["messages"])
    for event in ("OrderPlaced", "StockReserved", "PaymentCaptured"):
        assert event in messages, messages
    assert " ms)" in messages  # hop latencies
    state = {
        r.find_element(By.TAG_NAME, "th").text: r.find_elements(By.TAG_NAME, "td")[0].text
        for r in browser.find_elements(By.CSS_SELECTOR, "#state tbody tr")
    }
    assert state == {"orders": "confirmed", "inventory": "held", "billing": "captured"}
    history = browser.find_element(By.ID, "history").text
    assert "confirmed" in history and "PaymentCaptured" in history
    chromium_browser.screenshot(browser, "order")


def _poison(system: RunningSystem) -> tuple[str, str]:
    """An OrderPlaced without its items, XADDed straight to an orders partition stream (as a
    buggy or foreign producer would): it breaks the contract, so inventory dead-letters it at
    once."""
    order_id, event_id = str(uuid.uuid4()), str(uuid.uuid4())
    stream = partition_stream("orders.events", partition_of(order_id, PARTITIONS))
    system.redis().xadd(
        stream,
        {
            "event_id": event_id,
            "event_type": "OrderPlaced",
            "event_version": "1",
            "aggregate_type": "order",
            "aggregate_id": order_id,
            "correlation_id": order_id,
            "causation_id": "",
            "occurred_at": datetime.now(UTC).isoformat(),
            "producer": "orders",
            "payload": json.dumps({"order_id": order_id, "customer_id": "mallory"}),
        },
    )
    return order_id, event_id


def test_a_poison_event_shows_in_the_dead_letters(console, browser, system, logged_in):
    _order_id, event_id = _poison(system)
    browser.get(f"{console}/dead-letters?group=inventory")
    row = _wait_for(browser, f"#dead-letters tr[data-event-id='{event_id}']", reload=True)
    assert "OrderPlaced" in row.text
    chromium_browser.screenshot(browser, "dead-letters")
    row.find_element(By.CSS_SELECTOR, "th a").click()
    error = _wait_for(browser, "#dead-letter-error").text
    assert "items" in error, error  # the contract's complaint names the missing field
    assert "mallory" in browser.find_element(By.ID, "dead-letter-payload").text
    assert browser.find_elements(By.CSS_SELECTOR, "#redrive-form input#confirm")
    assert not browser.find_elements(By.CSS_SELECTOR, "#redrive-form input[type='password']")


@pytest.fixture
def inventory_inbox_grant(system: RunningSystem, pg_admin_url: str) -> Iterator:
    """Breaks and fixes the deployment: `grant(False)` takes INSERT on its inbox away from
    inventory's role (a migration that forgot a grant, say), so every inventory handler fails
    until `grant(True)` gives it back (done at the end in any case)."""
    service = urlsplit(system.db_urls["inventory"])
    admin = urlunsplit(urlsplit(pg_admin_url)._replace(path=service.path))

    def grant(allowed: bool) -> None:
        statement = "GRANT INSERT ON inbox TO {}" if allowed else "REVOKE INSERT ON inbox FROM {}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL(statement).format(psycopg.sql.Identifier(service.username))
            )

    try:
        yield grant
    finally:
        grant(True)


def test_a_dead_letter_is_redriven_after_its_cause_is_fixed(
    console, browser, system, inventory_inbox_grant, logged_in
):
    """The customer cancels a confirmed order while inventory cannot write its inbox: its
    OrderCancelled fails CONSUMER_MAX_DELIVERIES times and is dead-lettered (the stock stays
    held). The operator fixes the grant and re-drives it from the console: the stock is
    released and the order's diagram shows StockReleased."""
    order_id, _customer = place_and_confirm(system.urls)
    inventory_inbox_grant(False)
    r = requests.post(f"{system.urls['orders']}/orders/{order_id}/cancel", timeout=10)
    assert r.status_code == 202, r.text
    browser.get(f"{console}/dead-letters?group=inventory")
    row = _wait_for(
        browser,
        f"#dead-letters tr[data-correlation-id='{order_id}'][data-event-type='OrderCancelled']",
        timeout=90,
        reload=True,
    )
    assert "permission denied" in row.text
    inventory_inbox_grant(True)  # the fix
    row.find_element(By.CSS_SELECTOR, "th a").click()
    _wait_for(browser, "#redrive-form")
    assert OPERATOR in browser.find_element(By.ID, "redrive-as").text

    browser.find_element(By.ID, "confirm").click()
    browser.find_element(By.CSS_SELECTOR, "#redrive-form button[type='submit']").click()
    outcome = _wait_for(browser, "#redrive-outcome").text
    assert "Re-drive requested" in outcome and "OrderCancelled" in outcome, outcome
    assert f"Requested by {OPERATOR}" in outcome
    # who asked is in the console's log line (dead_letters has no column for it)
    wait_until(
        lambda: any(
            "requested the re-drive" in line and f'"operator": "{OPERATOR}"' in line
            for line in system.log_path.read_text(errors="replace").splitlines()
        ),
        timeout=10,
        message=lambda: system.log_tail(),
    )
    chromium_browser.screenshot(browser, "redriven")

    def released() -> bool:
        r = requests.get(f"{system.urls['inventory']}/reservations/{order_id}", timeout=10)
        return r.json().get("status") == "released"

    wait_until(released, timeout=60, interval=0.5, message=lambda: system.log_tail())
    browser.get(f"{console}/orders/{order_id}")
    diagram = _sequence_diagram(browser)
    messages = " | ".join(diagram["messages"])
    assert "StockReleased" in messages and "DEAD-LETTERED" not in messages, messages
    chromium_browser.screenshot(browser, "order-compensated")

    # the overview after this traffic: the plots have points, the flow its figures
    browser.get(console)
    _wait_for(browser, "svg.flow")
    wait_until(
        lambda: (
            len(browser.find_elements(By.CSS_SELECTOR, ".chart[data-ready='true'] canvas")) >= 2
        ),
        timeout=20,
        interval=0.5,
    )
    chromium_browser.screenshot(browser, "overview-after-orders")
