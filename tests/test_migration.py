"""Planning and applying Option 1 and Option 2 on a real PostgreSQL."""

import json
import threading

import psycopg
import pytest

from fkrunbook import locks, migration, parameters
from fkrunbook.errors import (ConcurrentRunError, GateError, LockRetriesExhausted,
                              ParameterError, PreflightError)

FK_QUERY = """
SELECT conname, confrelid::regclass::text, convalidated, confdeltype
FROM pg_constraint
WHERE contype = 'f' AND conrelid = %s::regclass
  AND conkey = ARRAY[(SELECT attnum FROM pg_attribute
                      WHERE attrelid = %s::regclass AND attname = 'invoice_id')]
"""
TABLES = ("collection_attempts", "payment_promises")


def invoice_fks(conn, table):
    return conn.execute(FK_QUERY, [table, table]).fetchall()


def not_null(conn, table):
    return conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = %s::regclass"
        " AND attname = 'invoice_id'", [table]).fetchone()[0]


def apply(conn, tmp_path=None, **kwargs):
    options = migration.MigrationOptions(**kwargs)
    plan = migration.plan_migration(conn, options)
    return migration.apply_plan(conn, plan, options, output_dir=tmp_path)


def add_invoice_rows(conn, contract_id_null=False):
    """Store invoice ids (not contract ids) the way an older screen did."""
    if contract_id_null:
        conn.execute(
            "INSERT INTO invoices (id, customer_id, contract_id, due_date, amount)"
            " SELECT '00000000-0000-4000-8000-0000000000aa', id, NULL,"
            " date '2026-01-01', 10 FROM customers ORDER BY id LIMIT 1")
        invoice = "00000000-0000-4000-8000-0000000000aa"
    else:
        invoice = conn.execute(
            "SELECT id::text FROM invoices WHERE id <> contract_id"
            " ORDER BY id LIMIT 1").fetchone()[0]
    conn.execute(
        "INSERT INTO collection_attempts (customer_id, invoice_id, collector_id, channel, status)"
        " SELECT customer_id, id, gen_random_uuid(), 'telefone', 'sent' FROM invoices"
        " WHERE id = %s", [invoice])
    return invoice


@pytest.mark.parametrize("table", TABLES)
def test_option_one_repoints_fk_validated(conn, table):
    apply(conn, option=1)
    assert invoice_fks(conn, table) == [
        (f"{table}_invoice_id_fkey", "operator_contracts", True, "c")]


@pytest.mark.parametrize("table", TABLES)
def test_option_two_drops_fk_and_not_null(conn, table):
    apply(conn, option=2)
    assert invoice_fks(conn, table) == []
    assert not_null(conn, table) is False


def test_option_one_keeps_not_null(conn):
    apply(conn, option=1)
    assert not_null(conn, "collection_attempts") is True


def test_option_one_rerun_plans_nothing(conn):
    apply(conn, option=1)
    plan = migration.plan_migration(conn, migration.MigrationOptions(option=1))
    assert plan.nothing_to_do


def test_option_two_rerun_plans_nothing(conn):
    apply(conn, option=2)
    assert apply(conn, option=2) == []


def test_option_one_with_restrict(conn):
    apply(conn, option=1, on_delete="restrict")
    assert invoice_fks(conn, "collection_attempts")[0][3] == "r"


def test_option_one_after_option_two_adds_fk(conn):
    apply(conn, option=2)
    apply(conn, option=1)
    assert invoice_fks(conn, "payment_promises") == [
        ("payment_promises_invoice_id_fkey", "operator_contracts", True, "c")]


def test_not_valid_state_plans_only_validate(conn):
    conn.execute("ALTER TABLE collection_attempts DROP CONSTRAINT collection_attempts_invoice_id_fkey")
    conn.execute("ALTER TABLE collection_attempts ADD CONSTRAINT collection_attempts_invoice_id_fkey"
                 " FOREIGN KEY (invoice_id) REFERENCES operator_contracts (id)"
                 " ON DELETE CASCADE NOT VALID")
    plan = migration.plan_migration(conn, migration.MigrationOptions(
        option=1, tables=("collection_attempts",)))
    assert [step.kind for step in plan.steps] == ["validate"]


def test_single_table_leaves_other_alone(conn):
    apply(conn, option=1, tables=("collection_attempts",))
    assert invoice_fks(conn, "payment_promises")[0][1] == "invoices"


def test_preflight_stops_before_any_change(conn):
    add_invoice_rows(conn)
    with pytest.raises(PreflightError, match="remap_invoice_rows=True"):
        apply(conn, option=1)
    assert invoice_fks(conn, "collection_attempts")[0][1] == "invoices"
    assert invoice_fks(conn, "payment_promises")[0][1] == "invoices"


def test_remap_rewrites_invoice_ids_to_contract(conn):
    invoice = add_invoice_rows(conn)
    contract = conn.execute("SELECT contract_id::text FROM invoices WHERE id = %s",
                            [invoice]).fetchone()[0]
    count = conn.execute("SELECT count(*) FROM collection_attempts").fetchone()[0]
    applied = apply(conn, option=1, remap_invoice_rows=True, batch_size=1)
    remapped = conn.execute("SELECT count(*) FROM collection_attempts WHERE invoice_id = %s",
                            [contract]).fetchone()[0]
    assert remapped == 1
    assert conn.execute("SELECT count(*) FROM collection_attempts").fetchone()[0] == count
    assert invoice_fks(conn, "collection_attempts")[0][1:3] == ("operator_contracts", True)
    assert sum(r["rows_updated"] or 0 for r in applied if r["kind"] == "remap") == 1


def test_remap_stops_on_invoice_without_contract(conn):
    add_invoice_rows(conn, contract_id_null=True)
    with pytest.raises(PreflightError, match="cannot fix them"):
        apply(conn, option=1, remap_invoice_rows=True)
    assert invoice_fks(conn, "collection_attempts")[0][1] == "invoices"


def test_set_null_rejected_on_not_null_column(conn):
    with pytest.raises(ParameterError, match="SET NULL"):
        migration.plan_migration(conn, migration.MigrationOptions(option=1, on_delete="SET NULL"))


@pytest.mark.parametrize("option", [3, "x", True, None])
def test_unknown_option_rejected(conn, option):
    with pytest.raises(ParameterError, match="option must be 1"):
        migration.plan_migration(conn, migration.MigrationOptions(option=option))


def test_unknown_on_delete_rejected(conn):
    with pytest.raises(ParameterError, match="on_delete must be one of"):
        migration.plan_migration(conn, migration.MigrationOptions(
            option=1, on_delete="CASCADE; DROP TABLE customers"))


@pytest.mark.parametrize("name", ["collection_attempts; DROP TABLE customers",
                                  'Collection_Attempts', "public.collection_attempts",
                                  "", "missing_table"])
def test_unknown_table_rejected(conn, name):
    with pytest.raises(ParameterError):
        migration.plan_migration(conn, migration.MigrationOptions(option=1, tables=(name,)))
    assert invoice_fks(conn, "collection_attempts")[0][1] == "invoices"


def test_unknown_column_rejected(conn):
    with pytest.raises(ParameterError, match="Column 'invoice'"):
        migration.plan_migration(conn, migration.MigrationOptions(option=1, column="invoice"))


def test_gate_requires_database_name(conn):
    with pytest.raises(GateError, match="not the target database"):
        parameters.check_gate(conn, dry_run=False, confirm="production")


def test_gate_passes_with_database_name(conn):
    assert parameters.check_gate(conn, False, conn.info.dbname) == "apply"


def test_gate_dry_run_needs_no_name(conn):
    assert parameters.check_gate(conn, True, "") == "dry run"


def test_save_state_writes_definitions(conn, tmp_path):
    apply(conn, tmp_path, option=1)
    saved = json.loads((tmp_path / "constraints_before.json").read_text())
    definitions = [fk["definition"] for col in saved["columns"] for fk in col["foreign_keys"]]
    assert definitions == ["FOREIGN KEY (invoice_id) REFERENCES invoices(id)"] * 2


def test_migration_sql_matches_plan(conn, tmp_path):
    apply(conn, tmp_path, option=1)
    text = (tmp_path / "migration.sql").read_text()
    assert text.count("ON DELETE CASCADE NOT VALID;") == 2
    assert text.count("\" VALIDATE CONSTRAINT ") == 2
    assert text.count("SET LOCAL lock_timeout = '100ms';") == 4


@pytest.mark.parametrize("option", [1, 2])
def test_rollback_sql_restores_old_fks(conn, tmp_path, option):
    apply(conn, tmp_path, option=option)
    conn.execute((tmp_path / "rollback.sql").read_text())
    for table in TABLES:
        assert invoice_fks(conn, table) == [(f"{table}_invoice_id_fkey", "invoices", True, "a")]
        assert not_null(conn, table) is True


def hold_lock(incident_db, table, mode="ACCESS SHARE"):
    blocker = psycopg.connect(incident_db)
    blocker.execute(f"LOCK TABLE {table} IN {mode} MODE")
    return blocker


def test_lock_retries_exhausted_names_blocker(conn, incident_db):
    blocker = hold_lock(incident_db, "collection_attempts")
    settings = locks.LockSettings(lock_timeout_ms=20, max_retries=2, backoff_base_ms=10)
    try:
        with pytest.raises(LockRetriesExhausted) as caught:
            apply(conn, option=1, locks=settings)
        blocker_pid = blocker.info.backend_pid
    finally:
        blocker.close()
    assert caught.value.attempts == 3
    assert f"pid {blocker_pid}" in str(caught.value)
    assert invoice_fks(conn, "collection_attempts")[0][1] == "invoices"


def test_lock_retry_logs_each_attempt(conn, incident_db, caplog):
    blocker = hold_lock(incident_db, "collection_attempts")
    settings = locks.LockSettings(lock_timeout_ms=20, max_retries=3, backoff_base_ms=10)
    try:
        with caplog.at_level("WARNING", logger="fkrunbook.locks"):
            with pytest.raises(LockRetriesExhausted):
                apply(conn, option=1, locks=settings)
    finally:
        blocker.close()
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 3


def test_lock_retry_succeeds_after_blocker_ends(conn, incident_db):
    blocker = hold_lock(incident_db, "collection_attempts")
    timer = threading.Timer(0.3, blocker.close)
    timer.start()
    settings = locks.LockSettings(lock_timeout_ms=50, max_retries=20, backoff_base_ms=50,
                                  backoff_max_ms=200)
    applied = apply(conn, option=1, locks=settings)
    timer.join()
    assert applied[0]["attempts"] > 1
    assert invoice_fks(conn, "collection_attempts")[0][1:3] == ("operator_contracts", True)


def test_second_run_stops_on_advisory_lock(conn, incident_db):
    other = psycopg.connect(incident_db, autocommit=True)
    other.execute("SELECT pg_advisory_lock(%s)", [locks.ADVISORY_LOCK_KEY])
    try:
        options = migration.MigrationOptions(option=1)
        plan = migration.plan_migration(conn, options)
        with pytest.raises(ConcurrentRunError, match=f"pid {other.info.backend_pid}"):
            migration.apply_plan(conn, plan, options, None, wait_for_other_run_s=0.3)
    finally:
        other.close()
    assert invoice_fks(conn, "collection_attempts")[0][1] == "invoices"


def test_lock_on_invoices_also_retried(conn, incident_db):
    # Dropping the old FK also locks invoices, so a session reading
    # invoices blocks the DDL step as well.
    blocker = hold_lock(incident_db, "invoices")
    settings = locks.LockSettings(lock_timeout_ms=20, max_retries=1, backoff_base_ms=10)
    try:
        with pytest.raises(LockRetriesExhausted) as caught:
            apply(conn, option=1, locks=settings)
        blocker_pid = blocker.info.backend_pid
    finally:
        blocker.close()
    assert f"pid {blocker_pid}" in str(caught.value)
    assert invoice_fks(conn, "collection_attempts")[0][1] == "invoices"


def test_ddl_step_statement_timeout_is_lock_timeout(conn):
    options = migration.MigrationOptions(option=1, locks=locks.LockSettings(lock_timeout_ms=150))
    text = migration.render_sql(conn, migration.plan_migration(conn, options), options)
    blocks = text.split("\n\n")
    assert "SET LOCAL statement_timeout = '150ms';" in blocks[0]
    assert "SET LOCAL statement_timeout = '1800000ms';" in blocks[-1]


@pytest.mark.parametrize("option", [1, 2])
def test_column_with_fk_elsewhere_rejected(conn, option):
    with pytest.raises(ParameterError, match="collection_attempts_customer_id_fkey"):
        migration.plan_migration(conn, migration.MigrationOptions(
            option=option, tables=("collection_attempts",), column="customer_id"))
    assert not_null(conn, "collection_attempts") is True


def test_tables_as_comma_string(conn):
    plan = migration.plan_migration(conn, migration.MigrationOptions(
        tables="collection_attempts, payment_promises"))
    assert [state.table for state in plan.before] == [
        "public.collection_attempts", "public.payment_promises"]
