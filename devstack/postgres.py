"""An embedded PostgreSQL server run from the binaries bundled in the pgserver wheel.

Only pgserver's binaries and its root helpers are used, not its server manager: that one
listens on a unix socket only and stops the server when the Python process exits, and we
need a TCP server on a fixed port that outlives `saga stack up`.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import warnings
from functools import cached_property
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from devstack.osutil import file_lock, tail
from devstack.provision import SERVICES, names
from devstack.secrets import secret, write_private

with warnings.catch_warnings():
    # importing pgserver computes a runtime dir for its own server manager, which we do not
    # use, and warns on every `saga` run when XDG_RUNTIME_DIR is unset
    warnings.simplefilter("ignore")
    from pgserver._commands import POSTGRES_BIN_PATH, initdb, pg_ctl

SUPERUSER = "postgres"
# postgres refuses to run as root; pgserver then runs it as this account, so do we
SYSTEM_USER = "pgserver"
# a unix socket path must fit sun_path (108 bytes with the trailing NUL)
SOCKET_PATH_MAX = 107
SETTINGS = {
    "max_connections": "200",
    # the server side of the keepalives of service_runtime/db.py: a client that vanished
    # loses its session (and any advisory lock) within about 25 s instead of hours
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "25000",
    # Consumers group a read's entries in one transaction; under contention on a few hot rows
    # (the bench's 10 products and customers) two partitions' batches deadlock, and each
    # deadlock costs this wait before PostgreSQL breaks it (default 1 s): at 150 orders/s the
    # saga fell to 50 confirmed/s; with 100 ms it keeps up (docs/architecture.md, conflicts)
    "deadlock_timeout": "100ms",
}


def _hba() -> str:
    """Only what the services and the CLI need, scram-sha-256 everywhere: the superuser (over TCP
    from this machine, and the unix socket for maintenance), and each service's role to its own
    database (with the test or bench prefix `<word>_`; CONNECT grants still keep a role to the
    database it was provisioned with). The server listens on 127.0.0.1 only; no replication."""
    lines = [
        "# written by devstack/postgres.py at every start (DESIGN.md §9)",
        f"local all {SUPERUSER} scram-sha-256",
        f"host all {SUPERUSER} 127.0.0.1/32 scram-sha-256",
    ]
    for service in SERVICES:
        role, database = names(service)
        lines.append(rf"host /^(\w+_)?{database}$ /^(\w+_)?{role}$ 127.0.0.1/32 scram-sha-256")
    return "\n".join(lines) + "\n"


HBA = _hba()


class EmbeddedPostgres:
    """One PostgreSQL cluster under `<run_dir>/postgres`, on 127.0.0.1:`port` only."""

    def __init__(self, run_dir: Path | str, port: int) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.port = port
        self.data_dir = self.run_dir / "postgres"
        self.log_file = self.run_dir / "postgres.log"
        self._lock = self.run_dir / "postgres.lock"
        self._user = SYSTEM_USER if os.geteuid() == 0 else None

    @cached_property
    def password(self) -> str:
        """The superuser's: scram-sha-256 for every connection, its own included (DESIGN §9)."""
        return secret(self.run_dir, "postgres-superuser")

    @property
    def admin_url(self) -> str:
        password = quote(self.password, safe="")
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/postgres"

    def is_running(self) -> bool:
        return self._running_port() is not None

    def start(self) -> bool:
        """Start the server unless it already runs; True when this call started it."""
        with file_lock(self._lock):
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._user:
                self._prepare_system_user()
            running_port = self._running_port()
            if running_port is not None:
                self.port = running_port  # reuse it where it is, clients read admin_url
                return False
            self._initdb()
            self.log_file.touch()
            self._own(self.log_file)
            options = [
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {shlex.quote(str(self._socket_dir()))}",
                *(f"-c {name}={value}" for name, value in SETTINGS.items()),
            ]
            args = ["-w", "-t", "60", "-l", str(self.log_file), "-o", " ".join(options), "start"]
            try:
                # own session: a Ctrl-C in the terminal must not reach the postmaster
                # directly, we stop it ourselves once the processes using it are gone
                pg_ctl(
                    args, pgdata=self.data_dir, user=self._user, timeout=90, start_new_session=True
                )
            except subprocess.SubprocessError as error:
                raise RuntimeError(
                    f"PostgreSQL did not start on port {self.port}, log {self.log_file}:\n"
                    + tail(self.log_file)
                ) from error
            self._require_passwords()
            return True

    def stop(self) -> bool:
        """Fast shutdown (disconnects clients); True when a running server was stopped."""
        with file_lock(self._lock):
            if self._running_port() is None:
                return False
            pg_ctl(
                ["-w", "-t", "60", "-m", "fast", "stop"],
                pgdata=self.data_dir,
                user=self._user,
                timeout=90,
            )
            return True

    def _running_port(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, IndexError, ValueError):
            return None
        if not _is_postgres(pid):
            # left by a crash or a container restart: the pid may now belong to another
            # process, and postgres would then refuse to start, so drop the stale file
            pidfile.unlink(missing_ok=True)
            return None
        return port

    def _initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        # no PG_VERSION means an interrupted initdb: nothing in there is worth keeping
        shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(mode=0o700)
        self._own(self.data_dir)
        # the password reaches initdb in a file (never its command line), removed right after
        pwfile = self.run_dir / ".initdb-pwfile"  # where the postgres account can read it
        write_private(pwfile, self.password + "\n")
        self._own(pwfile)
        try:
            initdb(
                [
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--no-locale",
                    "-U",
                    SUPERUSER,
                    "--no-instructions",
                ],
                pgdata=self.data_dir,
                user=self._user,
                timeout=120,
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _require_passwords(self) -> None:
        """A cluster made before passwords (trust in pg_hba.conf) gets the superuser's password;
        any cluster whose pg_hba.conf is not ours (older, wider) gets ours, reloaded."""
        hba = self.data_dir / "pg_hba.conf"
        current = hba.read_text()
        if current == HBA:
            return
        trusting = any(
            line.split()[-1] == "trust"
            for line in current.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            if trusting:
                verifier = conn.pgconn.encrypt_password(
                    self.password.encode(), SUPERUSER.encode(), b"scram-sha-256"
                )
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(SUPERUSER), sql.Literal(verifier.decode())
                    )
                )
            write_private(hba, HBA)
            self._own(hba)
            conn.execute("SELECT pg_reload_conf()")
            errors = conn.execute(
                "SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL"
            ).fetchall()
            if errors:
                raise RuntimeError(f"pg_hba.conf rejected by PostgreSQL: {errors}")

    def _socket_dir(self) -> Path:
        """Unix sockets in the run dir, or a short dir under /tmp if that path is too long."""
        directory = self.run_dir / "pgsocket"
        if len(str(directory / f".s.PGSQL.{self.port}")) > SOCKET_PATH_MAX:
            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
            directory = Path(tempfile.gettempdir()) / f"saga-pg-{digest}"
        directory.mkdir(mode=0o755, exist_ok=True)
        self._own(directory)
        return directory

    def _prepare_system_user(self) -> None:
        """What pgserver does as root: a system account that can reach binaries and data."""
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(SYSTEM_USER)
        readable = stat.S_IRGRP | stat.S_IROTH
        executable = stat.S_IXGRP | stat.S_IXOTH
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, readable | executable)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", readable)
        self._own(self.data_dir)

    def _own(self, path: Path) -> None:
        if self._user:
            import pwd

            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)


def _is_postgres(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another account (the pgserver one when we are not root)
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
    except OSError:
        return True  # no /proc (macOS): a live pid is the best evidence there is
