"""`saga chaos`: the whole system under load while processes and servers are killed, then the
audit. Everything runs on its own embedded PostgreSQL and Redis (or Redis Cluster) in a
temporary directory, so it never touches the `make run-all` stack.

Each service runs `--consumers` consumer processes in its group, sharing `--partitions`
partitions; killing one moves its partitions to the others (or back to it, restarted, once its
leases ran out). The report says how often partitions changed owner, the longest time one had
no live owner, and how many transactions were retried after a deadlock or serialization
failure."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from contracts.streams import DEFAULT_PARTITIONS, MAX_PARTITIONS
from devstack.osutil import free_port, wait_until
from sagactl.audit import run_audit
from sagactl.chaos import load, observe
from sagactl.chaos.faults import KINDS, REDIS_LOSS_KINDS, FaultInjector, is_consumer_process
from sagactl.chaos.servers import ChaosServers
from sagactl.processes import (
    RELAY_METRICS_OFFSET,
    WORKER_METRICS_OFFSET,
    consumer_metrics_offset,
)
from sagactl.supervisor import (
    Backoff,
    LogFiles,
    ProcessSpec,
    Supervisor,
    parse_procfile,
    with_consumer_replicas,
    with_standby_relays,
)
from service_runtime.config import (
    MAX_CONSUMERS_PER_SERVICE,
    PROJECT_ROOT,
    SERVICES,
    from_env,
    run_dir,
)

# Short timeouts so that a soak of a few minutes exercises the slow paths too: stuck orders
# time out, abandoned entries are claimed, failed ones retried.
SOAK_SETTINGS = {
    "PAYMENT_TIMEOUT_SECONDS": "20",
    "PAYMENT_SWEEP_SECONDS": "1",
    "CONSUMER_RETRY_BASE_MS": "200",
    "RELAY_POLL_SECONDS": "0.5",
    "RELAY_STANDBY_RETRY_SECONDS": "0.5",
}

HOW_OWNERSHIP_IS_MEASURED = (
    "changes: partition leases acquired after the load started, from the epochs in each "
    "service's partition_leases (every acquisition increments a partition's epoch); "
    "consumer_metrics: saga_partition_ownership_changes_total of the consumers (acquired, "
    "released, lost), summed like the outcomes. longest_no_owner_s: partition_leases sampled "
    "every 0.2 s on the database's clock; a partition has no owner from its lease's expires_at "
    "until the next acquisition. conflicts_retried: saga_consumer_conflicts_total summed over "
    "every consumer process lifetime."
)
DEFAULT_CHAOS_CONSUMERS = 3

HOW_DUPLICATES_ARE_COUNTED = (
    "duplicates_absorbed: deliveries whose inbox row already existed, i.e. the consumers' "
    "saga_consumer_events_total{outcome=duplicate}, summed over every consumer process "
    "lifetime (scraped every 0.5 s and just before each consumer kill). republished: stream "
    "entries whose event_id was already in the stream (a relay died between XADD and marking "
    "the rows published), and their deliveries to the groups that handle them."
)


def _fault_kinds(_ctx: click.Context, _param: click.Parameter, value: str) -> list[str]:
    kinds = [kind.strip() for kind in value.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise click.BadParameter(f"unknown {unknown}; known: {', '.join(KINDS)}")
    return kinds


@click.command()
@click.option("--orders", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--clients", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--duration",
    default=40.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds over which the orders are spread (longer when outages hold clients up).",
)
@click.option(
    "--fault-interval",
    default=1.5,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Mean seconds between two faults, injected while the clients run.",
)
@click.option(
    "--faults",
    "fault_kinds",
    default=",".join(KINDS),
    show_default=True,
    callback=_fault_kinds,
    help="Comma-separated fault kinds to inject.",
)
@click.option("--cancel-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1))
@click.option(
    "--quiet-timeout",
    default=180.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="How long to wait for the system to settle once the faults stop.",
)
@click.option("--grace-seconds", default=10.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--seed", type=int, help="Random seed of orders and faults (printed when not given).")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the JSON report [default: .run/chaos-report.json].",
)
@click.option(
    "--consumers",
    default=DEFAULT_CHAOS_CONSUMERS,
    show_default=True,
    type=click.IntRange(1, MAX_CONSUMERS_PER_SERVICE),
    help="Consumer processes per service (one group each); the consumer faults kill them.",
)
@click.option(
    "--partitions",
    default=DEFAULT_PARTITIONS,
    show_default=True,
    type=click.IntRange(1, MAX_PARTITIONS),
    help="STREAM_PARTITIONS of the soak's deployment.",
)
@click.option(
    "--redis-cluster",
    is_flag=True,
    help="Streams on a local 3-master Redis Cluster (rq on a plain Redis); the Redis faults "
    "then kill or restart one cluster node at a time.",
)
@click.option("--keep", is_flag=True, help="Keep the servers' data and process logs.")
def chaos(
    orders: int,
    clients: int,
    duration: float,
    fault_interval: float,
    fault_kinds: list[str],
    cancel_ratio: float,
    quiet_timeout: float,
    grace_seconds: float,
    seed: int | None,
    report_path: Path | None,
    consumers: int,
    partitions: int,
    redis_cluster: bool,
    keep: bool,
) -> None:
    """Soak: place orders while killing processes and crashing Redis and PostgreSQL, wait for
    quiet, audit. Exit 1 on an invariant violation, a lost order, an event that never reached
    a group reacting to it, or no convergence."""
    if redis_cluster:
        if fault_kinds == list(KINDS):  # the default: everything that can be staged there
            fault_kinds = [k for k in fault_kinds if k not in REDIS_LOSS_KINDS]
        elif loss := sorted(set(fault_kinds) & set(REDIS_LOSS_KINDS)):
            raise click.UsageError(
                f"{', '.join(loss)}: staged on the single embedded Redis only, not with"
                " --redis-cluster (a cluster's own failover is Redis Cluster's business)"
            )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # one line per pg_ctl call
    settings = {
        "orders": orders,
        "clients": clients,
        "duration_s": duration,
        "fault_interval_s": fault_interval,
        "fault_kinds": fault_kinds,
        "cancel_ratio": cancel_ratio,
        "seed": seed if seed is not None else random.SystemRandom().randrange(1_000_000),
        "quiet_timeout_s": quiet_timeout,
        "grace_seconds": grace_seconds,
        "consumers_per_service": consumers,
        "partitions": partitions,
        "redis_cluster": redis_cluster,
        **SOAK_SETTINGS,
    }
    directory = Path(tempfile.mkdtemp(prefix="saga-chaos-"))  # short: PostgreSQL's socket
    click.echo(f"chaos run, seed {settings['seed']}, servers and logs in {directory}")
    try:
        soak = Soak(settings, directory)
    except click.ClickException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    try:
        report = soak.run()
    finally:
        soak.shut_down()
    failed = bool(report["failures"])
    report["run_dir"] = str(directory) if keep or failed else None
    report_path = report_path or run_dir() / "chaos-report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, default=str))
    click.echo(format_report(report))
    click.echo(f"report: {report_path}")
    if keep or failed:
        click.echo(f"servers' data and process logs kept in {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    if failed:
        sys.exit(1)


class Soak:
    """One chaos run: servers, processes, clients, faults, then the measurements."""

    def __init__(self, settings: dict[str, Any], directory: Path) -> None:
        self.settings = settings
        self.directory = directory
        self.rng = random.Random(settings["seed"])
        self.servers = ChaosServers(directory, redis_cluster=settings["redis_cluster"])
        self.supervisor: Supervisor | None = None
        self.injector: FaultInjector | None = None

    def run(self) -> dict[str, Any]:
        env = self.servers.start()
        env["STREAM_PARTITIONS"] = str(self.settings["partitions"])
        ports = {s: free_port() for s in SERVICES}
        n_consumers = self.settings["consumers_per_service"]
        metrics_base = _free_metrics_base(n_consumers)
        specs, consumer_ports = with_consumers(
            # the console watches a system; a soak does not need one (nor its port)
            with_standby_relays(
                [s for s in parse_procfile(PROJECT_ROOT / "Procfile") if s.name != "console"]
            ),
            n_consumers,
            metrics_base,
        )
        self.supervisor = supervisor = Supervisor(
            specs,
            _process_env(env, ports, metrics_base, self.directory),
            LogFiles(self.directory / "logs"),
            Backoff(initial=0.5, maximum=5.0),  # a soak wants its processes back quickly
        )
        supervisor.start()
        urls = {s: f"http://127.0.0.1:{port}" for s, port in ports.items()}
        if not wait_until(lambda: all(_ready(u) for u in urls.values()), 120, 0.5):
            raise click.ClickException(f"services not ready; logs in {self.directory / 'logs'}")
        db_urls = {s: env[f"{s.upper()}_DATABASE_URL"] for s in SERVICES}
        partitions = self.settings["partitions"]
        if not observe.wait_for_owners(db_urls, partitions, timeout=120):
            raise click.ClickException(
                f"the consumers did not share out the partitions; logs in {self.directory / 'logs'}"
            )

        catalogue = load.Catalogue.sized_for(self.settings["orders"], self.rng)
        load.seed(urls, catalogue)
        click.echo(
            f"{len(supervisor.names)} processes; {len(catalogue.products)} skus, "
            f"{len(catalogue.accounts)} accounts; placing {self.settings['orders']} orders "
            f"from {self.settings['clients']} clients"
        )
        counters = observe.ConsumerCounters(consumer_ports, supervisor.pid)
        self.injector = injector = FaultInjector(
            supervisor,
            self.servers,
            self.settings["fault_kinds"],
            self.settings["fault_interval_s"],
            random.Random(self.rng.random()),
            pause_seconds=_pause_seconds(),
            before_kill=lambda name: counters.scrape(name) if is_consumer_process(name) else None,
        )
        stats = load.LoadStats()
        acquisitions_before = observe.lease_acquisitions(db_urls)
        sampler = observe.OwnershipSampler(db_urls, partitions)
        started = time.monotonic()
        counters.start()
        sampler.start()
        injector.start()
        self._place_orders(urls["orders"], catalogue, stats)
        injector.stop()
        load_seconds = time.monotonic() - started
        faults = sum(injector.log.by_kind.values())
        click.echo(f"load done in {load_seconds:.0f} s with {faults} faults; waiting for quiet")

        client = self.servers.redis_client(socket_timeout=10)

        def check() -> dict[str, int]:
            found = observe.backlog(db_urls, client, partitions)
            if not supervisor.all_running():
                found["processes not running"] = 1
            return found

        quiet_at, left = observe.wait_for_quiet(check, self.settings["quiet_timeout_s"])
        counters.stop()
        sampler.stop()
        acquisitions = observe.lease_acquisitions(db_urls)
        changes = {g: acquisitions[g] - acquisitions_before[g] for g in acquisitions}
        ownership = {
            "changes": sum(changes.values()),
            "changes_by_group": changes,
            "consumer_metrics": counters.ownership_changes(),
            **sampler.summary(),
        }
        # with no fault at all, convergence is counted from the end of the load
        last_fault = injector.log.last_fault_at or started + load_seconds
        audit = run_audit(db_urls, self.settings["grace_seconds"])
        records = observe.order_records(db_urls, stats.acknowledged)
        timed_out = observe.payment_timeouts(db_urls)
        undelivered = observe.undelivered_events(db_urls)
        outcomes = counters.totals()
        return {
            "settings": {**self.settings, "metrics_port_base": metrics_base},
            "processes": supervisor.names,
            "load_seconds": round(load_seconds, 1),
            "orders": {
                "placed": stats.counts["placed"],
                "gave_up": stats.counts["place_gave_up"],
                "by_status": audit["summary"]["orders_by_status"],
                "cancel_requested": stats.counts["cancel_requested"],
                "cancel_accepted": stats.counts["cancel_accepted"],
                "cancel_refused_409": stats.counts["cancel_refused"],
                "payment_timeout": timed_out,
                **records,
            },
            "client_retries": {
                key.removeprefix("retry_after_"): n
                for key, n in sorted(stats.counts.items())
                if key.startswith("retry_after_")
            },
            "unexpected_answers": stats.unexpected[:20],
            "faults": {
                "total": faults,
                "by_kind": dict(sorted(injector.log.by_kind.items())),
                "skipped": dict(sorted(injector.log.skipped.items())),
                "events": injector.log.events,
            },
            "unplanned_process_exits": supervisor.unplanned_exits(),
            "duplicates_absorbed": outcomes.get("duplicate", 0),
            "consumer_outcomes": outcomes,
            "republished": observe.republished_duplicates(client, partitions),
            "how_duplicates_are_counted": HOW_DUPLICATES_ARE_COUNTED,
            "ownership": ownership,
            "conflicts_retried": counters.conflicts(),
            "how_ownership_is_measured": HOW_OWNERSHIP_IS_MEASURED,
            "undelivered_events": undelivered,
            "dead_letters": observe.dead_letters(db_urls),
            "loss_detection": observe.loss_repairs(db_urls),
            "converged": quiet_at is not None,
            "backlog_left": left,
            "convergence_seconds": (
                round(max(quiet_at - last_fault, 0), 1) if quiet_at is not None else None
            ),
            "last_fault": injector.log.events[-1] if injector.log.events else None,
            "violations": audit["violations"],
            "audit": audit,
            "failures": _failures(
                audit, quiet_at is not None, left, records, stats, undelivered["count"]
            ),
        }

    def _place_orders(self, url: str, catalogue: load.Catalogue, stats: load.LoadStats) -> None:
        n_orders, n_clients = self.settings["orders"], self.settings["clients"]
        # each client paces itself so that all orders are spread over the duration
        interval = self.settings["duration_s"] * n_clients / n_orders
        clients = [
            load.Client(
                number,
                url,
                catalogue,
                n_orders // n_clients + (number < n_orders % n_clients),
                interval,
                self.settings["cancel_ratio"],
                stats,
                self.rng.randrange(2**32),
            )
            for number in range(min(n_clients, n_orders))
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join()

    def shut_down(self) -> None:
        # the injector first: it must not restart a server after we stopped it
        if self.injector is not None:
            self.injector.stop()
        if self.supervisor is not None:
            self.supervisor.stop()
        self.servers.stop()


def _failures(
    audit: dict,
    converged: bool,
    left: dict,
    records: dict,
    stats: load.LoadStats,
    undelivered: int = 0,
) -> list[str]:
    failures = []
    if audit["violations"]:
        failures.append(f"{audit['violations']} invariant violations")
    if not converged:
        failures.append(f"not quiet in time, still moving: {left}")
    if records["acknowledged_but_missing"]:
        failures.append(f"{records['acknowledged_but_missing']} acknowledged orders lost")
    if records["stored_without_key"] or records["keys_sharing_an_order"]:
        failures.append("an order stored twice or without its Idempotency-Key")
    if stats.unexpected:
        failures.append(f"{len(stats.unexpected)} unexpected answers to clients")
    if undelivered:
        # a saga step lost on the way (an entry Redis lost that nobody published again). Not
        # the payment timeouts: outages longer than the soak's deadline end orders that way
        # with every event delivered, only late (observe.undelivered_events)
        failures.append(f"{undelivered} events never reached a group that reacts to them")
    return failures


def format_report(report: dict[str, Any]) -> str:
    o = report["orders"]
    statuses = ", ".join(f"{k} {v}" for k, v in o["by_status"].items())
    faults = report["faults"]
    kinds = ", ".join(f"{k} {v}" for k, v in faults["by_kind"].items())
    retries = ", ".join(f"{k} {v}" for k, v in report["client_retries"].items()) or "none"
    outcomes, republished = report["consumer_outcomes"], report["republished"]
    handled = outcomes.get("processed", 0) + report["duplicates_absorbed"]
    exits = {name: len(items) for name, items in report["unplanned_process_exits"].items()}
    settings, ownership = report["settings"], report["ownership"]
    undelivered = report["undelivered_events"]
    longest = ownership["longest_no_owner"]
    where = f" ({longest['group']} p{longest['partition']})" if longest else ""
    by_change = ", ".join(f"{k} {v}" for k, v in ownership["consumer_metrics"].items()) or "none"
    converged = (
        f"{report['convergence_seconds']} s after the last fault"
        if report["converged"]
        else "NOT CONVERGED"
    )
    lines = [
        f"consumers                {settings['consumers_per_service']} per service, "
        f"{settings['partitions']} partitions"
        + (", Redis Cluster" if settings.get("redis_cluster") else ""),
        f"orders placed            {o['placed']} ({statuses}); clients gave up on {o['gave_up']}",
        f"cancellations            {o['cancel_requested']} requested, "
        f"{o['cancel_accepted']} accepted, {o['cancel_refused_409']} refused (409); "
        f"{o.get('payment_timeout', 0)} cancelled by the payment deadline",
        f"client retries           {retries}",
        f"faults injected          {faults['total']}: {kinds}",
        f"duplicates absorbed      {report['duplicates_absorbed']} of {handled} deliveries "
        f"handled ({republished['entries']} entries re-published by relays)",
        f"ownership changes        {ownership['changes']} leases acquired during the run "
        f"(consumers counted: {by_change})",
        f"longest without owner    {ownership['longest_no_owner_s']} s{where}",
        f"conflicts retried        {report['conflicts_retried']}",
        f"events not delivered     {undelivered['count']}"
        + "".join(f", {route} {n}" for route, n in undelivered["by_route"].items()),
        f"dead letters             {sum(d['total'] for d in report['dead_letters'].values())}",
        "loss detection           "
        + ", ".join(
            f"{service}: {d['rows_republished']} rows re-published"
            f" ({d['streams_found_behind']} streams found behind)"
            for service, d in report["loss_detection"].items()
        ),
        f"convergence              {converged}",
        f"invariant violations     {report['violations']}",
    ]
    if exits:
        lines.append(f"WARNING: processes that exited by themselves (restarted): {exits}")
    for item in report["audit"]["invariants"]:
        if item["violations"]:
            lines.append(f"  {item['invariant']}. {item['title']}: {item['violations']}")
            lines.extend(f"     {json.dumps(e, default=str)}" for e in item["examples"])
    lines.append("FAILED: " + "; ".join(report["failures"]) if report["failures"] else "PASSED")
    return "\n".join(lines)


def with_consumers(
    specs: list[ProcessSpec], per_service: int, metrics_base: int
) -> tuple[list[ProcessSpec], dict[str, int]]:
    """The Procfile's consumers as `per_service` consumers of each service, as run-all runs
    them (`SVC-consumer-<i>`: `saga consume SVC --instance i`); returns the specs and each
    consumer's metrics port."""
    ports = {
        f"{service}-consumer-{i}": metrics_base + consumer_metrics_offset(service, i)
        for service in SERVICES
        for i in range(1, per_service + 1)
    }
    return with_consumer_replicas(specs, per_service), ports


def _free_metrics_base(consumers_per_service: int = 1) -> int:
    """A METRICS_PORT_BASE whose relay, worker and consumer ports are all free (not the
    default 9100: a running `make run-all` may hold those)."""
    rng = random.Random()
    offsets = [RELAY_METRICS_OFFSET + i for i in range(3)] + [WORKER_METRICS_OFFSET]
    offsets += [
        consumer_metrics_offset(service, i)
        for service in SERVICES
        for i in range(1, consumers_per_service + 1)
    ]
    for _ in range(100):
        base = rng.randrange(20_000, 60_000)
        if all(_port_free(base + offset) for offset in offsets):
            return base
    raise click.ClickException("no free ports for the workers' metrics")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _process_env(
    env: dict[str, str], ports: dict[str, int], metrics_base: int, directory: Path
) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **env,
        **{f"{s.upper()}_PORT": str(port) for s, port in ports.items()},
        **SOAK_SETTINGS,
        "METRICS_PORT_BASE": str(metrics_base),
        "CONSUMERS_PER_SERVICE": "1",  # each consumer is a process of the supervisor's
        "SAGA_RUN_DIR": str(directory),  # never fall back to the run-all stack's stack.env
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
    }


def _ready(url: str) -> bool:
    try:
        return load.http_call("GET", f"{url}/ready", timeout=2)[0] == 200
    except load.NETWORK_ERRORS:
        return False


def _pause_seconds() -> tuple[float, float]:
    """A consumer-pause lasts past the paused consumer's lease and one heartbeat (the consumers'
    own settings, CONSUMER_LEASE_MS and CONSUMER_HEARTBEAT_MS), so others take its partitions."""
    from service_runtime.consumer import ConsumerSettings

    settings = from_env(ConsumerSettings, "CONSUMER_", group="-", consumer="-")
    bound = (settings.lease_ms + settings.heartbeat_ms) / 1000
    return bound + 0.5, bound + 3.0
