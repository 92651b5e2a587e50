"""Ratios against the raw limits, the issue's targets met or missed, and the printed table."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Results = dict[str, Any]
_FIGURE = re.compile(r"^(-?[\d,.]+[x%]?|n/a|-)$")


@dataclass(frozen=True)
class Target:
    key: str  # stable: the check's `key` in the JSON (README, "Performance")
    text: str
    goal: float
    at_least: bool  # met when measured >= goal; otherwise when measured <= goal
    measured: Callable[[Results], float | None]
    percent: bool = False
    times: bool = False  # a ratio: printed as 1.23x


def _get(results: Results, *path: str | int) -> Any:
    value: Any = results
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _e2e_at(results: Results, rate: float, percentile: str) -> float | None:
    for step in _get(results, "end_to_end", "steps") or ():
        if step["rate"] == rate and step["confirmed"] == step["orders"]:
            return step["latency_ms"][percentile]
    return None  # not run at that rate, or not every order was confirmed


def _relay_p99(results: Results) -> float | None:
    latency = results.get("relay_latency") or {}
    # a row that never arrived has no latency: a p99 over the others would flatter
    return None if latency.get("missing", 1) else _get(latency, "latency_ms", "p99")


def _e2e_cpu_at(results: Results, rate: float) -> float | None:
    for step in _get(results, "end_to_end", "steps") or ():
        if step["rate"] == rate and step["confirmed"] == step["orders"]:
            return step.get("cpu_ms_per_confirmed")
    return None


TARGETS = (
    Target("relay_drain_events_per_s", "relay drain >= 30,000 events/s", 30_000, True,
           lambda r: _get(r, "relay_drain", "events_per_s")),
    Target("relay_drain_vs_xadd_pipelined", "relay drain >= 50% of pipelined XADD", 0.5, True,
           lambda r: _get(r, "ratios", "relay_drain_vs_xadd_pipelined"), percent=True),
    Target("relay_p99_ms", "relay p99 <= 25 ms at 1,000 rows/s", 25, False, _relay_p99),
    Target("consumer_events_per_s", "one consumer >= 10,000 events/s", 10_000, True,
           lambda r: _get(r, "consumer_throughput", "events_per_s")),
    Target("consumer_vs_faststream", "one consumer >= 1.5x FastStream's batch subscriber", 1.5,
           True, lambda r: _get(r, "ratios", "consumer_vs_faststream"), times=True),
    Target("cpu_ms_per_order_at_100", "CPU per confirmed order <= 8 ms at 100 orders/s", 8,
           False, lambda r: _e2e_cpu_at(r, 100)),
    Target("saga_p50_ms_at_100", "saga p50 <= 50 ms at 100 orders/s", 50, False,
           lambda r: _e2e_at(r, 100, "p50")),
    Target("saga_p99_ms_at_100", "saga p99 <= 250 ms at 100 orders/s", 250, False,
           lambda r: _e2e_at(r, 100, "p99")),
    Target("saga_p99_ms_at_150", "saga p99 <= 250 ms at 150 orders/s", 250, False,
           lambda r: _e2e_at(r, 150, "p99")),
    Target("sustained_orders_per_s", ">= 250 confirmed orders/s sustained", 250, True,
           lambda r: _get(r, "end_to_end", "highest_sustained_rate")),
    Target("idle_cpu_percent", "idle system <= 3% of one core", 3, False,
           lambda r: _get(r, "end_to_end", "idle", "cpu_percent_total")),
)  # fmt: skip


def evaluate(results: Results) -> Results:
    """Add `ratios` (against the raw limits of the same run) and `checks` (the targets)."""
    drain = _get(results, "relay_drain", "events_per_s")
    consumer = _get(results, "consumer_throughput", "events_per_s")
    pipelined = _get(results, "raw_limits", "xadd_pipelined_per_s")
    single = _get(results, "raw_limits", "xadd_single_per_s")
    commit = _get(results, "raw_limits", "pg_commit_per_s", "1")
    results["ratios"] = {
        "relay_drain_vs_xadd_pipelined": _ratio(drain, pipelined),
        "consumer_vs_xadd_single": _ratio(consumer, single),
        "consumer_vs_xadd_pipelined": _ratio(consumer, pipelined),
        "consumer_vs_pg_commit_1_connection": _ratio(consumer, commit),
        "consumer_vs_faststream": _ratio(
            consumer, _get(results, "consumer_throughput", "faststream_events_per_s")
        ),
    }
    checks = []
    for target in TARGETS:
        measured = target.measured(results)
        met = None
        if measured is not None:
            met = measured >= target.goal if target.at_least else measured <= target.goal
        checks.append(
            {
                "key": target.key,
                "target": target.text,
                "goal": target.goal,
                "measured": measured,
                # > 1 means better than the goal whichever way the goal points
                "vs_goal": _ratio(measured, target.goal)
                if target.at_least
                else _ratio(target.goal, measured),
                "met": met,  # None: not measured
                "percent": target.percent,
                "times": target.times,
            }
        )
    results["checks"] = checks
    return results


def render(results: Results) -> str:
    env = results.get("environment", {})
    parts = [
        f"saga bench {results.get('started_at', '')}: {env.get('mode', '')}; "
        f"{env.get('cpus')} CPUs, load average {env.get('load_before')} before, "
        f"{env.get('load_after')} after; PostgreSQL {env.get('postgres', '?')}, "
        f"Redis {env.get('redis', '?')}",
    ]
    if "raw_limits" in results:
        parts.append(_raw_section(results["raw_limits"]))
    if {"relay_drain", "relay_latency", "consumer_throughput", "consumer_wakeups"} & results.keys():
        parts.append(_component_section(results))
    if "relay_durability" in results:
        parts.append(_durability_section(results["relay_durability"]))
    e2e = results.get("end_to_end")
    if e2e and "error" not in e2e:
        runs = e2e.get("runs") or [e2e]
        parts.append(_scale_section(runs))
        for run in runs:
            parts += [_e2e_section(run), _process_section(run)]
            if run.get("idle"):
                parts.append(_idle_section(run["idle"]))
    elif e2e:
        parts.append(f"End to end: error: {e2e['error']}")
    parts.append(_targets_section(results))
    return "\n\n".join(parts)


def _raw_section(raw: Results) -> str:
    if "error" in raw:
        return f"Raw limits: error: {raw['error']}"
    rows = [
        ["Redis XADD, one at a time", _n(raw["xadd_single_per_s"])],
        [f"Redis XADD, pipelined (batch {raw['pipeline_batch']})",
         _n(raw["xadd_pipelined_per_s"])],
        *([f"PostgreSQL insert+commit, {n} connection(s)", _n(rate)]
          for n, rate in raw["pg_commit_per_s"].items()),
    ]  # fmt: skip
    return "Raw limits\n" + _table(["measurement", "per second"], rows)


def _component_section(results: Results) -> str:
    ratios = results.get("ratios", {})
    rows = []
    drain = results.get("relay_drain")
    if drain and "error" not in drain:
        rows.append(
            [
                f"relay drain ({drain['rows']:,} rows, batch {drain['batch_size']})",
                f"{_n(drain['events_per_s'])} events/s",
                f"{_pct(ratios.get('relay_drain_vs_xadd_pipelined'))} of pipelined XADD",
            ]
        )
    latency = results.get("relay_latency")
    if latency and "error" not in latency:
        ms = latency["latency_ms"]
        rows.append(
            [
                f"relay latency ({_n(latency['rate'])} rows/s for {latency['seconds']:g} s)",
                f"p50 {ms['p50']:.1f} / p95 {ms['p95']:.1f} / p99 {ms['p99']:.1f} ms",
                f"achieved {_n(latency['achieved_rate'])} rows/s, {latency['missing']} missing",
            ]
        )
    consumer = results.get("consumer_throughput")
    if consumer and "error" not in consumer:
        rows.append(
            [
                f"one consumer ({consumer['entries']:,} entries, inbox, no-op handler)",
                f"{_n(consumer['events_per_s'])} events/s",
                f"{_pct(ratios.get('consumer_vs_pg_commit_1_connection'))} of 1-connection "
                f"commits, {_pct(ratios.get('consumer_vs_xadd_pipelined'))} of pipelined XADD",
            ]
        )
    if consumer and "error" not in consumer and "faststream" in consumer:
        rows.append(_faststream_row(consumer, ratios.get("consumer_vs_faststream")))
    wakeups = results.get("consumer_wakeups")
    if wakeups and "error" not in wakeups:
        rows += _wakeup_rows(wakeups)
    errors = [
        f"{name}: error: {results[name]['error']}"
        for name in ("relay_drain", "relay_latency", "consumer_throughput", "consumer_wakeups")
        if "error" in (results.get(name) or {})
    ]
    headers = ["measurement", "result", "against raw limits (and the yardstick)"]
    table = _table(headers, rows) if rows else ""
    return "\n".join(["Relay and consumer", table, *errors])


def _wakeup_rows(wakeups: Results) -> list[list[str]]:
    """CPU per entry when each entry wakes a worker on its own (light load)."""
    return [
        [
            f"one consumer, {phase} entries one at a time ({_n(wakeups['rate'])}/s over "
            f"{wakeups['partitions']} partitions)",
            f"{wakeups[phase]['consumer_cpu_us_per_entry']:,.0f} µs CPU per entry",
            f"Redis {wakeups[phase]['redis_cpu_us_per_entry']:,.0f} µs per entry "
            "(the producer's XADD included)",
        ]
        for phase in ("ignored", "handled")
    ]


def _faststream_row(consumer: Results, ratio: float | None) -> list[str]:
    """The yardstick: FastStream's batch subscriber on the same entries, work and servers."""
    yardstick = consumer["faststream"]
    label = "FastStream batch subscriber (same entries and work)"
    if "skipped" in yardstick or "error" in yardstick:
        return [label, yardstick.get("skipped") or f"error: {yardstick['error']}", ""]
    cpu = [consumer.get("cpu_us_per_event"), yardstick.get("cpu_us_per_event")]
    return [
        f"FastStream {yardstick['version']} batch subscriber (same entries and work)",
        f"{_n(yardstick['events_per_s'])} events/s",
        f"one consumer is {_times(ratio)} it (target 1.50x); CPU/event in the bench process: "
        + " vs ".join("n/a" if us is None else f"{us:.0f}" for us in cpu)
        + " µs",
    ]


def _durability_section(modes: Results) -> str:
    """One row per RELAY_DURABILITY mode: drain and commit->stream latency, same run."""
    if "error" in modes:
        return f"Relay per durability mode: error: {modes['error']}"
    rows = []
    for mode, result in modes.items():
        if "unsupported" in result:
            rows.append([mode, "-", "-", f"not run: {result['unsupported']}"])
            continue
        drain, latency = result["drain"], result["latency"]
        ms = latency["latency_ms"]
        rows.append(
            [
                mode,
                f"{_n(drain['events_per_s'])} events/s ({drain['rows']:,} rows)",
                f"p50 {ms['p50']:.1f} / p95 {ms['p95']:.1f} / p99 {ms['p99']:.1f} ms",
                f"{_n(latency['achieved_rate'])} rows/s offered, {latency['missing']} missing",
            ]
        )
    headers = ["RELAY_DURABILITY", "drain", "commit->stream", "notes"]
    return "Relay per durability mode\n" + _table(headers, rows)


def _scale_section(runs: Sequence[Results]) -> str:
    """One line per consumer count: the scale-out curve of this machine."""
    rows = []
    for run in runs:
        best = next(
            (
                s
                for s in run["steps"]
                if s["kept_up"] and s["rate"] == run["highest_sustained_rate"]
            ),
            None,
        )
        cpu_ms = run.get("cpu_ms_per_confirmed")
        rows.append(
            [
                run.get("consumers", 1),
                run.get("partitions", "-"),
                _n(run["highest_sustained_rate"]),
                _n(run.get("sustained_confirmed_per_s")) if best else "-",
                "n/a" if cpu_ms is None else f"{cpu_ms:.1f}",
                f"{best['latency_ms']['p50']:.0f}" if best else "-",
                f"{best['latency_ms']['p99']:.0f}" if best else "-",
                _n(max((s["rate"] for s in run["steps"]), default=0)),
            ]
        )
    headers = ["consumers/service", "partitions", "orders/s kept up", "confirmed/s",
               "CPU-ms/order", "p50 ms", "p99 ms", "highest offered/s"]  # fmt: skip
    return (
        "Scale-out (per consumer count, a fresh system each: the highest offered rate it kept\n"
        "  up with, and at that rate the confirmed orders/s, CPU-ms per confirmed order summed\n"
        "  over every process of the system and the servers, and latency)\n" + _table(headers, rows)
    )


def _e2e_section(e2e: Results) -> str:
    rows = [
        [
            _n(step["rate"]),
            step["orders"],
            step["confirmed"],
            step["errors"],
            f"{step['latency_ms']['p50']:.0f}",
            f"{step['latency_ms']['p95']:.0f}",
            f"{step['latency_ms']['p99']:.0f}",
            _n(step["confirmed_per_s"]),
            step["backlog_at_end"],
            f"{step['send_lag_ms']['p99']:.0f}",
            f"{step.get('system_cpu_percent', 0):.0f}",
            "n/a"
            if step.get("cpu_ms_per_confirmed") is None
            else f"{step['cpu_ms_per_confirmed']:.1f}",
            "yes" if step["kept_up"] else "NO",
        ]
        for step in e2e["steps"]
    ]
    headers = ["offered/s", "orders", "confirmed", "errors", "p50 ms", "p95 ms", "p99 ms",
               "confirmed/s", "backlog", "lag p99 ms", "CPU %", "CPU-ms/order",
               "kept up"]  # fmt: skip
    return (
        f"End to end, {e2e.get('consumers', 1)} consumer(s) per service, "
        f"{e2e.get('partitions', '?')} partitions "
        f"(POST to OrderConfirmed seen on {e2e['step_seconds']:g} s steps, "
        f"open loop, {e2e['senders']} senders; highest rate kept up: "
        f"{_n(e2e['highest_sustained_rate'])}/s)\n"
        "  backlog: orders not yet confirmed when the schedule ended (kept up: none lost and at\n"
        "  most a second's worth); lag: how late POSTs left against the schedule; CPU %: machine;\n"
        "  CPU-ms/order: CPU of the system and servers per confirmed order, until all settled\n"
        + _table(headers, rows)
    )


def _process_section(e2e: Results) -> str:
    steps, memory = e2e["steps"], e2e["memory_mb_at_end"]
    labels = sorted({label for s in steps for label in s.get("cpu_percent", {})} | set(memory))
    rows = [
        [
            label,
            *(f"{s.get('cpu_percent', {}).get(label, 0):.0f}" for s in steps),
            *(f"{memory[label][kind]:.0f}" if label in memory else "-" for kind in ("rss", "pss")),
        ]
        for label in labels
    ]
    headers = ["process", *(f"CPU% @{_n(s['rate'])}/s" for s in steps), "RSS MB", "PSS MB"]
    return (
        "Processes (CPU in % of one core while sending; memory at the end, summed over each\n"
        "group's processes: RSS counts shared pages in every process, PSS splits them)\n"
        + _table(headers, rows)
    )


def _idle_section(idle: Results) -> str:
    rows = [[label, f"{percent:.2f}"] for label, percent in idle["cpu_percent"].items()]
    rows.append(["total", f"{idle['cpu_percent_total']:.2f}"])
    return (
        f"Idle (no traffic, {idle['seconds']:g} s after start-up; CPU in % of one core; the\n"
        f"  machine's other load meanwhile: {idle.get('other_load_percent') or 0:.0f}%)\n"
        + _table(["process", "CPU %"], rows)
    )


def _targets_section(results: Results) -> str:
    rows = [
        [
            check["target"],
            _measured(check),
            "n/a" if check["vs_goal"] is None else f"{check['vs_goal']:.2f}x",
            {True: "met", False: "MISSED", None: "not measured"}[check["met"]],
        ]
        for check in results.get("checks", [])
    ]
    return "Targets (vs goal > 1.00x is better than the goal)\n" + _table(
        ["target", "measured", "vs goal", ""], rows
    )


def _measured(check: Results) -> str:
    if check["percent"]:
        return _pct(check["measured"])
    if check.get("times"):
        return _times(check["measured"])
    return _n(check["measured"], 2)


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _n(value: float | None, decimals: int = 0) -> str:
    if value is None:
        return "n/a"
    if abs(value) < 10 and value != int(value):
        return f"{value:.{max(decimals, 2)}f}"
    return f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        # text left, figures right
        return "  ".join(
            c.rjust(w) if _FIGURE.match(c) else c.ljust(w) for c, w in zip(row, widths, strict=True)
        ).rstrip()

    return "\n".join(
        ["  " + line(cells[0]), "  " + "  ".join("-" * w for w in widths)]
        + ["  " + line(row) for row in cells[1:]]
    )
