"""Run the two migrations under the writer, alone or behind a blocker.

``one_tx`` is the naive fix: one transaction that drops each old FK and
adds the new one with validation, with no lock_timeout. ``runbook`` is
``fkrunbook.migration`` with Option 1 and its default lock settings. Both
change collection_attempts and payment_promises, so they do the same work.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

from fkrunbook import catalog, demo, inspection, migration
from fkrunbook.errors import RunbookError

import dataset
from workload import Blocker, LockWarnings, Writer, WriterKey

logger = logging.getLogger("bench.scenarios")

SCENARIOS = {
    "one_tx_alone": ("one_tx", False),
    "one_tx_blocked": ("one_tx", True),
    "runbook_alone": ("runbook", False),
    "runbook_blocked": ("runbook", True),
}
COLUMN = "invoice_id"
BLOCKED_TABLE = "collection_attempts"
LOCK_MODES = ("AccessShareLock", "RowShareLock", "RowExclusiveLock",
              "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock",
              "ExclusiveLock", "AccessExclusiveLock")


@dataclass
class Timeline:
    """Pacing and start times of a scenario, in seconds from the writer's start.

    The blocker starts at ``writer_lead_s - blocker_lead_s``, the migration
    at ``writer_lead_s``, and the writer stops ``writer_tail_s`` after the
    migration ends.
    """

    rate: float
    blocker_seconds: float
    max_migration_s: float
    writer_lead_s: float = 1.0
    blocker_lead_s: float = 0.5
    writer_tail_s: float = 1.0


def _count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
        sql.Identifier(table))).fetchone()[0]


def one_transaction_statements(conn: psycopg.Connection) -> list[sql.Composed]:
    """Return DROP CONSTRAINT for each old FK and ADD CONSTRAINT for the new ones."""
    contracts = catalog.resolve_table(conn, catalog.REFERENCED_CONTRACTS)
    statements = []
    for table in catalog.resolve_tables(conn, list(migration.DEFAULT_TABLES)):
        for fk in migration.read_column_state(conn, table, COLUMN).foreign_keys:
            statements.append(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                table.identifier, sql.Identifier(fk.name)))
        # Without NOT VALID, ADD CONSTRAINT checks every row before it returns.
        statements.append(sql.SQL(
            "ALTER TABLE {tbl} ADD CONSTRAINT {name} FOREIGN KEY ({col})"
            " REFERENCES {ref} (id) ON DELETE CASCADE"
        ).format(tbl=table.identifier, name=sql.Identifier(f"{table.name}_{COLUMN}_fkey"),
                 col=sql.Identifier(COLUMN), ref=contracts.identifier))
    return statements


def migrate_one_transaction(conn: psycopg.Connection, max_migration_s: float) -> dict:
    """Drop the old FKs and add validated FKs to operator_contracts in one transaction."""
    started = time.perf_counter()
    statements = one_transaction_statements(conn)
    with conn.transaction():
        # With lock_timeout 0 the DDL waits for its locks without limit, as a
        # plain migration script would. statement_timeout only bounds the run.
        conn.execute("SET LOCAL lock_timeout = 0")
        conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
            sql.Literal(f"{int(max_migration_s * 1000)}ms")))
        for statement in statements:
            conn.execute(statement)
    return {"migration_s": time.perf_counter() - started, "statements": len(statements)}


def migrate_runbook(conn: psycopg.Connection) -> dict:
    """Plan and apply Option 1 with the runbook's default options."""
    options = migration.MigrationOptions(option=1)
    started = time.perf_counter()
    plan = migration.plan_migration(conn, options)
    planned = time.perf_counter()
    applied = migration.apply_plan(conn, plan, options, output_dir=None)
    finished = time.perf_counter()
    return {"migration_s": finished - started, "plan_s": planned - started,
            "apply_s": finished - planned,
            "steps_s": sum(step["duration_s"] for step in applied), "steps": applied,
            "lock_timeout_ms": options.locks.lock_timeout_ms}


def check_new_foreign_keys(conn: psycopg.Connection) -> bool:
    """Return whether each table has exactly one FK, validated, to operator_contracts."""
    for name in migration.DEFAULT_TABLES:
        table = catalog.resolve_table(conn, name)
        keys = migration.read_column_state(conn, table, COLUMN).foreign_keys
        if len(keys) != 1:
            return False
        key = keys[0]
        if not (key.referenced_table.endswith(catalog.REFERENCED_CONTRACTS)
                and key.validated and key.on_delete == "c"):
            return False
    return True


def _max_ms(latencies_s: list[float]) -> float | None:
    return round(max(latencies_s) * 1000, 2) if latencies_s else None


def split_stalls(writer: Writer, migration_start_s: float, migration_end_s: float) -> dict:
    """Return the max latency of inserts that overlap the migration and of the rest.

    The rest shows how long inserts stall on this machine while no
    migration runs.
    """
    during, outside = [], []
    for insert in writer.inserts:
        overlaps = (insert.start_s < migration_end_s
                    and insert.start_s + insert.latency_s > migration_start_s)
        (during if overlaps else outside).append(insert.latency_s)
    return {"max_stall_during_migration_ms": _max_ms(during),
            "max_stall_outside_migration_ms": _max_ms(outside)}


def summarize_latencies(writer: Writer) -> dict:
    """Return the writer's counts and latency figures in milliseconds."""
    latencies = np.array([insert.latency_s for insert in writer.inserts]) * 1000
    errors = [insert.error for insert in writer.inserts if insert.error]
    distinct_errors = list(dict.fromkeys(errors))
    figures = {
        "writes": len(writer.inserts) - len(errors),
        "writer_errors": len(errors),
        "writer_error_samples": distinct_errors[:3],
        "max_stall_ms": None, "p99_ms": None, "p50_ms": None,
        "writer_seconds": None,
    }
    if latencies.size:
        figures.update({
            "max_stall_ms": round(float(latencies.max()), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "writer_seconds": round(writer.inserts[-1].start_s, 2),
        })
    return figures


def write_raw_latencies(writer: Writer, path: Path) -> None:
    """Write one CSV line per insert, times in seconds from the writer's start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["due_s", "start_s", "latency_ms", "error"])
        for insert in writer.inserts:
            out.writerow([f"{insert.due_s:.4f}", f"{insert.start_s:.4f}",
                          f"{insert.latency_s * 1000:.3f}", insert.error or ""])


def _sleep_until(moment: float) -> None:
    remaining = moment - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def _run_migration(conninfo: str, kind: str, timeline: Timeline) -> dict:
    with LockWarnings() as warnings, psycopg.connect(
            conninfo, autocommit=True, application_name=f"bench-{kind}") as conn:
        try:
            if kind == "one_tx":
                result = migrate_one_transaction(conn, timeline.max_migration_s)
            else:
                result = migrate_runbook(conn)
            result["error"] = None
        except (psycopg.Error, RunbookError) as exc:
            logger.error("%s migration failed: %s", kind, exc)
            result = {"migration_s": None, "error": f"{type(exc).__name__}: {exc}"}
        result["lock_retries"] = len(warnings.records)
        result["lock_retry_messages"] = warnings.messages()
    return result


def enable_wait_logging(server) -> dict:
    """Make the server log lock waits over 20 ms and statements over 50 ms.

    deadlock_timeout is also the delay after which a lock wait is logged.
    Returns the settings applied.
    """
    settings = {"log_lock_waits": "on", "deadlock_timeout": "20ms",
                "log_min_duration_statement": "50ms",
                "log_line_prefix": "%m [%p] %a "}
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        for name, value in settings.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                sql.Identifier(name), sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")
    return settings


def _save_log_tail(log: Path, offset: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with log.open("rb") as handle:
        handle.seek(offset)
        path.write_bytes(handle.read())


@dataclass
class SessionRun:
    """The writer, the blocker and the migration of one scenario, after the run."""

    writer: Writer
    blocker: Blocker | None
    result: dict
    origin: float  # time.monotonic() at the writer's first insert
    migration_started: float
    migration_ended: float


def _row_counts(conninfo: str) -> dict[str, int]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return {table: _count(conn, table) for table in migration.DEFAULT_TABLES}


def run_sessions(conninfo: str, name: str, timeline: Timeline, key: WriterKey) -> SessionRun:
    """Start the writer, the blocker if the scenario has one, and the migration."""
    kind, blocked = SCENARIOS[name]
    writer_deadline = (timeline.writer_lead_s + timeline.max_migration_s
                       + timeline.blocker_seconds + timeline.writer_tail_s + 30)
    writer = Writer(conninfo, key, timeline.rate, writer_deadline)
    blocker = None
    try:
        if not writer.start(timeout_s=30):
            raise RuntimeError(f"{name}: the writer did not start: {writer.failure}")
        origin = writer.started_at
        if blocked:
            _sleep_until(origin + timeline.writer_lead_s - timeline.blocker_lead_s)
            blocker = Blocker(conninfo, BLOCKED_TABLE, timeline.blocker_seconds)
            blocker.start()
            if not blocker.holding.wait(30) or blocker.failure:
                raise RuntimeError(f"{name}: the blocker did not start: {blocker.failure}")
        _sleep_until(origin + timeline.writer_lead_s)

        migration_started = time.monotonic()
        logger.info("%s: migration starts", name)
        result = _run_migration(conninfo, kind, timeline)
        migration_ended = time.monotonic()
        logger.info("%s: migration finished in %.3f s", name,
                    migration_ended - migration_started)

        _sleep_until(migration_ended + timeline.writer_tail_s)
        writer.stop()
        if blocker is not None:
            blocker.join(timeline.blocker_seconds + 30)
    finally:
        if writer.running:
            writer.stop()
        if blocker is not None and blocker.is_alive():
            blocker.release_now()
    if writer.failure:
        raise RuntimeError(f"{name}: the writer failed: {writer.failure}")
    return SessionRun(writer, blocker, result, origin, migration_started, migration_ended)


def _scenario_figures(name: str, run: SessionRun, before: dict, after: dict,
                      new_fks_ok: bool) -> dict:
    kind, blocked = SCENARIOS[name]
    start_s = run.migration_started - run.origin
    end_s = run.migration_ended - run.origin
    figures = {"migration": kind, "blocked": blocked, **run.result,
               **summarize_latencies(run.writer)}
    for field_name in ("migration_s", "plan_s", "apply_s", "steps_s"):
        if figures.get(field_name) is not None:
            figures[field_name] = round(figures[field_name], 3)
    figures.update({
        "rows_before": before["collection_attempts"],
        "rows_after": after["collection_attempts"],
        "rows_match": (before["collection_attempts"] + figures["writes"]
                       == after["collection_attempts"]
                       and before["payment_promises"] == after["payment_promises"]),
        "payment_promises_before": before["payment_promises"],
        "payment_promises_after": after["payment_promises"],
        "new_fks_validated": new_fks_ok,
        "migration_start_s": round(start_s, 3),
        "migration_end_s": round(end_s, 3),
        **split_stalls(run.writer, start_s, end_s),
    })
    if run.blocker is not None:
        figures["blocker_acquired_s"] = round(run.blocker.acquired_at - run.origin, 3)
        if run.blocker.released_at is not None:
            figures["blocker_released_s"] = round(run.blocker.released_at - run.origin, 3)
    return figures


def run_scenario(server, name: str, timeline: Timeline, key: WriterKey,
                 raw_dir: Path | None, save_server_log: bool = False) -> dict:
    """Run scenario ``name`` on a fresh copy of the template; return its figures.

    With ``save_server_log``, the server log written during the scenario is
    copied to ``raw_dir/<name>.log``.
    """
    log_offset = Path(server.log).stat().st_size
    dbname = f"bench_{name}"
    conninfo = dataset.copy_database(server, dataset.TEMPLATE_DATABASE, dbname)
    try:
        dataset.prewarm(conninfo)
        before = _row_counts(conninfo)
        run = run_sessions(conninfo, name, timeline, key)
        after = _row_counts(conninfo)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            new_fks_ok = check_new_foreign_keys(conn)
    finally:
        dataset.drop_database(server, dbname)
        if save_server_log and raw_dir is not None:
            _save_log_tail(Path(server.log), log_offset, raw_dir / f"{name}.log")
    if raw_dir is not None:
        write_raw_latencies(run.writer, raw_dir / f"{name}.csv")
    return _scenario_figures(name, run, before, after, new_fks_ok)


def time_inspect(conninfo: str) -> dict:
    """Time the inspect notebook's data queries on both tables, in seconds."""
    timings = {}
    with psycopg.connect(conninfo, autocommit=True,
                         application_name="bench-inspect") as conn:
        tables = catalog.resolve_tables(conn, list(migration.DEFAULT_TABLES))
        referenced = [catalog.resolve_table(conn, catalog.REFERENCED_INVOICES),
                      catalog.resolve_table(conn, catalog.REFERENCED_CONTRACTS)]
        calls = [(f"key_provenance({t.name})", lambda t=t: inspection.key_provenance(conn, t, COLUMN))
                 for t in tables]
        calls += [(f"find_breaking_rows({t.name})",
                   lambda t=t: inspection.find_breaking_rows(conn, t, COLUMN)) for t in tables]
        calls.append(("list_foreign_keys", lambda: inspection.list_foreign_keys(
            conn, tables, referenced)))
        calls.append(("cascade_impact", lambda: inspection.cascade_impact(conn, tables, COLUMN)))
        for label, call in calls:
            started = time.perf_counter()
            call()
            timings[label] = round(time.perf_counter() - started, 3)
    timings["total"] = round(sum(timings.values()), 3)
    return timings


_HELD_LOCKS = """
SELECT relation::regclass::text, mode FROM pg_locks
WHERE pid = pg_backend_pid() AND locktype = 'relation' AND granted
  AND relation::regclass::text = ANY(%s)
"""


def _strongest(modes: list[str]) -> str:
    return max(modes, key=LOCK_MODES.index)


def _held_locks(conn: psycopg.Connection) -> dict[str, str]:
    modes_by_table: dict[str, list[str]] = {}
    for relation, mode in conn.execute(_HELD_LOCKS, [list(demo.FIXTURE_TABLES)]).fetchall():
        modes_by_table.setdefault(relation, []).append(mode)
    return {relation: _strongest(modes) for relation, modes in sorted(modes_by_table.items())}


def probe_ddl_locks(server) -> list[dict]:
    """Return the strongest lock each migration transaction holds per table.

    Runs on a separate database with the fixture only. The one-transaction
    migration is rolled back. The runbook's steps are committed one by one,
    because each step needs the previous one. The default options plan no
    remap step.
    """
    dbname = "bench_lock_probe"
    conninfo = demo.create_database(server, dbname)
    probes = []
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            demo.load_fixture(conn)
            with conn.transaction(force_rollback=True):
                for statement in one_transaction_statements(conn):
                    conn.execute(statement)
                probes.append({"migration": "one_tx", "step": "whole transaction",
                               "locks": _held_locks(conn)})
            options = migration.MigrationOptions(option=1)
            for step in migration.plan_migration(conn, options).steps:
                with conn.transaction():
                    for statement in step.statements:
                        conn.execute(statement)
                    probes.append({"migration": "runbook", "step": step.description,
                                   "locks": _held_locks(conn)})
    finally:
        dataset.drop_database(server, dbname)
    return probes

