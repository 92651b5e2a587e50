"""`saga stack up|down|env` and `saga run-all`: the dev stack and every process on it."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from urllib.parse import unquote, urlsplit

import click

from devstack import issuer
from devstack import stack as devstack
from devstack.redis import redis_bin_dir
from devstack.secrets import redact_url
from sagactl.supervisor import Console, Supervisor, parse_procfile, with_consumer_replicas
from service_runtime import config


@click.group()
def stack() -> None:
    """Embedded PostgreSQL and Redis (data in .run, or SAGA_RUN_DIR)."""


@stack.command("up")
def stack_up() -> None:
    """Start the embedded servers, create and migrate the databases."""
    env = devstack.up()
    devstack.migrate_all(env)
    click.echo(f"embedded PostgreSQL and Redis running (data in {config.run_dir()})")
    for key, value in env.items():
        if key.endswith("_URL"):
            click.echo(f"  {key}={redact_url(value)}")
    click.echo(f"  {redis_cli_command(env['REDIS_URL'])}")
    click.echo('use them from a shell with: eval "$(saga stack env)"')


@stack.command("down")
def stack_down() -> None:
    """Stop the embedded servers (their data is kept)."""
    devstack.down()
    click.echo("embedded PostgreSQL and Redis stopped")


@stack.command("env")
def stack_env() -> None:
    """Print the running stack's settings as shell exports: eval "$(saga stack env)".

    The URLs carry the passwords, and REDISCLI_AUTH lets redis-cli in: this is the one command
    that prints secrets, for `eval` in your own shell (never pipe it into a log)."""
    values = config.read_env_file(config.stack_env_file())
    if not values:
        raise click.ClickException("no embedded stack is running (try `saga stack up`)")
    if password := urlsplit(values.get("REDIS_URL", "")).password:
        values["REDISCLI_AUTH"] = unquote(password)  # redis-cli reads it, not its command line
    for key, value in values.items():
        click.echo(f"export {key}={shlex.quote(value)}")


@stack.command("acl")
def stack_acl() -> None:
    """Print the Redis ACL rules and PostgreSQL grants to set up on servers of your own.

    The embedded stack applies them itself (users.acl, pg_hba.conf, devstack/provision.py)."""
    from devstack.postgres import HBA
    from devstack.provision import names
    from devstack.redis import acl_rules

    click.echo("# Redis 6.2+ ACL (ACL SETUSER, or lines of an aclfile); choose the passwords:")
    click.echo("ACL SETUSER default off")
    for user, rules in acl_rules().items():
        click.echo(f"ACL SETUSER {user} on >CHOOSE-A-PASSWORD {rules}")
    click.echo("# then give each process its user (the CLI uses REDIS_URL, the admin):")
    click.echo(
        "#   REDIS_URL=redis://saga-admin:...@host:6379/0  RQ_REDIS_URL=redis://saga-rq:...@..."
    )
    for service in config.SERVICES:
        upper = service.upper()
        click.echo(
            f"#   {upper}_RELAY_REDIS_URL=redis://saga-{service}-relay:...@...  "
            f"{upper}_CONSUMER_REDIS_URL=redis://saga-{service}-consumer:...@..."
        )
    click.echo("")
    click.echo("-- PostgreSQL: one role per service, its own database only (scram-sha-256)")
    click.echo("SET password_encryption = 'scram-sha-256';")
    for service in config.SERVICES:
        role, database = names(service)
        click.echo(f"CREATE ROLE {role} LOGIN PASSWORD 'CHOOSE-A-PASSWORD';")
        click.echo(f"CREATE DATABASE {database} OWNER {role};")
        click.echo(f"REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC;")
        click.echo(f"GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {role};")
    click.echo("-- pg_hba.conf of the embedded cluster, for reference:")
    for line in HBA.splitlines():
        click.echo(f"--   {line}")


@click.command("redis-cli", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def redis_cli(args: tuple[str, ...]) -> None:
    """Run redis-cli ARGS... against the stack's Redis as its admin user (REDIS_URL).

    The password goes through the environment (REDISCLI_AUTH), never the command line."""
    url = config.redis_url()
    parts = urlsplit(url)
    command = shlex.split(redis_cli_command(url))  # with --user when the URL names one
    env = dict(os.environ)
    if parts.password:
        env["REDISCLI_AUTH"] = unquote(parts.password)
    os.execvpe(command[0], [*command, *args], env)


@click.command("run-all")
def run_all() -> None:
    """Stack, migrations, then all services, relays, consumers and the worker (Ctrl-C stops).

    A process that dies is restarted with backoff (see sagactl/supervisor.py); Ctrl-C, SIGTERM
    or SIGHUP stop every process, then the embedded servers this command started."""
    env, started = devstack.resolve()
    specs = with_consumer_replicas(
        parse_procfile(config.PROJECT_ROOT / "Procfile"), config.consumers_per_service()
    )
    supervisor = Supervisor(
        specs,
        _child_env(env),
        Console([spec.name for spec in specs]),
        cwd=config.PROJECT_ROOT,
    )
    stop = threading.Event()
    supervising = False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        if not supervising:
            raise KeyboardInterrupt  # still setting up: abort, the finally block cleans up
        stop.set()  # a second Ctrl-C changes nothing: the shutdown is never cut short

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        try:
            devstack.migrate_all(env)
        except config.ConfigError as err:
            raise click.ClickException(str(err)) from err
        click.echo(banner(env, embedded=started))
        supervising = True
        supervisor.start()
        while not stop.wait(1.0):
            pass
        click.echo("stopping every process")
    finally:
        if supervising:
            supervisor.stop()
        if started:
            devstack.down()
            click.echo("embedded PostgreSQL and Redis stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def banner(env: dict[str, str], embedded: bool = True) -> str:
    """Where everything listens, and how to look into Redis."""
    where = f"embedded, data in {config.run_dir()}" if embedded else "your servers"
    lines = [f"saga stack ready ({where})"]
    for service in config.SERVICES:
        base = f"http://127.0.0.1:{env[f'{service.upper()}_PORT']}"
        lines.append(
            f"  {service:<10} {base}  swagger {base}/swagger-ui  openapi {base}/openapi.json"
        )
    console = f"http://127.0.0.1:{config.console_port()}"
    lines.append(f"  {'console':<10} {console}  (log in with an admin token)")
    url = env["REDIS_URL"]
    lines.append(f"  {'redis':<10} {redact_url(url)}  ->  {redis_cli_command(url)}")
    if env.get("AUTH_JWKS_URL") and not env.get("AUTH_PUBLIC_KEY_FILE"):
        lines.append(f"  {'tokens':<10} from your identity provider ({env['AUTH_JWKS_URL']})")
    else:
        # the commands, never a token: a token in a banner ends up in logs and scrollback
        lines.append(f"  {'tokens':<10} export TOKEN=$(.venv/bin/saga token customer alice)")
        lines.append(f"  {'':<10} export ADMIN_TOKEN=$(.venv/bin/saga token admin)")
        lines.append(f'  {"":<10} curl -H "Authorization: Bearer $TOKEN" ...')
    if urlsplit(url).password:
        lines.append(
            '  (passwords masked; eval "$(saga stack env)" exports them and REDISCLI_AUTH)'
        )
    return "\n".join(lines)


def redis_cli_command(url: str) -> str:
    parts = urlsplit(url)
    cli = "redis-cli" if shutil.which("redis-cli") else str(redis_bin_dir() / "redis-cli")
    command = [cli]
    if parts.hostname not in (None, "127.0.0.1", "localhost"):
        command += ["-h", parts.hostname]
    command += ["-p", str(parts.port or 6379)]
    if parts.username:
        command += ["--user", unquote(parts.username)]
    database = parts.path.strip("/")
    if database not in ("", "0"):
        command += ["-n", database]
    return shlex.join(command)


def _child_env(env: dict[str, str]) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **env,
        # the Procfile runs saga, gunicorn and rq from this venv even when it is not activated
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",  # log lines reach the console as they are written
    }


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl_seconds(text: str) -> int:
    """`3600`, `90s`, `30m`, `1h`, `7d` -> seconds."""
    value = text.strip().lower()
    unit = _TTL_UNITS.get(value[-1:])
    number = value[:-1] if unit else value
    if not number.isdigit() or int(number) == 0:
        raise click.BadParameter(f"{text!r}: give a duration such as 3600, 30m, 1h or 7d")
    return int(number) * (unit or 1)


ttl_option = click.option(
    "--ttl", default="1h", show_default=True, help="Lifetime: seconds, or 30m, 1h, 7d."
)


@click.group()
def token() -> None:
    """Print a bearer token signed by the embedded stack's development issuer.

    For the APIs: `export TOKEN=$(saga token customer alice)`, then
    `curl -H "Authorization: Bearer $TOKEN" ...`. The issuer's key pair is made under the run
    folder at the stack's first start; the services only hold its public key."""


def _sign(make: Callable[[], str]) -> None:
    try:
        click.echo(make())
    except FileNotFoundError as err:
        raise click.ClickException(str(err)) from err


@token.command("customer")
@click.argument("customer_id")
@ttl_option
def token_customer(customer_id: str, ttl: str) -> None:
    """A customer's token (scope `customer`, sub CUSTOMER_ID): its own orders, account, payments."""
    seconds = _ttl_seconds(ttl)
    _sign(lambda: issuer.customer_token(config.run_dir(), customer_id, seconds))


@token.command("admin")
@click.option("--subject", default="operator", show_default=True, help="The token's sub.")
@ttl_option
def token_admin(subject: str, ttl: str) -> None:
    """An operator's token (scope `admin`): products, stock, accounts, deposits, every order."""
    seconds = _ttl_seconds(ttl)
    _sign(lambda: issuer.admin_token(config.run_dir(), subject, seconds))


COMMANDS: list[click.Command] = [stack, run_all, token, redis_cli]
