"""Shared by the inspection commands: connections from config, errors, tables, JSON, times.

Every command reads the same settings as the running processes (service_runtime.config), so
`saga streams` in another terminal looks at the servers of `make run-all`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
import psycopg
import redis

from service_runtime import config
from service_runtime.redis_client import REDIS_OUTAGE_ERRORS, RedisClient
from service_runtime.redis_client import connect as redis_connect

F = TypeVar("F", bound=Callable[..., Any])
READ_ONLY_OPTIONS = "-c default_transaction_read_only=on"

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (stable keys)."
)


def _where(url: str) -> str:
    """host:port/db of a URL, never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or ''}{parts.path}"


def friendly_errors(func: F) -> F:
    """Turn an unreachable server or missing setting into one clear line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except config.ConfigError as err:
            raise click.ClickException(str(err)) from err
        except REDIS_OUTAGE_ERRORS as err:
            raise click.ClickException(f"cannot reach Redis at {_redis_where()}: {err}") from err
        except redis.RedisError as err:
            raise click.ClickException(f"Redis error: {err}") from err
        except psycopg.Error as err:
            text = str(err).strip()
            first_line = text.splitlines()[0] if text else type(err).__name__
            raise click.ClickException(f"database error: {first_line}") from err

    return wrapper  # type: ignore[return-value]


def _redis_where() -> str:
    try:
        return _where(config.redis_url())
    except config.ConfigError:
        return "?"


def open_redis() -> RedisClient:
    """A decoding client (a cluster client with REDIS_CLUSTER=1); pinged at once so an
    unreachable server fails here, clearly."""
    url = config.redis_url()
    try:
        client = redis_connect(url)
        client.ping()
    except REDIS_OUTAGE_ERRORS as err:
        raise click.ClickException(f"cannot reach Redis at {_where(url)}: {err}") from err
    return client


Lender = Callable[[str], AbstractContextManager[psycopg.Connection]]
# Set by `reusing`: where open_db takes its read-only connections from instead of connecting.
_LENDER: ContextVar[Lender | None] = ContextVar("saga_inspect_lender", default=None)


@contextmanager
def reusing(lender: Lender) -> Iterator[None]:
    """Within this block (this thread), read-only `open_db` borrows from `lender`: the
    console's sampler keeps one connection per service open instead of one per query."""
    token = _LENDER.set(lender)
    try:
        yield
    finally:
        _LENDER.reset(token)


@contextmanager
def open_db(service: str, *, writes: bool = False) -> Iterator[psycopg.Connection]:
    """An autocommit connection to one service's database, read-only: inspection (the CLI and
    the console) never writes to a service's database. The one exception, `writes=True`, is an
    operator's request recorded for the service to carry out (a dead letter's re-drive)."""
    lender = _LENDER.get()
    if lender is not None and not writes:
        with lender(service) as conn:
            yield conn
        return
    with connect_db(service, writes=writes) as conn:
        yield conn


def connect_db(service: str, *, writes: bool = False) -> psycopg.Connection:
    """What `open_db` yields, for a caller that keeps it open (the console's sampler)."""
    url = config.database_url(service)
    options = "" if writes else READ_ONLY_OPTIONS
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=5, options=options)
    except psycopg.OperationalError as err:
        text = str(err).strip()
        reason = text.splitlines()[0].strip() if text else "unreachable"
        raise click.ClickException(
            f"cannot reach the {service} database at {_where(url)}: {reason}"
        ) from err
    return conn


# -- output ------------------------------------------------------------------------------------


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; None shows as '-'."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def parse_payload(text: str | None) -> Any:
    """The payload as JSON when it is JSON, else the raw text (invalid ones are worth seeing)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# -- times -------------------------------------------------------------------------------------


def entry_time(entry_id: str | None) -> str | None:
    """The creation time encoded in a stream entry id (its milliseconds part), as ISO UTC."""
    if not entry_id:
        return None
    millis = int(entry_id.split("-", 1)[0])
    return iso(datetime.fromtimestamp(millis / 1000, UTC))


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_text(text: str | None) -> str | None:
    """An ISO time written by someone else (e.g. with +00:00 and microseconds), normalised."""
    if not text:
        return None
    try:
        return iso(datetime.fromisoformat(text))
    except ValueError:
        return text  # not ours to fix: shown as written


def millis_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() * 1000, 3)


def duration(ms: float | None) -> str | None:
    """Human form of a duration in milliseconds: 850 ms, 12.3 s, 4m05s, 2h03m."""
    if ms is None:
        return None
    if ms < 1000:
        return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def short_time(iso_text: str | None) -> str | None:
    """2024-05-01T10:00:00.123Z -> 2024-05-01 10:00:00.123 (tables only; JSON keeps ISO)."""
    return iso_text.replace("T", " ").rstrip("Z") if iso_text else None
