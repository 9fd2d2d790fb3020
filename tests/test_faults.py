"""The migration loses its connection at every step and a re-run converges.

A second connection ends the runbook's backend with pg_terminate_backend:
before a step's transaction, inside it (after its statements ran, before
COMMIT, or while a statement waits for a lock held by a third session),
and after it committed. The hook wraps ``locks.run_with_retries``, which
every step of ``migration.apply_plan`` runs through, so the package needs
no change. After each kill, every FK column must be in a state the
migration can leave behind, no row may be lost or added, and a new run on
a new connection must finish the migration.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from fkrunbook import demo, locks, migration, rollback
from fkrunbook.errors import PreflightError

TABLES = ("collection_attempts", "payment_promises")

OLD = "FK to invoices, validated"
NEW = "FK to operator_contracts, validated"
NEW_NOT_VALID = "FK to operator_contracts, NOT VALID"
OPTION_TWO = "nullable, no FK"
ALLOWED = {1: {OLD, NEW, NEW_NOT_VALID}, 2: {OLD, OPTION_TWO}}
FINAL = {1: NEW, 2: OPTION_TWO}

# Long enough that a step waiting behind a blocker is still waiting when the
# kill comes. With no retry, a missed kill fails the test with a lock timeout.
SLOW_LOCKS = locks.LockSettings(lock_timeout_ms=15_000, max_retries=0)
KILL_WAIT_S = 10.0

# A third session's lock that makes a statement of the step wait inside its
# transaction, and the statement that then waits.
BLOCKERS = {
    # ALTER TABLE ... ADD CONSTRAINT ... FOREIGN KEY waits for SHARE ROW
    # EXCLUSIVE on operator_contracts.
    ("ddl", 1): ("LOCK TABLE operator_contracts IN ROW EXCLUSIVE MODE",
                 "%ADD CONSTRAINT%"),
    # VALIDATE has locked its table and waits for ROW SHARE on operator_contracts.
    ("validate", 1): ("LOCK TABLE operator_contracts IN ACCESS EXCLUSIVE MODE",
                      "%VALIDATE CONSTRAINT%"),
    # Dropping the FK waits for its lock on invoices.
    ("ddl", 2): ("LOCK TABLE invoices IN ROW EXCLUSIVE MODE", "%DROP CONSTRAINT%"),
    # The batch UPDATE waits for ROW EXCLUSIVE.
    ("remap", 1): ("LOCK TABLE collection_attempts IN SHARE MODE", "%UPDATE%"),
}


@dataclass
class Fault:
    """Where to end the runbook's backend: which call to run_with_retries, and when."""

    option: int
    call: int
    kind: str
    moment: str
    remap: bool = False

    @property
    def id(self) -> str:
        prefix = "remap" if self.remap else f"option{self.option}"
        return f"{prefix}-call{self.call}-{self.kind}-{self.moment}"


MOMENTS = ("before", "inside", "lock-wait", "after")

# A word of each kind's step description, to check the call hit that kind.
DESCRIPTION_WORDS = {"ddl": "drop", "validate": "VALIDATE CONSTRAINT",
                     "remap": "rewrite invoice ids"}

# The calls of a two-table plan, in order. With remap and batch_size 2,
# the five rows added by add_remappable_rows take calls 2 to 5 for
# collection_attempts (three batches and the empty one that ends it).
OPTION_ONE_CALLS = ["ddl", "ddl", "validate", "validate"]
OPTION_TWO_CALLS = ["ddl", "ddl"]
REMAP_BATCH_CALL = 3
# Rows still to remap after a kill at the second batch: the first batch
# committed, and the second one commits only when the kill comes after it.
REMAP_LEFT = {"before": 3, "inside": 3, "lock-wait": 3, "after": 1}

FAULTS = (
    [Fault(1, call, kind, moment) for call, kind in enumerate(OPTION_ONE_CALLS)
     for moment in MOMENTS]
    + [Fault(2, call, kind, moment) for call, kind in enumerate(OPTION_TWO_CALLS)
       for moment in MOMENTS]
    + [Fault(1, REMAP_BATCH_CALL, "remap", moment, remap=True) for moment in MOMENTS]
)


def column_state(conn: psycopg.Connection, table: str) -> str:
    """Name the state of ``table.invoice_id``, read straight from the catalog."""
    not_null = conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = %s::regclass"
        " AND attname = 'invoice_id'", [table]).fetchone()[0]
    fks = conn.execute(
        "SELECT con.confrelid::regclass::text, con.convalidated"
        " FROM pg_constraint con JOIN pg_attribute a"
        " ON a.attrelid = con.conrelid AND a.attname = 'invoice_id'"
        " WHERE con.conrelid = %s::regclass AND con.contype = 'f'"
        " AND con.conkey = ARRAY[a.attnum] ORDER BY 1, 2", [table]).fetchall()
    known = {
        (True, (("invoices", True),)): OLD,
        (True, (("operator_contracts", True),)): NEW,
        (True, (("operator_contracts", False),)): NEW_NOT_VALID,
        (False, ()): OPTION_TWO,
    }
    return known.get((not_null, tuple(fks)), f"unexpected: NOT NULL {not_null}, FKs {fks}")


def states(conninfo: str) -> dict[str, str]:
    with psycopg.connect(conninfo) as conn:
        return {table: column_state(conn, table) for table in TABLES}


def row_counts(conninfo: str) -> dict[str, int]:
    with psycopg.connect(conninfo) as conn:
        return {table: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(table))).fetchone()[0] for table in demo.FIXTURE_TABLES}


def rows_to_remap(conninfo: str) -> int:
    with psycopg.connect(conninfo) as conn:
        return conn.execute(
            "SELECT count(*) FROM collection_attempts t WHERE NOT EXISTS"
            " (SELECT 1 FROM operator_contracts c WHERE c.id = t.invoice_id)"
        ).fetchone()[0]


def add_remappable_rows(conninfo: str, count: int = 5) -> None:
    """Add attempts that store an invoice id whose invoice has a contract."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO collection_attempts"
            " (customer_id, invoice_id, collector_id, channel, status)"
            " SELECT customer_id, id, gen_random_uuid(), 'telefone', 'sent'"
            " FROM invoices WHERE id <> contract_id ORDER BY id LIMIT %s", [count])


def terminate(conn: psycopg.Connection, pid: int) -> None:
    # With a timeout, pg_terminate_backend returns once the backend is gone
    # (PostgreSQL 14 and later), so its locks are released on return.
    ended = conn.execute("SELECT pg_terminate_backend(%s, 5000)", [pid]).fetchone()[0]
    assert ended, f"backend {pid} still running 5 s after pg_terminate_backend"


def kill_when_seen(conninfo: str, pid: int, condition: str, pattern: str,
                   outcome: dict) -> None:
    """End backend ``pid`` once pg_stat_activity shows ``condition`` for it.

    Runs in a thread with its own connection. Sets ``outcome["query"]`` to
    the query it saw, or ``outcome["missed"]`` to why it did not kill.
    """
    query = ("SELECT query FROM pg_stat_activity WHERE pid = %s AND query ILIKE %s"
             f" AND {condition}")
    try:
        with psycopg.connect(conninfo, autocommit=True) as watcher:
            deadline = time.monotonic() + KILL_WAIT_S
            while time.monotonic() < deadline:
                row = watcher.execute(query, [pid, pattern]).fetchone()
                if row:
                    terminate(watcher, pid)
                    outcome["query"] = row[0]
                    return
                time.sleep(0.02)
        outcome["missed"] = (f"backend {pid} never showed {condition} with a "
                             f"query like {pattern!r} within {KILL_WAIT_S} s")
    except Exception as exc:  # reported by the test, which runs in another thread
        outcome["missed"] = f"watcher failed: {exc!r}"


WAITING_FOR_LOCK = "wait_event_type = 'Lock'"
ANY_STATE = "true"


@contextlib.contextmanager
def watching(conninfo: str, pid: int, condition: str, pattern: str, outcome: dict):
    """Run ``kill_when_seen`` in a thread for the duration of the block."""
    watcher = threading.Thread(target=kill_when_seen,
                               args=(conninfo, pid, condition, pattern, outcome))
    watcher.start()
    try:
        yield
    finally:
        watcher.join(KILL_WAIT_S + 5)


@contextlib.contextmanager
def blocked_and_killed(conninfo: str, pid: int, lock_statement: str, pattern: str,
                       outcome: dict):
    """Hold ``lock_statement`` in a third session while a watcher ends ``pid``."""
    with psycopg.connect(conninfo) as blocker:
        blocker.execute(lock_statement)
        try:
            with watching(conninfo, pid, WAITING_FOR_LOCK, pattern, outcome):
                yield
        finally:
            blocker.rollback()


class FaultInjector:
    """Stand-in for ``locks.run_with_retries`` that ends the backend at one call."""

    def __init__(self, conninfo: str, fault: Fault, admin: psycopg.Connection):
        self.conninfo = conninfo
        self.fault = fault
        self.admin = admin
        self.real = locks.run_with_retries
        self.descriptions: list[str] = []
        self.kills = 0
        self.missed: str | None = None

    def kill(self, pid: int) -> None:
        terminate(self.admin, pid)
        self.kills += 1

    def __call__(self, conn, body, relations, settings, description, **keywords):
        index = len(self.descriptions)
        self.descriptions.append(description)

        def run(step_body=body):
            return self.real(conn, step_body, relations, settings, description,
                             **keywords)

        if index != self.fault.call:
            return run()

        pid = conn.info.backend_pid
        moment = self.fault.moment
        if moment == "before":
            self.kill(pid)
            return run()
        if moment == "inside":
            def body_then_kill():
                result = body()
                self.kill(pid)
                return result
            return run(body_then_kill)
        if moment == "lock-wait":
            lock_statement, pattern = BLOCKERS[(self.fault.kind, self.fault.option)]
            outcome: dict = {}
            try:
                with blocked_and_killed(self.conninfo, pid, lock_statement, pattern,
                                        outcome):
                    return run()
            finally:
                # The watcher thread has ended here, so outcome is final.
                self.kills += "query" in outcome
                self.missed = outcome.get("missed")
        result = run()
        self.kill(pid)
        return result


def options_for(fault: Fault, settings=SLOW_LOCKS) -> migration.MigrationOptions:
    return migration.MigrationOptions(option=fault.option,
                                      remap_invoice_rows=fault.remap,
                                      batch_size=2, locks=settings)


def apply(conninfo: str, options: migration.MigrationOptions, output_dir=None) -> list:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        plan = migration.plan_migration(conn, options)
        return migration.apply_plan(conn, plan, options, output_dir=output_dir)


def is_converged(conninfo: str, options: migration.MigrationOptions) -> bool:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return migration.plan_migration(conn, options).nothing_to_do


@pytest.fixture
def admin(incident_db):
    with psycopg.connect(incident_db, autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("fault", [pytest.param(f, id=f.id) for f in FAULTS])
def test_killed_step_leaves_known_state(fault, incident_db, admin, monkeypatch, tmp_path):
    if fault.remap:
        add_remappable_rows(incident_db)
    counts = row_counts(incident_db)
    options = options_for(fault)
    injector = FaultInjector(incident_db, fault, admin)
    monkeypatch.setattr(locks, "run_with_retries", injector)

    with psycopg.connect(incident_db, autocommit=True) as conn:
        plan = migration.plan_migration(conn, options)
        try:
            migration.apply_plan(conn, plan, options, output_dir=tmp_path / "run")
        except psycopg.OperationalError:
            pass
    monkeypatch.setattr(locks, "run_with_retries", injector.real)

    assert injector.missed is None
    assert injector.kills == 1
    assert DESCRIPTION_WORDS[fault.kind] in injector.descriptions[fault.call]
    after_kill = states(incident_db)
    for table, state in after_kill.items():
        assert state in ALLOWED[fault.option], f"{table} after {fault.id}: {state}"
    assert row_counts(incident_db) == counts
    if fault.remap:
        assert rows_to_remap(incident_db) == REMAP_LEFT[fault.moment]

    apply(incident_db, options_for(fault, locks.LockSettings()))
    assert is_converged(incident_db, options)
    assert states(incident_db) == {table: FINAL[fault.option] for table in TABLES}
    assert row_counts(incident_db) == counts


def test_kill_while_waiting_for_advisory_lock(incident_db, admin):
    counts = row_counts(incident_db)
    options = migration.MigrationOptions(option=1)
    admin.execute("SELECT pg_advisory_lock(%s)", [locks.ADVISORY_LOCK_KEY])
    outcome: dict = {}
    with psycopg.connect(incident_db, autocommit=True) as conn:
        plan = migration.plan_migration(conn, options)
        with watching(incident_db, conn.info.backend_pid, ANY_STATE,
                      "%pg_try_advisory_lock%", outcome):
            with pytest.raises(psycopg.OperationalError):
                migration.apply_plan(conn, plan, options, output_dir=None,
                                     wait_for_other_run_s=KILL_WAIT_S)
    admin.execute("SELECT pg_advisory_unlock(%s)", [locks.ADVISORY_LOCK_KEY])

    assert outcome.get("missed") is None
    assert "query" in outcome
    assert states(incident_db) == {table: OLD for table in TABLES}
    assert row_counts(incident_db) == counts
    apply(incident_db, options)
    assert states(incident_db) == {table: NEW for table in TABLES}


# Orphan rows: VALIDATE CONSTRAINT meets a row the new FK rejects.


def insert_orphan(conninfo: str) -> str:
    """Insert an attempt whose invoice_id is in no table; return its id.

    The new FK checks inserts even while NOT VALID, so the insert runs with
    session_replication_role = replica, which skips FK triggers (superuser
    only), as a bulk load or a logical replica would write the row.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        return conn.execute(
            "INSERT INTO collection_attempts"
            " (customer_id, invoice_id, collector_id, channel, status)"
            " SELECT id, gen_random_uuid(), gen_random_uuid(), 'sms', 'sent'"
            " FROM customers ORDER BY id LIMIT 1 RETURNING id::text").fetchone()[0]


def delete_attempt(conninfo: str, attempt_id: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("DELETE FROM collection_attempts WHERE id = %s", [attempt_id])


def restore(conninfo: str, run_dir) -> bool:
    """Run the rollback of ``run_dir``; return whether the saved state is back."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        saved = rollback.load_saved_state(conn, run_dir)
        plan = rollback.plan_restore(conn, saved)
        rollback.run_restore(conn, plan, locks.LockSettings(), "apply")
        return rollback.is_restored(rollback.compare_with_saved(conn, saved))


class RowInserter:
    """Stand-in for run_with_retries that runs ``insert`` before call ``call``."""

    def __init__(self, call: int, insert):
        self.call = call
        self.insert = insert
        self.real = locks.run_with_retries
        self.calls = 0
        self.inserted = None

    def __call__(self, conn, body, relations, settings, description, **keywords):
        if self.calls == self.call:
            self.inserted = self.insert()
        self.calls += 1
        return self.real(conn, body, relations, settings, description, **keywords)


def test_orphan_before_validate_rolls_back_validate_only(incident_db, monkeypatch, tmp_path):
    counts = row_counts(incident_db)
    options = migration.MigrationOptions(option=1)
    # Call 2 is VALIDATE on collection_attempts, after both FKs were added NOT VALID.
    inserter = RowInserter(2, lambda: insert_orphan(incident_db))
    monkeypatch.setattr(locks, "run_with_retries", inserter)
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        apply(incident_db, options, output_dir=tmp_path / "run")
    monkeypatch.setattr(locks, "run_with_retries", inserter.real)

    assert states(incident_db) == {table: NEW_NOT_VALID for table in TABLES}
    assert row_counts(incident_db) == counts | {
        "collection_attempts": counts["collection_attempts"] + 1}
    with pytest.raises(PreflightError, match="1 row"):
        apply(incident_db, options)
    with pytest.raises(PreflightError, match="not in public.invoices"):
        restore(incident_db, tmp_path / "run")
    assert states(incident_db) == {table: NEW_NOT_VALID for table in TABLES}

    delete_attempt(incident_db, inserter.inserted)
    assert restore(incident_db, tmp_path / "run")
    assert states(incident_db) == {table: OLD for table in TABLES}
    apply(incident_db, options)
    assert states(incident_db) == {table: NEW for table in TABLES}
    assert row_counts(incident_db) == counts


def insert_invoice_id_attempt(conninfo: str) -> str:
    """Insert an attempt storing an invoice id that is not a contract id."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute(
            "INSERT INTO collection_attempts"
            " (customer_id, invoice_id, collector_id, channel, status)"
            " SELECT customer_id, id, gen_random_uuid(), 'sms', 'sent' FROM invoices"
            " WHERE id NOT IN (SELECT id FROM operator_contracts)"
            " ORDER BY id LIMIT 1 RETURNING id::text").fetchone()[0]


def test_invoice_row_after_preflight_is_undone_by_rollback(incident_db, monkeypatch,
                                                           tmp_path):
    counts = row_counts(incident_db)
    options = migration.MigrationOptions(option=1)
    # Call 0 is the first DDL step: after the pre-flight, while the old FK
    # still accepts invoice ids, as the app's old code would write one.
    inserter = RowInserter(0, lambda: insert_invoice_id_attempt(incident_db))
    monkeypatch.setattr(locks, "run_with_retries", inserter)
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        apply(incident_db, options, output_dir=tmp_path / "run")
    monkeypatch.setattr(locks, "run_with_retries", inserter.real)

    assert states(incident_db) == {table: NEW_NOT_VALID for table in TABLES}
    assert restore(incident_db, tmp_path / "run")
    assert states(incident_db) == {table: OLD for table in TABLES}

    apply(incident_db, migration.MigrationOptions(option=1, remap_invoice_rows=True))
    assert states(incident_db) == {table: NEW for table in TABLES}
    assert row_counts(incident_db) == counts | {
        "collection_attempts": counts["collection_attempts"] + 1}
