"""`saga bench`: run the measurements, print the table, write the JSON results."""

from __future__ import annotations

import json
import os
import platform
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from contracts.streams import DEFAULT_PARTITIONS, MAX_PARTITIONS

if TYPE_CHECKING:
    from benchmarks.servers import Servers

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = (
    "raw_limits",
    "relay_drain",
    "relay_latency",
    "relay_durability",
    "consumer_throughput",
    "consumer_wakeups",
    "end_to_end",
)


def _rates(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter("comma-separated numbers, e.g. 50,100,200") from None
    if not rates or min(rates) <= 0:
        raise click.BadParameter("at least one rate, all positive")
    return rates


def _counts(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[int, ...]:
    """`--consumers 1,2,4` or `--consumers 1 --consumers 2`: distinct, in the order given."""
    counts: list[int] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            if not part.strip().isdigit() or not 1 <= int(part) <= 64:
                raise click.BadParameter(f"{part!r}: whole numbers from 1 to 64, e.g. 1,2,4")
            if int(part) not in counts:
                counts.append(int(part))
    return tuple(counts) or (1,)


@click.command()
@click.option(
    "--only",
    type=click.Choice(MEASUREMENTS),
    multiple=True,
    help="Run only these measurements (repeatable). Default: all.",
)
@click.option(
    "--xadd-single", default=5_000, show_default=True, help="XADDs sent one at a time (raw limit)."
)
@click.option(
    "--xadd-pipelined",
    default=100_000,
    show_default=True,
    help="XADDs sent pipelined, 500 per round trip (raw limit).",
)
@click.option(
    "--pg-commits",
    default=3_000,
    show_default=True,
    help="Single-row insert+commit transactions, per connection count (raw limit).",
)
@click.option(
    "--relay-rows", default=100_000, show_default=True, help="Outbox backlog the relay drains."
)
@click.option("--relay-batch", default=500, show_default=True, help="Relay batch size.")
@click.option(
    "--latency-rate",
    default=1_000.0,
    show_default=True,
    help="Outbox rows committed per second while the relay runs.",
)
@click.option("--latency-seconds", default=10.0, show_default=True)
@click.option(
    "--durability-rows",
    default=20_000,
    show_default=True,
    help="Backlog drained per RELAY_DURABILITY mode (relay_durability; its latency part runs"
    " at --latency-rate for --latency-seconds).",
)
@click.option(
    "--consumer-entries",
    default=100_000,
    show_default=True,
    help="Stream entries the consumer handles (and then FastStream's batch subscriber, its"
    " yardstick, when installed: pip install -e .[bench]). A few seconds each: a run under a"
    " second moved the ratio by 0.2x between runs on a 2-core machine.",
)
@click.option(
    "--wakeup-rate",
    default=100.0,
    show_default=True,
    type=click.FloatRange(min=1, max=2000),
    help="consumer_wakeups: entries per second, added one at a time over the partitions.",
)
@click.option(
    "--wakeup-seconds",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="consumer_wakeups: how long each phase (ignored entries, then handled ones) lasts.",
)
@click.option(
    "--e2e-rates",
    default="50,100,150",
    show_default=True,
    callback=_rates,
    help="Orders per second, each held for --e2e-step-seconds.",
)
@click.option("--e2e-step-seconds", default=10.0, show_default=True)
@click.option(
    "--e2e-rise-by",
    default=100.0,
    show_default=True,
    help="After the given rates, raise the rate by this while it keeps up (0: don't).",
)
@click.option("--e2e-max-rate", default=1_000.0, show_default=True)
@click.option(
    "--e2e-senders",
    default=32,
    show_default=True,
    help="Threads sending the POSTs, one keep-alive connection each.",
)
@click.option(
    "--idle-seconds",
    default=60.0,
    show_default=True,
    help="Before the end-to-end load: CPU of the idle system over this long (0: skip).",
)
@click.option(
    "--consumers",
    multiple=True,
    callback=_counts,
    help="Consumer processes per service in the end-to-end run: one run per count, e.g. "
    "--consumers 1,2,4 (repeatable). Default: 1.",
)
@click.option(
    "--partitions",
    default=DEFAULT_PARTITIONS,
    show_default=True,
    type=click.IntRange(1, MAX_PARTITIONS),
    help="STREAM_PARTITIONS of every measurement.",
)
@click.option(
    "--profile",
    "profile_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run every process of the end-to-end system under py-spy and write its collapsed "
    "stacks to this folder (needs the bench extra: pip install -e '.[bench]').",
)
@click.option(
    "--profile-process",
    "profile_processes",
    multiple=True,
    help="With --profile: only this Procfile process (repeatable), e.g. orders-web or "
    "inventory-consumer-1; py-spy costs CPU of its own, so profile a few at a time.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON results file. Default: bench-results-<UTC time>.json in the project.",
)
def bench(only: tuple[str, ...], output: Path | None, **sizes: Any) -> None:
    """Measure the relay, the consumer and the whole saga against raw Redis and PostgreSQL.

    \b
    Servers: its own embedded PostgreSQL and Redis on free ports in a temporary directory,
    removed afterwards; or, with ORDERS_DATABASE_URL, INVENTORY_DATABASE_URL,
    BILLING_DATABASE_URL and REDIS_URL all set, those servers:
    - with SAGA_BENCH_PG_ADMIN_URL (a superuser URL of that PostgreSQL): scratch databases
      bench_<hex>_<service> there, dropped afterwards;
    - without it: the given databases, migrated, their outbox and inbox TRUNCATED;
    - the REDIS_URL database is FLUSHED before each measurement: give it a scratch one.

    Prints a table and writes every figure as JSON. With several --consumers counts, the end
    to end measurement runs once per count (a fresh system each time) and the table shows
    orders/s and CPU-ms per confirmed order for each: the scale-out curve of this machine.
    """
    from benchmarks import report
    from benchmarks.servers import bench_servers

    started = datetime.now(UTC)
    output = output or PROJECT_ROOT / f"bench-results-{started:%Y%m%dT%H%M%SZ}.json"
    results: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "options": {**sizes, "only": list(only)},
    }
    with bench_servers() as servers:
        results["environment"] = _environment(servers)
        for name, run in _plan(servers, sizes).items():
            if only and name not in only:
                continue
            click.echo(f"measuring {name.replace('_', ' ')} ...", err=True)
            try:
                results[name] = run()
            except Exception as err:  # one failed measurement must not cost the others
                traceback.print_exc()
                results[name] = {"error": f"{type(err).__name__}: {err}"}
        results["environment"]["load_after"] = _load()
    report.evaluate(results)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    click.echo(report.render(results))
    if sizes["profile_dir"]:
        from benchmarks import profiles

        click.echo("\n" + profiles.summary(sizes["profile_dir"]))
    click.echo(f"\nresults written to {output}")


def _plan(servers: Servers, sizes: dict[str, Any]) -> dict[str, Callable[[], dict[str, Any]]]:
    from benchmarks import (
        consumer_throughput,
        consumer_wakeups,
        end_to_end,
        faststream_yardstick,
        raw_limits,
        relay_drain,
        relay_durability,
        relay_latency,
    )

    orders, inventory, redis_url = (
        servers.db_urls["orders"],
        servers.db_urls["inventory"],
        servers.redis_url,
    )
    partitions = sizes["partitions"]

    def e2e(consumers: int) -> dict[str, Any]:
        click.echo(f"  {consumers} consumer(s) per service, {partitions} partitions", err=True)
        return end_to_end.measure(
            servers.db_urls,
            redis_url,
            rates=sizes["e2e_rates"],
            step_seconds=sizes["e2e_step_seconds"],
            rise_by=sizes["e2e_rise_by"],
            max_rate=sizes["e2e_max_rate"],
            senders=sizes["e2e_senders"],
            server_pids=servers.pids,
            consumers=consumers,
            partitions=partitions,
            idle_seconds=sizes["idle_seconds"],
            profile_dir=sizes["profile_dir"],
            profile_processes=sizes["profile_processes"],
        )

    def consumer(entries: int) -> dict[str, Any]:
        ours = consumer_throughput.measure(
            inventory, redis_url, entries=entries, partitions=partitions
        )
        # its yardstick right after, same entries and batch size (null if not installed)
        return ours | faststream_yardstick.alongside(
            inventory, redis_url, entries=entries, batch_size=ours["batch_size"]
        )

    return {
        "raw_limits": lambda: raw_limits.measure(
            orders, redis_url, xadd_single=sizes["xadd_single"],
            xadd_pipelined=sizes["xadd_pipelined"], pg_commits=sizes["pg_commits"]),
        "relay_drain": lambda: relay_drain.measure(
            orders, redis_url, rows=sizes["relay_rows"], batch_size=sizes["relay_batch"],
            partitions=partitions),
        "relay_latency": lambda: relay_latency.measure(
            orders, redis_url, rate=sizes["latency_rate"], seconds=sizes["latency_seconds"],
            batch_size=sizes["relay_batch"], partitions=partitions),
        "relay_durability": lambda: relay_durability.measure(
            orders, redis_url, rows=sizes["durability_rows"], rate=sizes["latency_rate"],
            seconds=sizes["latency_seconds"], batch_size=sizes["relay_batch"],
            partitions=partitions),
        "consumer_throughput": lambda: consumer(sizes["consumer_entries"]),
        "consumer_wakeups": lambda: consumer_wakeups.measure(
            inventory, redis_url, rate=sizes["wakeup_rate"], seconds=sizes["wakeup_seconds"],
            partitions=partitions),
        "end_to_end": lambda: end_to_end.combine([e2e(n) for n in sizes["consumers"]]),
    }  # fmt: skip


def _environment(servers: Servers) -> dict[str, Any]:
    import redis

    from service_runtime.db import connect

    with connect(servers.db_urls["orders"]) as conn:
        postgres = conn.execute("SHOW server_version").fetchone()[0]
    with redis.Redis.from_url(servers.redis_url) as client:
        redis_version = client.info("server")["redis_version"]
    return {
        "mode": servers.mode,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgres": postgres,
        "redis": redis_version,
        "load_before": _load(),
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


COMMANDS = [bench]
