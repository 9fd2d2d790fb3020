"""Tests of fkrunbook.rollback against a real PostgreSQL.

Each test applies Option 1 or Option 2 with the runbook's own migration,
which saves constraints_before.json, and then restores from that file.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from psycopg import sql

from fkrunbook import locks, migration, parameters, rollback, saved_state
from fkrunbook.errors import (GateError, LockRetriesExhausted, ParameterError,
                              PreflightError, TargetError)

TABLES = ("public.collection_attempts", "public.payment_promises")

# Id of contract OC-2025-0043 in sql/seed.sql, which has no invoice with the same id.
CONTRACT_WITHOUT_INVOICE = "2f44c1c9-9c8b-4c76-b56c-527f5242cafd"

TAMPERED_DEFINITION = "FOREIGN KEY (invoice_id) REFERENCES invoices(id); DROP TABLE customers"

FAST_RETRIES = locks.LockSettings(lock_timeout_ms=50, max_retries=2,
                                  backoff_base_ms=10, backoff_max_ms=20)


def apply_option(conn: psycopg.Connection, option: int, output_dir) -> None:
    options = migration.MigrationOptions(option=option)
    plan = migration.plan_migration(conn, options)
    migration.apply_plan(conn, plan, options, output_dir=output_dir)


def constraint_snapshot(conn: psycopg.Connection) -> list[tuple]:
    """Return every constraint and NOT NULL flag of the two FK tables."""
    constraints = conn.execute(
        "SELECT conrelid::regclass::text, conname, contype,"
        " pg_get_constraintdef(oid), convalidated FROM pg_constraint"
        " WHERE conrelid = ANY(%s::regclass[]) ORDER BY 1, 2", [list(TABLES)]
    ).fetchall()
    not_null = conn.execute(
        "SELECT attrelid::regclass::text, attnotnull FROM pg_attribute"
        " WHERE attrelid = ANY(%s::regclass[]) AND attname = 'invoice_id'"
        " ORDER BY 1", [list(TABLES)]
    ).fetchall()
    return constraints + not_null


def current_states(conn: psycopg.Connection, saved: saved_state.SavedState) -> list[dict]:
    return [migration.read_column_state(conn, column.table, column.column).as_dict()
            for column in saved.columns]


def saved_columns(folder) -> list[dict]:
    return json.loads((folder / saved_state.STATE_FILE).read_text())["columns"]


def rewrite_state_file(folder, change) -> None:
    path = folder / saved_state.STATE_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def restore(conn: psycopg.Connection, folder,
            settings: locks.LockSettings = locks.LockSettings()) -> list[dict]:
    saved = saved_state.load_saved_state(conn, folder)
    plan = rollback.plan_restore(conn, saved)
    return rollback.run_restore(conn, plan, settings, "apply")


def insert_attempt(conn: psycopg.Connection, invoice_id: str | None) -> None:
    conn.execute(
        "INSERT INTO collection_attempts"
        " (customer_id, invoice_id, collector_id, channel, status)"
        " SELECT customer_id, %s, gen_random_uuid(), 'whatsapp', 'sent'"
        " FROM operator_contracts WHERE id = %s",
        [invoice_id, CONTRACT_WITHOUT_INVOICE])


@pytest.fixture
def option_one(conn, tmp_path):
    apply_option(conn, 1, tmp_path)
    return tmp_path


@pytest.fixture
def option_two(conn, tmp_path):
    apply_option(conn, 2, tmp_path)
    return tmp_path


def test_restore_after_option_one(conn, option_one):
    restore(conn, option_one)
    saved = saved_state.load_saved_state(conn, option_one)
    states = current_states(conn, saved)
    foreign_keys = [fk for state in states for fk in state["foreign_keys"]]

    assert states == saved_columns(option_one)
    assert len(foreign_keys) == 2
    assert {fk["referenced_table"] for fk in foreign_keys} == {"invoices"}
    assert all(fk["validated"] for fk in foreign_keys)
    assert rollback.is_restored(rollback.compare_with_saved(conn, saved))


def test_restore_after_option_two(conn, option_two):
    restore(conn, option_two)
    saved = saved_state.load_saved_state(conn, option_two)
    states = current_states(conn, saved)
    foreign_keys = [fk for state in states for fk in state["foreign_keys"]]

    assert states == saved_columns(option_two)
    assert all(state["not_null"] for state in states)
    assert {fk["referenced_table"] for fk in foreign_keys} == {"invoices"}
    assert all(fk["validated"] for fk in foreign_keys)
    assert rollback.is_restored(rollback.compare_with_saved(conn, saved))


def test_restore_leaves_no_temporary_check(conn, option_two):
    restore(conn, option_two)
    checks = conn.execute(
        "SELECT conname FROM pg_constraint WHERE contype = 'c'"
        " AND conrelid = ANY(%s::regclass[])", [list(TABLES)]).fetchall()

    assert checks == []


def test_set_not_null_skips_table_scan(conn, option_two):
    notices = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
    conn.execute("SET client_min_messages = debug1")
    restore(conn, option_two)
    proofs = [n for n in notices if "sufficient to prove" in (n or "")]

    assert len(proofs) == 2


def test_restore_twice_plans_nothing(conn, option_one):
    restore(conn, option_one)
    saved = saved_state.load_saved_state(conn, option_one)
    second = rollback.plan_restore(conn, saved)

    assert second.nothing_to_do
    assert rollback.run_restore(conn, second, locks.LockSettings(), "apply") == []
    assert "Nothing to do" in rollback.describe_outcome("apply", second, [])


def test_interrupted_restore_plans_rest(conn, option_two):
    saved = saved_state.load_saved_state(conn, option_two)
    plan = rollback.plan_restore(conn, saved)
    for step in plan.steps[:2]:
        rollback.run_step(conn, step, locks.LockSettings())
    left = rollback.plan_restore(conn, saved)
    expected = [step.description for step in plan.steps[2:]]

    assert [step.description for step in left.steps] == expected


def test_preflight_rejects_row_after_fix(conn, option_one):
    insert_attempt(conn, CONTRACT_WITHOUT_INVOICE)
    before = constraint_snapshot(conn)

    with pytest.raises(PreflightError) as raised:
        restore(conn, option_one)

    assert "public.collection_attempts: 1 row(s) have a value in invoice_id" in str(raised.value)
    assert "a invoice_id" not in str(raised.value)
    assert "Keep the fix in place" in str(raised.value)
    assert constraint_snapshot(conn) == before


def test_preflight_rejects_null_after_option_two(conn, option_two):
    insert_attempt(conn, None)
    before = constraint_snapshot(conn)

    with pytest.raises(PreflightError) as raised:
        restore(conn, option_two)

    assert "1 row(s) have invoice_id NULL" in str(raised.value)
    assert constraint_snapshot(conn) == before


def test_tampered_definition_is_rejected(conn, option_one):
    def tamper(data):
        data["columns"][0]["foreign_keys"][0]["definition"] = TAMPERED_DEFINITION

    rewrite_state_file(option_one, tamper)
    before = constraint_snapshot(conn)

    with pytest.raises(ParameterError) as raised:
        restore(conn, option_one)

    assert "not a plain foreign key" in str(raised.value)
    assert str(option_one / saved_state.STATE_FILE) in str(raised.value)
    assert constraint_snapshot(conn) == before
    assert conn.execute("SELECT to_regclass('customers')").fetchone()[0] is not None


def test_mismatched_referenced_table_is_rejected(conn, option_one):
    def retarget(data):
        data["columns"][0]["foreign_keys"][0]["referenced_table"] = "customers"

    rewrite_state_file(option_one, retarget)

    with pytest.raises(ParameterError, match="changed after the migrate run"):
        saved_state.load_saved_state(conn, option_one)


def test_wrong_database_is_rejected(conn, option_one):
    rewrite_state_file(option_one, lambda data: data.update(database="billing"))
    before = constraint_snapshot(conn)

    with pytest.raises(TargetError) as raised:
        restore(conn, option_one)

    assert "'billing'" in str(raised.value)
    assert constraint_snapshot(conn) == before


def test_unknown_table_is_rejected(conn, option_one):
    def rename(data):
        data["columns"][0]["table"] = "public.collection_attempt"

    rewrite_state_file(option_one, rename)

    with pytest.raises(ParameterError, match="'collection_attempt' was not found"):
        saved_state.load_saved_state(conn, option_one)


def test_unknown_column_is_rejected(conn, option_one):
    rewrite_state_file(option_one,
                       lambda data: data["columns"][0].update(column="invoice"))

    with pytest.raises(ParameterError, match="Column 'invoice' was not found"):
        saved_state.load_saved_state(conn, option_one)


def test_missing_file_is_rejected(conn, tmp_path):
    with pytest.raises(ParameterError, match="file not found"):
        saved_state.load_saved_state(conn, tmp_path)


def test_invalid_json_is_rejected(conn, option_one):
    (option_one / saved_state.STATE_FILE).write_text("{not json")

    with pytest.raises(ParameterError, match="invalid JSON"):
        saved_state.load_saved_state(conn, option_one)


def test_dry_run_changes_nothing(conn, option_one):
    before = constraint_snapshot(conn)
    saved = saved_state.load_saved_state(conn, option_one)
    plan = rollback.plan_restore(conn, saved)
    mode = parameters.check_gate(conn, True, "")
    applied = rollback.run_restore(conn, plan, locks.LockSettings(), mode)

    assert mode == "dry run"
    assert applied == []
    assert len(plan.steps) == 4
    assert constraint_snapshot(conn) == before


def test_gate_with_wrong_confirm_stops(conn, option_one):
    before = constraint_snapshot(conn)

    with pytest.raises(GateError):
        parameters.check_gate(conn, False, "another_database")

    assert constraint_snapshot(conn) == before


def test_blocking_session_exhausts_retries(conn, incident_db, option_one):
    saved = saved_state.load_saved_state(conn, option_one)
    plan = rollback.plan_restore(conn, saved)
    before = constraint_snapshot(conn)

    with psycopg.connect(incident_db) as blocker:
        blocker.execute("LOCK TABLE collection_attempts IN ACCESS SHARE MODE")
        with pytest.raises(LockRetriesExhausted) as raised:
            rollback.run_restore(conn, plan, FAST_RETRIES, "apply")
        after = constraint_snapshot(conn)
        blocker_pid = blocker.info.backend_pid
        blocker.rollback()

    assert f"pid {blocker_pid}" in str(raised.value)
    assert raised.value.attempts == 3
    assert after == before


def test_restore_rebuilds_deferrable_cascade(conn, option_one):
    definition = ("FOREIGN KEY (invoice_id) REFERENCES invoices(id)"
                  " ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED")

    def change(data):
        data["columns"][0]["foreign_keys"][0].update(definition=definition,
                                                     on_delete="c")

    rewrite_state_file(option_one, change)
    restore(conn, option_one)
    saved = saved_state.load_saved_state(conn, option_one)

    assert current_states(conn, saved)[0]["foreign_keys"][0]["definition"] == definition
    assert rollback.is_restored(rollback.compare_with_saved(conn, saved))


def test_restore_keeps_unvalidated_fk_unvalidated(conn, option_one):
    rewrite_state_file(option_one, lambda data: data["columns"][0]["foreign_keys"][0]
                       .update(validated=False))
    saved = saved_state.load_saved_state(conn, option_one)
    kinds = [step.kind for step in rollback.plan_restore(conn, saved).steps]
    restore(conn, option_one)

    assert kinds.count("validate") == 1
    assert current_states(conn, saved)[0]["foreign_keys"][0]["validated"] is False


# --- the server the file was saved from ------------------------------------

def system_identifier(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0]


def add_server(folder, host, port, identifier) -> None:
    """Replace the server fields that migrate's save_state wrote."""
    server = {"host": host, "port": port, "system_identifier": identifier}
    rewrite_state_file(folder, lambda data: data.update(server=server))


def test_save_state_records_server(conn, option_one):
    data = json.loads((option_one / "constraints_before.json").read_text())
    assert data["server"]["system_identifier"] == system_identifier(conn)
    assert data["server"]["port"] == conn.info.port


def test_file_without_server_warns(conn, option_one):
    # Files written before save_state recorded the server have no such field.
    rewrite_state_file(option_one, lambda data: data.pop("server"))
    saved = saved_state.load_saved_state(conn, option_one)

    assert len(saved.warnings) == 1
    assert "only the database name" in saved.warnings[0]
    assert saved.server is None


def test_same_server_passes(conn, option_one):
    add_server(option_one, conn.info.host, conn.info.port, system_identifier(conn))
    saved = saved_state.load_saved_state(conn, option_one)

    assert saved.warnings == []
    assert saved.server["system_identifier"] == system_identifier(conn)


def test_identifier_decides_over_host(conn, option_one):
    # The same cluster reached under another host name is the same server.
    add_server(option_one, "db-alias.internal", 6432, system_identifier(conn))

    assert saved_state.load_saved_state(conn, option_one).warnings == []


def test_other_system_identifier_is_rejected(conn, option_one):
    add_server(option_one, conn.info.host, conn.info.port, "7000000000000000001")
    before = constraint_snapshot(conn)

    with pytest.raises(TargetError) as raised:
        restore(conn, option_one)

    assert "system_identifier 7000000000000000001" in str(raised.value)
    assert f"system_identifier {system_identifier(conn)}" in str(raised.value)
    assert "nothing was changed" in str(raised.value)
    assert constraint_snapshot(conn) == before


@pytest.mark.parametrize("field, value", [("host", "db-other.internal"), ("port", 6543)])
def test_other_host_or_port_is_rejected(conn, option_one, field, value):
    server = {"host": conn.info.host, "port": conn.info.port}
    server[field] = value
    add_server(option_one, server["host"], server["port"], None)
    before = constraint_snapshot(conn)

    with pytest.raises(TargetError) as raised:
        restore(conn, option_one)

    assert f"{field} {value}" in str(raised.value)
    assert f"host {conn.info.host}, port {conn.info.port}" in str(raised.value)
    assert "Check the target" in str(raised.value)
    assert constraint_snapshot(conn) == before


@pytest.mark.parametrize("server", ["db.internal", {"host": ["a"]}, {"port": True}])
def test_invalid_server_field_is_rejected(conn, option_one, server):
    rewrite_state_file(option_one, lambda data: data.update(server=server))

    with pytest.raises(ParameterError, match="server"):
        saved_state.load_saved_state(conn, option_one)


@pytest.fixture
def role_without_control_functions(conn, incident_db):
    """Conninfo of a new login role that may not run pg_control_system()."""
    role = f"no_control_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    conn.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    yield psycopg.conninfo.make_conninfo(incident_db, user=role)
    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_unreadable_identifier_uses_host_and_port(conn, option_one,
                                                  role_without_control_functions):
    add_server(option_one, conn.info.host, conn.info.port, "7000000000000000001")
    with psycopg.connect(role_without_control_functions, autocommit=True) as limited:
        saved = saved_state.load_saved_state(limited, option_one)

    assert len(saved.warnings) == 1
    assert "checked by host and port only" in saved.warnings[0]


def test_unreadable_identifier_other_host_is_rejected(conn, option_one,
                                                      role_without_control_functions):
    add_server(option_one, "db-other.internal", conn.info.port, "7000000000000000001")
    with psycopg.connect(role_without_control_functions, autocommit=True) as limited:
        with pytest.raises(TargetError, match="host db-other.internal"):
            saved_state.load_saved_state(limited, option_one)


# --- a state saved after an earlier run had begun the fix -------------------

def test_incident_state_has_no_warning(conn, option_one):
    plan = rollback.plan_restore(conn, saved_state.load_saved_state(conn, option_one))

    assert plan.saved_state_warning is None


def test_half_applied_saved_state_warns(conn, incident_db, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    options = migration.MigrationOptions(option=1, locks=FAST_RETRIES)
    # The first run changes collection_attempts, then times out on the lock
    # of payment_promises that another session holds.
    with psycopg.connect(incident_db) as blocker:
        blocker.execute("LOCK TABLE payment_promises IN ACCESS SHARE MODE")
        with pytest.raises(LockRetriesExhausted):
            migration.apply_plan(conn, migration.plan_migration(conn, options),
                                 options, output_dir=first)
        blocker.rollback()
    # The re-run, into a new folder, saves that half-applied state.
    migration.apply_plan(conn, migration.plan_migration(conn, options), options,
                         output_dir=second)
    rerun = rollback.plan_restore(conn, saved_state.load_saved_state(conn, second))
    original = rollback.plan_restore(conn, saved_state.load_saved_state(conn, first))
    warning = rerun.saved_state_warning or ""

    assert "not the incident state" in warning
    assert ("public.collection_attempts.invoice_id: collection_attempts_invoice_id_fkey "
            "references public.operator_contracts and is NOT VALID") in warning
    assert "payment_promises" not in warning
    assert "earlier run's output folder" in warning
    assert original.saved_state_warning is None
    assert rollback.run_restore(conn, rerun, locks.LockSettings(), "apply") != []


def test_unvalidated_saved_fk_warns(conn, option_one):
    rewrite_state_file(option_one, lambda data: data["columns"][1]["foreign_keys"][0]
                       .update(validated=False))
    plan = rollback.plan_restore(conn, saved_state.load_saved_state(conn, option_one))

    assert "payment_promises_invoice_id_fkey is NOT VALID" in plan.saved_state_warning
