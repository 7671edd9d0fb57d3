"""The SMTP benchmark's ratios and verdicts on the relay's targets, its printed table, and its JSON file.

Everything here reads the results dictionary that `smtp_bench.run_benchmark` builds (and that is
written out as JSON), so a saved run can be rendered again: `python -m bench.smtp_report FILE.json`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# The relay's performance targets, checked on every run: the tuned relay against Postfix at its
# defaults and against the ceiling, added latency, memory.
MIN_RELAY_OVER_POSTFIX = 10.0
MIN_RELAY_OVER_CEILING = 0.70
MAX_ADDED_P99_MS = 5.0
MAX_IDLE_RSS_MB = 40.0
MAX_LOAD_RSS_MB = 64.0


@dataclass(frozen=True, kw_only=True)
class Verdict:
    target: str
    value: str
    met: bool | None  # None: not measured in this run


def added_latency(latency: dict[str, Any]) -> dict[str, float] | None:
    """Relay minus direct, per percentile; the runs are not paired message by message, so this is the
    difference of the distributions, not a distribution of differences."""
    direct, via = latency.get("direct") or {}, latency.get("relay") or {}
    if not direct.get("latency_ms") or not via.get("latency_ms"):
        return None
    return {q: via["latency_ms"][q] - direct["latency_ms"][q] for q in ("p50", "p90", "p99")}


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    throughput, memory = results["throughput"], results["memory_mb"]
    relay, ceiling, postfix = throughput["relay"], throughput["ceiling"], throughput["postfix"]
    found: list[Verdict] = []

    target = f"relay/Postfix >= {MIN_RELAY_OVER_POSTFIX:g}x"
    if postfix and postfix["rate"] > 0 and postfix["error"] is None:
        ratio = relay["rate"] / postfix["rate"]
        found.append(Verdict(target=target, value=f"{ratio:.1f}x", met=ratio >= MIN_RELAY_OVER_POSTFIX))
    else:
        found.append(Verdict(target=target, value="n/a", met=None))

    share = relay["rate"] / ceiling["rate"] if ceiling["rate"] else 0.0
    found.append(
        Verdict(
            target=f"relay/ceiling >= {MIN_RELAY_OVER_CEILING:.0%}",
            value=f"{share:.0%}",
            met=share >= MIN_RELAY_OVER_CEILING and relay["error"] is None,
        )
    )

    target = f"added p99 <= {MAX_ADDED_P99_MS:g} ms"
    added = added_latency(results["latency"])
    if added is None:
        found.append(Verdict(target=target, value="n/a", met=None))
    else:
        found.append(
            Verdict(target=target, value=f"{added['p99']:.2f} ms", met=added["p99"] <= MAX_ADDED_P99_MS)
        )

    idle = memory["idle"] or 0.0
    found.append(
        Verdict(
            target=f"RSS idle <= {MAX_IDLE_RSS_MB:g} MB", value=f"{idle:.1f} MB", met=idle <= MAX_IDLE_RSS_MB
        )
    )
    peak = memory["load_hwm"] or 0.0
    found.append(
        Verdict(
            target=f"RSS under load <= {MAX_LOAD_RSS_MB:g} MB",
            value=f"{peak:.1f} MB",
            met=peak <= MAX_LOAD_RSS_MB,
        )
    )
    return found


# Rows of the throughput table: key in results["throughput"], label. Every path but the first two is
# smtp-source -> <path> -> Dovecot -> smtp-sink.
THROUGHPUT_ROWS = (
    ("sink_alone", "the tools alone: smtp-source -> smtp-sink"),
    ("ceiling", "(c) ceiling: pooled client -> Dovecot -> sink"),
    ("relay", "(a) outbound-relay, maxConnections = sessions"),
    ("relay_defaults", "(a') outbound-relay, relay.yaml defaults"),
    ("postfix", "(b) Postfix, defaults"),
    ("postfix_reuse", "(b') Postfix, smtp_tls_connection_reuse"),
)
# Ratios printed with every run: each relay row over each reference row, all from the same process.
RATIO_ROWS = ("relay", "relay_defaults")
RATIO_REFERENCES = ("postfix", "postfix_reuse", "ceiling")


def _usable(row: dict[str, Any] | None) -> bool:
    return row is not None and row["error"] is None and row["rate"] > 0


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Msg/s of each relay row over each reference row of the same run; None where either is missing
    or failed."""
    throughput = results["throughput"]
    found: dict[str, dict[str, float | None]] = {}
    for key in RATIO_ROWS:
        row = throughput.get(key)
        if row is None:
            continue
        found[key] = {
            reference: row["rate"] / throughput[reference]["rate"]
            if _usable(row) and _usable(throughput.get(reference))
            else None
            for reference in RATIO_REFERENCES
        }
    return found


def _rate(row: dict[str, Any]) -> str:
    return f"{row['rate']:,.0f}" if row["rate"] >= 100 else f"{row['rate']:.1f}"


def _ratio(value: float | None, reference: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0%}" if reference == "ceiling" else f"{value:.1f}x"


def render(results: dict[str, Any]) -> str:
    settings, throughput, machine = results["settings"], results["throughput"], results["machine"]
    load = f"load avg {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}"
    lines = [
        f"outbound-relay vs Postfix, {results['mode']} run {results['started']}",
        f"{settings['sessions']} sessions, {settings['size']}-byte bodies, {machine['cpus']} CPUs, {load}, "
        f"relay args: {' '.join(settings['relay_args']) or '(none)'}",
    ]
    if results.get("profile"):
        lines.append("!! the relay ran under pyinstrument: its numbers are not comparable")
    lines += [
        "",
        f"{'end to end, smtp-source -> <path> -> Dovecot -> smtp-sink':<58}"
        f"{'messages':>9}{'seconds':>9}{'msg/s':>9}{'logins':>8}{'reused':>8}",
    ]
    for key, name in THROUGHPUT_ROWS:
        row = throughput.get(key)
        if row is None:
            lines.append(f"{name:<58}{'skipped':>18}")
            continue
        logins = "" if row["upstream_logins"] is None else str(row["upstream_logins"])
        reused = "" if row.get("reused") is None else str(row["reused"])
        lines.append(
            f"{name:<58}{row['delivered']:>9}{row['seconds']:>9.2f}{_rate(row):>9}{logins:>8}{reused:>8}"
        )
        if row["error"]:
            lines.append(f"    !! {row['error']}")
    rounds = throughput["rounds"]
    if len(rounds["relay"]) > 1:
        columns = [rounds["ceiling"], rounds["relay"]]
        names = "ceiling/relay"
        if rounds.get("relay_defaults"):
            columns.append(rounds["relay_defaults"])
            names += "/relay defaults"
        per_round = ", ".join("/".join(_rate(run) for run in runs) for runs in zip(*columns, strict=True))
        lines.append(f"  best of {len(rounds['relay'])} rounds; {names} msg/s by round: {per_round}")
    for key, name in (("relay", "(a)"), ("relay_defaults", "(a')")):
        row = throughput.get(key)
        if row is not None and row["relay_cpu_ms"] is not None:
            lines.append(
                f"  relay CPU {name} (user + system, all threads): {row['relay_cpu_ms']:.3f} ms per message"
            )
    lines.append("  logins: AUTH exchanges Dovecot logged during the run, one per upstream connection")
    lines.append(
        "  reused: Postfix deliveries over a connection an earlier one had opened (its log's conn_use=)"
    )

    found = ratios(results)
    if found:
        lines += [
            "",
            "ratios within this run: msg/s of the row over".ljust(46)
            + "(b)".rjust(10)
            + "(b')".rjust(10)
            + "(c)".rjust(10),
            f"{'':<46}{'Postfix':>10}{'reuse':>10}{'ceiling':>10}",
        ]
        labels = dict(THROUGHPUT_ROWS)
        for key, row_ratios in found.items():
            cells = "".join(f"{_ratio(row_ratios[ref], ref):>10}" for ref in RATIO_REFERENCES)
            lines.append(f"{labels[key]:<46}{cells}")

    latency = results["latency"]
    lines += [
        "",
        f"latency at {latency['rate']:g} msg/s, MAIL to reply to DATA, ms"
        f"{'p50':>21}{'p90':>9}{'p99':>9}{'max':>9}",
    ]
    if latency.get("error"):
        lines.append(f"    !! {latency['error']}")
    for name, key in (("direct -> Dovecot -> sink", "direct"), ("through outbound-relay", "relay")):
        row = latency.get(key)
        if row is None:
            lines.append(f"  {name:<60}{'skipped':>9}")
        elif not row["latency_ms"]:
            lines.append(f"  {name:<60}!! {row['first_failure']}")
        else:
            q = row["latency_ms"]
            lines.append(f"  {name:<60}{q['p50']:>9.2f}{q['p90']:>9.2f}{q['p99']:>9.2f}{q['max']:>9.2f}")
    added = added_latency(latency)
    if added is not None:
        lines.append(
            f"  {'added by the relay':<60}{added['p50']:>9.2f}{added['p90']:>9.2f}{added['p99']:>9.2f}"
        )

    memory = results["memory_mb"]
    lines += [
        "",
        f"relay memory, MB: idle {memory['idle'] or 0:.1f} (VmRSS after start), "
        f"{memory['idle_after_load'] or 0:.1f} (VmRSS after load, pool drained)",
        f"                  under load {memory['load_rss_peak'] or 0:.1f} (VmRSS peak sampled), "
        f"{memory['load_hwm'] or 0:.1f} (VmHWM)",
        "",
        "targets:",
    ]
    for verdict in verdicts(results):
        mark = {True: "met", False: "NOT MET", None: "not measured"}[verdict.met]
        lines.append(f"  {verdict.target:<28}{verdict.value:>12}   {mark}")
    return "\n".join(lines)


def write_results(results: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"smtp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    document = {**results, "ratios": ratios(results), "verdicts": [asdict(v) for v in verdicts(results)]}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(render(json.loads(Path(name).read_text())))
