"""One database and one login role per service: each role reaches only its own database."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from contextlib import suppress
from urllib.parse import quote

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SERVICES = ("orders", "inventory", "billing")


def names(service: str, prefix: str = "") -> tuple[str, str]:
    """(role, database) of a service."""
    return f"{prefix}{service}_svc", f"{prefix}{service}"


def provision(
    admin_url: str,
    services: Iterable[str] = SERVICES,
    prefix: str = "",
    passwords: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Create (or fix up) the roles and databases; returns each service's database URL.

    Each role gets the password `passwords[role]` (a random one when not given), set again on
    every call so that the URL returned always works."""
    urls: dict[str, str] = {}
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for service in services:
            role, database = names(service, prefix)
            password = (passwords or {}).get(role) or secrets.token_urlsafe(24)
            _create_role(conn, role)
            _set_password(conn, role, password)
            _create_database(conn, database, role)
            db, rl = sql.Identifier(database), sql.Identifier(role)
            # a new database lets PUBLIC connect: take that away so the other services'
            # roles cannot even open a session on it
            conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(db))
            conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(db, rl))
            urls[service] = _url_for(admin_url, role, database, password)
    return urls


def drop(admin_url: str, services: Iterable[str] = SERVICES, prefix: str = "") -> None:
    """Remove the databases and roles (test teardown); open sessions are cut off."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for service in services:
            role, database = names(service, prefix)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def ensure_database(url: str) -> None:
    """Create the database a user-given URL names, if it does not exist yet.

    The check goes through the `postgres` maintenance database of the same server with the
    same credentials; any other connection failure is raised as it is.
    """
    try:
        psycopg.connect(url, connect_timeout=10).close()
        return
    except psycopg.OperationalError as error:
        failure = error
    database = conninfo_to_dict(url).get("dbname")
    if not database:
        raise failure
    try:
        maintenance = psycopg.connect(
            make_conninfo(url, dbname="postgres"), autocommit=True, connect_timeout=10
        )
    except psycopg.OperationalError:
        raise failure from None
    with maintenance as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if exists.fetchone():
            raise failure
        with suppress(errors.DuplicateDatabase):  # created concurrently by another process
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(database))))


def _create_role(conn: psycopg.Connection, role: str) -> None:
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
        return
    with suppress(errors.DuplicateObject):  # created concurrently by another process
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))


def _set_password(conn: psycopg.Connection, role: str, password: str) -> None:
    # hashed here (libpq's PQencryptPasswordConn): the server, its logs and its statement
    # statistics only ever see the scram-sha-256 verifier, never the password
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    conn.execute(
        sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(verifier.decode())
        )
    )


def _create_database(conn: psycopg.Connection, database: str, owner: str) -> None:
    db, rl = sql.Identifier(database), sql.Identifier(owner)
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, rl))
        return
    try:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(db, rl))
    except errors.DuplicateDatabase:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, rl))


def _url_for(admin_url: str, role: str, database: str, password: str) -> str:
    """Same server as the admin URL, the service's role with its password."""
    params = conninfo_to_dict(admin_url)
    host = str(params.get("host") or "127.0.0.1")
    port = str(params.get("port") or 5432)
    user = f"{quote(role, safe='')}:{quote(password, safe='')}"
    if host.startswith("/"):  # a unix socket directory
        return f"postgresql://{user}@:{port}/{quote(database)}?host={quote(host)}"
    return f"postgresql://{user}@{host}:{port}/{quote(database)}"
