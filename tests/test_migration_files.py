"""Tests of the Supabase migration files in sql/migrations.

Each test applies the files to a fresh incident-state database, one file per
transaction, as the Supabase CLI does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "sql" / "migrations"
OPTION1_DIR = MIGRATIONS_DIR / "option1"
OPTION2_DIR = MIGRATIONS_DIR / "option2"
SQUAWK = Path(sys.executable).parent / "squawk"

FK_NAMES = {
    "collection_attempts": "collection_attempts_invoice_id_fkey",
    "payment_promises": "payment_promises_invoice_id_fkey",
}
TABLES = tuple(FK_NAMES)

# Id of contract OC-2025-0043 in sql/seed.sql, which has no invoice with the same id.
CONTRACT_WITHOUT_INVOICE = "2f44c1c9-9c8b-4c76-b56c-527f5242cafd"


def migration_files(option_dir: Path) -> list[Path]:
    """Return an option's migration files in the order Supabase applies them."""
    return sorted(option_dir.glob("*.sql"))


def rollback_step(path: Path) -> int:
    """Return the step number n of a rollback file named ``<migration>.down.<n>.sql``."""
    return int(path.name.split(".")[-2])


def rollback_files(option_dir: Path) -> list[Path]:
    """Return the rollback files that undo an option, in the order to apply them."""
    files = []
    for migration in reversed(migration_files(option_dir)):
        steps = (option_dir / "rollback").glob(f"{migration.stem}.down.*.sql")
        files.extend(sorted(steps, key=rollback_step))
    return files


def all_files(option_dir: Path) -> list[Path]:
    """Return an option's migrations followed by its rollback files."""
    return migration_files(option_dir) + rollback_files(option_dir)


def apply_file(conn: psycopg.Connection, path: Path) -> None:
    """Run one migration file in its own transaction."""
    with conn.transaction():
        conn.execute(path.read_text(encoding="utf-8"))


def apply_files(conn: psycopg.Connection, paths: list[Path]) -> None:
    for path in paths:
        apply_file(conn, path)


def split_statements(text: str) -> list[str]:
    """Split a migration file into its statements.

    This handles only the layout of these files. A statement ends with a line
    that ends in a semicolon outside a $$ body, and comment lines outside a
    statement are skipped.
    """
    statements: list[str] = []
    current: list[str] = []
    in_dollar_body = False
    for line in text.splitlines():
        if not current and (line.startswith("--") or not line.strip()):
            continue
        current.append(line)
        if line.count("$$") % 2 == 1:
            in_dollar_body = not in_dollar_body
        if not in_dollar_body and line.rstrip().endswith(";"):
            statements.append("\n".join(current))
            current = []
    return statements


def has_validate_statement(path: Path) -> bool:
    statements = split_statements(path.read_text(encoding="utf-8"))
    return any("VALIDATE CONSTRAINT" in statement for statement in statements)


def fk_definition(conn: psycopg.Connection, table: str) -> tuple | None:
    """Return (referenced table, convalidated, confdeltype) of a table's invoice_id FK."""
    return conn.execute(
        "SELECT confrelid::regclass::text, convalidated, confdeltype"
        " FROM pg_constraint"
        " WHERE conrelid = %s::regclass AND conname = %s AND contype = 'f'",
        [table, FK_NAMES[table]],
    ).fetchone()


def invoice_id_fk_count(conn: psycopg.Connection, table: str) -> int:
    """Count the FKs of any name that include a table's invoice_id column."""
    return conn.execute(
        "SELECT count(*) FROM pg_constraint c"
        " JOIN pg_attribute a"
        "   ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
        " WHERE c.conrelid = %s::regclass AND c.contype = 'f'"
        "   AND a.attname = 'invoice_id'",
        [table],
    ).fetchone()[0]


def invoice_id_nullable(conn: psycopg.Connection, table: str) -> bool:
    return conn.execute(
        "SELECT NOT attnotnull FROM pg_attribute"
        " WHERE attrelid = %s::regclass AND attname = 'invoice_id'",
        [table],
    ).fetchone()[0]


def constraint_exists(conn: psycopg.Connection, table: str, name: str) -> bool:
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint"
        " WHERE conrelid = %s::regclass AND conname = %s)",
        [table, name],
    ).fetchone()[0]


def schema_state(conn: psycopg.Connection) -> list[tuple]:
    """Return every constraint definition and invoice_id nullability of both tables."""
    constraints = conn.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid),"
        "       convalidated"
        " FROM pg_constraint WHERE conrelid = ANY (%s::regclass[])"
        " ORDER BY 1, 2",
        [list(TABLES)],
    ).fetchall()
    nullability = [(table, invoice_id_nullable(conn, table)) for table in TABLES]
    return constraints + nullability


def insert_attempt(conn: psycopg.Connection, invoice_id: str | None) -> int:
    """Insert a collection_attempts row for contract 43's customer and return the row count."""
    return conn.execute(
        "INSERT INTO collection_attempts"
        "   (customer_id, invoice_id, collector_id, channel, status)"
        " SELECT customer_id, %s::uuid, gen_random_uuid(), 'whatsapp', 'sent'"
        " FROM operator_contracts WHERE id = %s",
        [invoice_id, CONTRACT_WITHOUT_INVOICE],
    ).rowcount


def sql_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.rglob("*.sql"))


# Linting and file layout.


def test_squawk_passes_all_files():
    files = sql_files()
    assert files, f"no .sql files under {MIGRATIONS_DIR}"
    result = subprocess.run(
        [str(SQUAWK), "--pg-version=15", "--assume-in-transaction",
         "--reporter=gcc", *map(str, files)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, (
        f"squawk exited with {result.returncode}:\n{result.stdout}{result.stderr}"
    )


@pytest.mark.parametrize("path", sql_files(), ids=lambda path: path.name)
def test_file_starts_with_timeouts(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    expected_timeout = "30min" if has_validate_statement(path) else "5s"
    assert lines[0] == "SET LOCAL lock_timeout = '100ms';"
    assert lines[1] == f"SET LOCAL statement_timeout = '{expected_timeout}';"


@pytest.mark.parametrize("option_dir", [OPTION1_DIR, OPTION2_DIR],
                         ids=["option1", "option2"])
def test_every_migration_has_rollback(option_dir):
    for migration in migration_files(option_dir):
        steps = list((option_dir / "rollback").glob(f"{migration.stem}.down.*.sql"))
        assert steps, f"no rollback file for {migration.name}"


# The incident before any fix.


def test_incident_rejects_contract_id(conn):
    with pytest.raises(errors.ForeignKeyViolation):
        insert_attempt(conn, CONTRACT_WITHOUT_INVOICE)


# Option 1: re-point both FKs to operator_contracts.


@pytest.mark.parametrize("table", TABLES)
def test_option1_repoints_fk(conn, table):
    apply_files(conn, migration_files(OPTION1_DIR))
    referenced, validated, delete_action = fk_definition(conn, table)
    assert referenced == "operator_contracts"
    assert validated is True
    assert delete_action == "c"


@pytest.mark.parametrize("table", TABLES)
def test_option1_phase_a_not_valid(conn, table):
    apply_file(conn, migration_files(OPTION1_DIR)[0])
    referenced, validated, _ = fk_definition(conn, table)
    assert referenced == "operator_contracts"
    assert validated is False


def test_option1_accepts_contract_id(conn):
    apply_files(conn, migration_files(OPTION1_DIR))
    assert insert_attempt(conn, CONTRACT_WITHOUT_INVOICE) == 1


def test_option1_phase_a_times_out_behind_reader(conn, incident_db):
    phase_a = migration_files(OPTION1_DIR)[0]
    with psycopg.connect(incident_db) as reader:
        # A long-running SELECT keeps its ACCESS SHARE lock until its transaction ends.
        reader.execute("LOCK TABLE collection_attempts IN ACCESS SHARE MODE")
        with pytest.raises(errors.LockNotAvailable):
            apply_file(conn, phase_a)
        reader.rollback()
    referenced, _, _ = fk_definition(conn, "collection_attempts")
    assert referenced == "invoices"


def test_option1_phase_b_allows_inserts(conn, incident_db):
    phase_a, phase_b = migration_files(OPTION1_DIR)
    apply_file(conn, phase_a)
    with psycopg.connect(incident_db) as validator:
        # The validator's transaction stays open, so its locks stay held.
        validator.execute(phase_b.read_text(encoding="utf-8"))
        conn.execute("SET lock_timeout = '1s'")
        inserted = insert_attempt(conn, CONTRACT_WITHOUT_INVOICE)
        validator.rollback()
    assert inserted == 1


def test_option1_outside_transaction_raises(conn):
    phase_a = migration_files(OPTION1_DIR)[0]
    statements = split_statements(phase_a.read_text(encoding="utf-8"))
    expected = "lock_timeout is 0, not 100ms, so this file runs outside a transaction block"
    with pytest.raises(errors.RaiseException, match=expected):
        for statement in statements:
            conn.execute(statement)
    referenced, _, _ = fk_definition(conn, "collection_attempts")
    assert referenced == "invoices"


@pytest.mark.parametrize("table", TABLES)
def test_option1_rollback_restores_invoices_fk(conn, table):
    apply_files(conn, migration_files(OPTION1_DIR))
    insert_attempt(conn, CONTRACT_WITHOUT_INVOICE)
    apply_files(conn, rollback_files(OPTION1_DIR))
    referenced, validated, delete_action = fk_definition(conn, table)
    assert referenced == "invoices"
    assert validated is False
    assert delete_action == "a"


def test_option1_rollback_fk_fails_validation(conn):
    apply_files(conn, migration_files(OPTION1_DIR))
    insert_attempt(conn, CONTRACT_WITHOUT_INVOICE)
    apply_files(conn, rollback_files(OPTION1_DIR))
    with pytest.raises(errors.ForeignKeyViolation):
        conn.execute("ALTER TABLE collection_attempts"
                     " VALIDATE CONSTRAINT collection_attempts_invoice_id_fkey")


def test_option1_rollback_rejects_contract_id(conn):
    apply_files(conn, all_files(OPTION1_DIR))
    with pytest.raises(errors.ForeignKeyViolation):
        insert_attempt(conn, CONTRACT_WITHOUT_INVOICE)


# Option 2: drop NOT NULL and the FK.


@pytest.mark.parametrize("table", TABLES)
def test_option2_drops_fk_and_not_null(conn, table):
    apply_files(conn, migration_files(OPTION2_DIR))
    assert invoice_id_fk_count(conn, table) == 0
    assert invoice_id_nullable(conn, table) is True


def test_option2_accepts_contract_id(conn):
    apply_files(conn, migration_files(OPTION2_DIR))
    assert insert_attempt(conn, CONTRACT_WITHOUT_INVOICE) == 1


def test_option2_accepts_null(conn):
    apply_files(conn, migration_files(OPTION2_DIR))
    assert insert_attempt(conn, None) == 1


@pytest.mark.parametrize("table", TABLES)
def test_option2_rollback_restores(conn, table):
    apply_files(conn, all_files(OPTION2_DIR))
    referenced, validated, delete_action = fk_definition(conn, table)
    assert referenced == "invoices"
    assert validated is True
    assert delete_action == "a"
    assert invoice_id_nullable(conn, table) is False
    assert not constraint_exists(conn, table, f"{table}_invoice_id_not_null_check")


@pytest.mark.parametrize("table", TABLES)
def test_option2_rollback_set_not_null_skips_scan(conn, table):
    step1, step2, step3, _ = rollback_files(OPTION2_DIR)
    apply_files(conn, migration_files(OPTION2_DIR) + [step1, step2])
    messages = []
    conn.add_notice_handler(lambda notice: messages.append(notice.message_primary))
    conn.execute("SET client_min_messages = debug1")
    apply_file(conn, step3)
    conn.execute("RESET client_min_messages")
    expected = (f'existing constraints on column "{table}.invoice_id" are'
                f" sufficient to prove that it does not contain nulls")
    assert expected in messages, f"PostgreSQL debug messages: {messages}"


def test_option2_rollback_rejects_nulls(conn):
    step1, step2, _, _ = rollback_files(OPTION2_DIR)
    apply_files(conn, migration_files(OPTION2_DIR))
    insert_attempt(conn, None)
    apply_file(conn, step1)
    with pytest.raises(errors.CheckViolation):
        apply_file(conn, step2)
    assert invoice_id_nullable(conn, "collection_attempts") is True


def test_option2_rollback_fk_fails_validation(conn):
    step1, step2, step3, step4 = rollback_files(OPTION2_DIR)
    apply_files(conn, migration_files(OPTION2_DIR))
    insert_attempt(conn, CONTRACT_WITHOUT_INVOICE)
    apply_files(conn, [step1, step2, step3])
    with pytest.raises(errors.ForeignKeyViolation):
        apply_file(conn, step4)
    _, validated, _ = fk_definition(conn, "collection_attempts")
    assert validated is False


# Re-running a file.


def rerun_cases() -> list:
    """Return (files applied first, file applied twice) for every file of both options."""
    cases = []
    for option_dir in (OPTION1_DIR, OPTION2_DIR):
        files = all_files(option_dir)
        for index, path in enumerate(files):
            cases.append(pytest.param(
                files[:index], path, id=f"{option_dir.name}/{path.name}"))
    return cases


@pytest.mark.parametrize(("earlier_files", "path"), rerun_cases())
def test_file_twice_changes_nothing(conn, earlier_files, path):
    apply_files(conn, earlier_files)
    apply_file(conn, path)
    state_after_first_run = schema_state(conn)
    apply_file(conn, path)
    assert schema_state(conn) == state_after_first_run
