"""The runbook on Debian's PostgreSQL 15 with password authentication.

The inspection must return the same results as on the embedded PostgreSQL 18,
the chain must apply the fix, and no output file may contain the password.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

import pg15
from fkrunbook import catalog, chain, connection, demo, inspection, locks, migration, rollback
from fkrunbook.errors import TargetError

pytestmark = pytest.mark.pg15

FK_QUERY = """
SELECT conrelid::regclass::text, confrelid::regclass::text, convalidated, confdeltype
FROM pg_constraint
WHERE contype = 'f' AND conname IN ('collection_attempts_invoice_id_fkey',
                                    'payment_promises_invoice_id_fkey')
ORDER BY 1
"""

NOT_NULL_QUERY = """
SELECT attrelid::regclass::text, attnotnull FROM pg_attribute
WHERE attname = 'invoice_id'
  AND attrelid IN ('collection_attempts'::regclass, 'payment_promises'::regclass)
ORDER BY 1
"""

FIX_TABLES = ("collection_attempts", "payment_promises")


@pytest.fixture(scope="module")
def server():
    reason = pg15.binaries_missing()
    if reason:
        pytest.skip(f"PostgreSQL 15 server not available: {reason}")
    running = pg15.start()
    yield running
    pg15.stop(running)


@pytest.fixture
def database(server):
    """URL (with the password) of a new database on 15 holding the fixture."""
    name = f"p_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        demo.load_fixture(conn)
    yield url
    server.drop_database(name)


@pytest.fixture
def clean_environment(monkeypatch):
    """Remove every variable that chooses a target, so a test sets its own."""
    for name in ("DATABASE_URL", "PGPASSWORD", connection.DEMO_URL_VARIABLE,
                 *connection.TARGET_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def dbname(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]


def fks(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(FK_QUERY).fetchall()


def not_null_flags(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(NOT_NULL_QUERY).fetchall()


def password_occurrences(folder: Path, password: str) -> dict[str, int]:
    """Count ``password`` in every file under ``folder``, by relative path."""
    needle = password.encode()
    counts = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            found = path.read_bytes().count(needle)
            if found:
                counts[str(path.relative_to(folder))] = found
    return counts


def written_notebooks(folder: Path) -> list[str]:
    """Return the notebooks with both an executed .ipynb and its .html in ``folder``."""
    return sorted(path.stem for path in folder.glob("*.ipynb")
                  if path.with_suffix(".html").exists())


def fkrunbook_cli(*args, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "PGPASSWORD", connection.DEMO_URL_VARIABLE)
            and k not in connection.TARGET_VARIABLES}
    return subprocess.run([sys.executable, "-m", "fkrunbook", *args],
                          env=base | env, capture_output=True, text=True,
                          timeout=300)


def inspection_answers(conn: psycopg.Connection) -> dict:
    """Collect what inspect and migrate read from the catalog and the data."""
    tables = catalog.resolve_tables(conn, list(FIX_TABLES))
    invoices = catalog.resolve_table(conn, "invoices")
    contracts = catalog.resolve_table(conn, "operator_contracts")
    answers = {
        "foreign_keys": inspection.list_foreign_keys(
            conn, tables, [invoices, contracts]).to_dict("records"),
        "row_counts": inspection.count_rows(conn, tables).to_dict("records"),
        "cascade_impact": inspection.cascade_impact(
            conn, tables, "invoice_id").to_dict("records"),
    }
    for table in tables:
        breaking = inspection.find_breaking_rows(conn, table, "invoice_id")
        answers[table.name] = {
            "provenance": inspection.key_provenance(
                conn, table, "invoice_id").to_dict("records"),
            "breaking": (breaking.total, breaking.remappable,
                         breaking.sample.to_dict("records")),
            "column_state": migration.read_column_state(
                conn, table, "invoice_id").as_dict(),
        }
    return answers


def plan_descriptions(conn: psycopg.Connection, option: int) -> list[tuple]:
    plan = migration.plan_migration(conn, migration.MigrationOptions(option=option))
    return [(step.kind, step.description, step.lock) for step in plan.steps]


def not_null_constraint_count(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'n'"
        " AND conrelid = 'collection_attempts'::regclass").fetchone()[0]


def test_server_is_version_15_with_password(server, database):
    with psycopg.connect(database) as conn:
        assert conn.info.server_version // 10000 == 15
        method = conn.execute(
            "SELECT DISTINCT auth_method FROM pg_hba_file_rules"
            " WHERE type IN ('local', 'host')").fetchall()
    assert method == [("scram-sha-256",)]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(server.url(dbname(database), password="wrong"))


def test_not_null_constraints_absent_on_15(database, conn):
    with psycopg.connect(database) as conn15:
        assert not_null_constraint_count(conn15) == 0
    # PostgreSQL 18 stores NOT NULL as contype 'n', and the queries filter 'f'.
    assert not_null_constraint_count(conn) > 0


def test_inspection_matches_embedded_18(database, conn):
    with psycopg.connect(database, autocommit=True) as conn15:
        answers15 = inspection_answers(conn15)
    answers18 = inspection_answers(conn)
    assert answers15.keys() == answers18.keys()
    for name in answers18:
        assert answers15[name] == answers18[name], name


def test_plans_match_embedded_18(database, conn):
    with psycopg.connect(database, autocommit=True) as conn15:
        for option in (1, 2):
            assert plan_descriptions(conn15, option) == plan_descriptions(conn, option)


def apply_option(conn: psycopg.Connection, option: int, folder: Path) -> None:
    options = migration.MigrationOptions(option=option)
    plan = migration.plan_migration(conn, options)
    migration.apply_plan(conn, plan, options, output_dir=folder)


def comparison_records(conn: psycopg.Connection, folder: Path) -> list[dict]:
    saved = rollback.load_saved_state(conn, folder)
    return rollback.compare_with_saved(conn, saved).to_dict("records")


@pytest.mark.parametrize("option", [1, 2])
def test_rollback_matches_embedded_18(database, conn, tmp_path, option):
    with psycopg.connect(database, autocommit=True) as conn15:
        apply_option(conn15, option, tmp_path / "15")
        apply_option(conn, option, tmp_path / "18")
        assert (comparison_records(conn15, tmp_path / "15")
                == comparison_records(conn, tmp_path / "18"))

        for target, folder in ((conn15, tmp_path / "15"), (conn, tmp_path / "18")):
            saved = rollback.load_saved_state(target, folder)
            plan = rollback.plan_restore(target, saved)
            rollback.run_restore(target, plan, locks.LockSettings(), "apply")
            assert rollback.is_restored(rollback.compare_with_saved(target, saved))
        assert inspection_answers(conn15) == inspection_answers(conn)


def test_chain_with_url_password_leaves_no_password(server, database, tmp_path,
                                                    clean_environment):
    clean_environment.setenv("DATABASE_URL", database)
    result = chain.run_chain(option=1, confirm=dbname(database),
                             output_root=tmp_path, progress=lambda line: None)
    assert result.summary["checks_passed"] is True
    assert fks(database) == [
        ("collection_attempts", "operator_contracts", True, "c"),
        ("payment_promises", "operator_contracts", True, "c")]
    assert written_notebooks(result.output_dir) == list(chain.NOTEBOOKS)
    assert len(list(result.output_dir.glob("results/*.json"))) >= len(chain.NOTEBOOKS)
    assert password_occurrences(tmp_path, server.password) == {}


def test_chain_with_pgpassword_leaves_no_password(server, database, tmp_path,
                                                  clean_environment):
    clean_environment.setenv("PGHOST", server.host)
    clean_environment.setenv("PGPORT", str(server.port))
    clean_environment.setenv("PGUSER", server.user)
    clean_environment.setenv("PGDATABASE", dbname(database))
    clean_environment.setenv("PGPASSWORD", server.password)
    result = chain.run_chain(option=2, confirm=dbname(database),
                             output_root=tmp_path, progress=lambda line: None)
    assert result.summary["checks_passed"] is True
    assert fks(database) == []
    assert not_null_flags(database) == [("collection_attempts", False),
                                        ("payment_promises", False)]
    assert written_notebooks(result.output_dir) == list(chain.NOTEBOOKS)
    assert password_occurrences(tmp_path, server.password) == {}


def test_cli_wrong_password_says_authentication_failed(server, database, tmp_path):
    wrong = f"wrong-{uuid.uuid4().hex}"
    url = server.url(dbname(database), password=wrong)
    result = fkrunbook_cli("chain", "--output-root", str(tmp_path),
                           "--confirm", dbname(database), env={"DATABASE_URL": url})
    assert result.returncode == 2
    assert "password authentication failed" in result.stderr
    assert f"{server.user}@127.0.0.1:{server.port}/{dbname(database)}" in result.stderr
    assert "Traceback" not in result.stderr
    assert wrong not in result.stderr + result.stdout
    assert server.password not in result.stderr + result.stdout
    assert password_occurrences(tmp_path, wrong) == {}
    assert fks(database)[0][1] == "invoices"


def test_cli_wrong_pgpassword_on_socket_hides_it(server, database, tmp_path):
    wrong = f"wrong-{uuid.uuid4().hex}"
    env = {"PGHOST": str(server.socket_dir), "PGPORT": str(server.port),
           "PGUSER": server.user, "PGDATABASE": dbname(database),
           "PGPASSWORD": wrong}
    result = fkrunbook_cli("chain", "--output-root", str(tmp_path), env=env)
    assert result.returncode == 2
    assert "password authentication failed" in result.stderr
    assert "Traceback" not in result.stderr
    assert wrong not in result.stderr + result.stdout
    assert password_occurrences(tmp_path, wrong) == {}


def test_cli_missing_database_is_named(server, tmp_path):
    url = server.url("no_such_database")
    result = fkrunbook_cli("chain", "--output-root", str(tmp_path),
                           env={"DATABASE_URL": url})
    assert result.returncode == 2
    assert 'database "no_such_database" does not exist' in result.stderr
    assert "Traceback" not in result.stderr
    assert server.password not in result.stderr + result.stdout
    assert password_occurrences(tmp_path, server.password) == {}


MALFORMED_TARGETS = {
    "bad-percent-escape": ("postgresql://{user}:pw%zz{secret}@127.0.0.1:{port}/postgres",
                           "is invalid"),
    "unclosed-ipv6": ("postgresql://{user}:{secret}@[::1/postgres", "is invalid"),
    "unknown-query-parameter": (
        "postgresql://{user}:{secret}@127.0.0.1:{port}/postgres?colour=blue",
        "is invalid"),
    "unterminated-quote": ("host=127.0.0.1 port={port} password='{secret}", "is invalid"),
    "wrong-password": ("postgresql://{user}:{secret}@127.0.0.1:{port}/postgres",
                       "password authentication failed"),
    "wrong-keyword-password": (
        "host=127.0.0.1 port={port} user={user} password={secret} dbname=postgres",
        "did not accept the login"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_TARGETS))
def test_connect_error_hides_password(server, clean_environment, name):
    template, expected = MALFORMED_TARGETS[name]
    secret = f"Malformed-{uuid.uuid4().hex[:10]}"
    conninfo = template.format(user=server.user, secret=secret, port=server.port)
    target = connection.Target(conninfo, is_demo=False, source="DATABASE_URL")
    with pytest.raises(TargetError) as caught:
        connection.connect(target, connect_timeout=5)
    message = str(caught.value)
    assert expected in message
    assert secret not in message
    assert "\n" not in message
