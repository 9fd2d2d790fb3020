"""The command line, run as on-call runs it, in a subprocess."""

import os
import subprocess
import sys
import uuid

import psycopg
import pytest

from fkrunbook import connection, demo


def fkrunbook(*args, env=None, cwd=None):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("DATABASE_URL", connection.DEMO_URL_VARIABLE)
             and k not in connection.TARGET_VARIABLES}
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "fkrunbook", *args], env=clean,
                          capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture
def empty_db(pg_server):
    name = f"e_{uuid.uuid4().hex[:12]}"
    conninfo = demo.create_database(pg_server, name)
    yield name, conninfo
    demo.drop_database(pg_server, name)


def test_unknown_option_exits_with_usage():
    result = fkrunbook("chain", "--option", "3")
    assert result.returncode == 2
    assert "invalid choice: 3" in result.stderr


def test_load_fixture_without_target_explains():
    result = fkrunbook("load-fixture", "--confirm", "x")
    assert result.returncode == 2
    assert "needs a target database" in result.stderr
    assert "Traceback" not in result.stderr


def test_load_fixture_wrong_confirm_changes_nothing(empty_db):
    name, conninfo = empty_db
    result = fkrunbook("load-fixture", "--confirm", "production",
                       env={"DATABASE_URL": conninfo})
    assert result.returncode == 2
    assert f"not the target database '{name}'" in result.stderr
    with psycopg.connect(conninfo) as conn:
        assert demo.existing_fixture_tables(conn) == []


def test_load_fixture_loads_scratch_database(empty_db):
    name, conninfo = empty_db
    result = fkrunbook("load-fixture", "--confirm", name, env={"DATABASE_URL": conninfo})
    assert result.returncode == 0, result.stderr
    assert "collection_attempts 120" in result.stdout


def test_load_fixture_refuses_existing_tables(incident_db):
    with psycopg.connect(incident_db) as conn:
        name = conn.info.dbname
    result = fkrunbook("load-fixture", "--confirm", name, env={"DATABASE_URL": incident_db})
    assert result.returncode == 2
    assert "already has table(s)" in result.stderr


def test_chain_unreachable_server_stops_first(tmp_path):
    url = "postgresql://oncall:hunter2-secret@127.0.0.1:1/collections"
    result = fkrunbook("chain", "--output-root", str(tmp_path), env={"DATABASE_URL": url})
    assert result.returncode == 2
    assert "Could not connect to oncall@127.0.0.1:1/collections" in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_chain_without_target_refuses_demo(tmp_path):
    result = fkrunbook("chain", "--confirm", "collections", "--output-root", str(tmp_path))
    assert result.returncode == 2
    assert "No target database is set" in result.stderr
    assert "--demo" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_chain_wrong_confirm_stops_before_notebooks(incident_db, tmp_path):
    result = fkrunbook("chain", "--confirm", "production", "--output-root", str(tmp_path),
                       env={"DATABASE_URL": incident_db})
    assert result.returncode == 2
    assert "confirm is 'production', not the target database" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_chain_recover_needs_export_against_target(incident_db, tmp_path):
    result = fkrunbook("chain", "--recover", "--output-root", str(tmp_path),
                       env={"DATABASE_URL": incident_db})
    assert result.returncode == 2
    assert "--recover against a target needs --log-export" in result.stderr


def test_chain_names_target_before_running(incident_db, tmp_path):
    result = fkrunbook("chain", "--output-root", str(tmp_path),
                       env={"DATABASE_URL": incident_db})
    first = result.stdout.splitlines()[0]
    assert result.returncode == 0, result.stderr
    assert first.startswith("Target: postgres@")
    assert "dry run: nothing is changed" in first
    assert "[IPKernelApp]" not in result.stderr
