"""`saga stack up|down|env` and `saga run-all`: the dev stack and every process on it."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import click

from devstack import stack as devstack
from devstack.redis import redis_bin_dir
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
            click.echo(f"  {key}={value}")
    click.echo(f"  {redis_cli_command(env['REDIS_URL'])}")
    click.echo('use them from a shell with: eval "$(saga stack env)"')


@stack.command("down")
def stack_down() -> None:
    """Stop the embedded servers (their data is kept)."""
    devstack.down()
    click.echo("embedded PostgreSQL and Redis stopped")


@stack.command("env")
def stack_env() -> None:
    """Print the running stack's settings as shell exports: eval "$(saga stack env)"."""
    values = config.read_env_file(config.stack_env_file())
    if not values:
        raise click.ClickException("no embedded stack is running (try `saga stack up`)")
    for key, value in values.items():
        click.echo(f"export {key}={shlex.quote(value)}")


@click.command("run-all")
def run_all() -> None:
    """Stack, migrations, then all services, relays, consumers and the worker (Ctrl-C stops)."""
    env, started = devstack.resolve()
    honcho = _Honcho(env)
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stopping:
            return  # a second Ctrl-C must not cut the servers' shutdown short
        if honcho.process is None:
            raise KeyboardInterrupt  # still setting up: abort, the finally block cleans up
        honcho.stop(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    returncode = 1
    try:
        devstack.migrate_all(env)
        click.echo(banner(env, embedded=started))
        honcho.start()
        returncode = honcho.wait()
    finally:
        stopping = True
        if honcho.running():
            honcho.stop(signal.SIGTERM)  # an error on our side
            honcho.wait()
        if started:
            devstack.down()
            click.echo("embedded PostgreSQL and Redis stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.exit(returncode)


class _Honcho:
    """honcho on the Procfile, in its own process group so that a signal reaches it once,
    through us, and we know when to stop the servers."""

    GRACE_SECONDS = 15.0  # honcho itself SIGKILLs its stragglers after 5 s

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._stop_requested: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*_honcho(), "-f", str(config.PROJECT_ROOT / "Procfile"), "start"],
            cwd=config.PROJECT_ROOT,
            env=_child_env(self.env),
            stdin=subprocess.DEVNULL,
            process_group=0,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, signum: int) -> None:
        if self.process is not None and self.running():
            self.process.send_signal(signum)  # honcho SIGTERMs every process group it started
            if self._stop_requested is None:
                self._stop_requested = time.monotonic()

    def wait(self) -> int:
        assert self.process is not None
        while True:
            try:
                return self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                overdue = self._stop_requested is not None and (
                    time.monotonic() - self._stop_requested > self.GRACE_SECONDS
                )
                if overdue:
                    # honcho can hang (e.g. its terminal went away and printing failed):
                    # end its whole process tree ourselves, nothing may outlive run-all
                    _kill_tree(self.process.pid)


def _kill_tree(pid: int) -> None:
    import psutil  # installed with pgserver; only needed on this rare path

    try:
        root = psutil.Process(pid)
        processes = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.kill()


def banner(env: dict[str, str], embedded: bool = True) -> str:
    """Where everything listens, and how to look into Redis."""
    where = f"embedded, data in {config.run_dir()}" if embedded else "your servers"
    lines = [f"saga stack ready ({where})"]
    for service in config.SERVICES:
        base = f"http://127.0.0.1:{env[f'{service.upper()}_PORT']}"
        lines.append(
            f"  {service:<10} {base}  swagger {base}/swagger-ui  openapi {base}/openapi.json"
        )
    lines.append(f"  {'redis':<10} {env['REDIS_URL']}  ->  {redis_cli_command(env['REDIS_URL'])}")
    return "\n".join(lines)


def redis_cli_command(url: str) -> str:
    parts = urlsplit(url)
    cli = "redis-cli" if shutil.which("redis-cli") else str(redis_bin_dir() / "redis-cli")
    command = [cli]
    if parts.hostname not in (None, "127.0.0.1", "localhost"):
        command += ["-h", parts.hostname]
    command += ["-p", str(parts.port or 6379)]
    database = parts.path.strip("/")
    if database not in ("", "0"):
        command += ["-n", database]
    return shlex.join(command)


def _honcho() -> list[str]:
    executable = Path(sys.executable).parent / "honcho"
    return [str(executable)] if executable.exists() else [sys.executable, "-m", "honcho"]


def _child_env(env: dict[str, str]) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **env,
        # the Procfile runs saga, gunicorn and rq from this venv even when it is not activated
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",  # log lines reach honcho as they are written
    }


COMMANDS: list[click.Command] = [stack, run_all]
