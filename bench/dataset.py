"""Build the benchmark's template database and copy it for each scenario.

The template is the incident fixture with collection_attempts grown to the
requested row count and payment_promises grown in proportion. Every added
row references a single-instalment contract: its id is both an invoices id
and an operator_contracts id, so the rows are valid under the old and the
new foreign key and the migration's pre-flight finds nothing to remap.
"""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg import sql

from fkrunbook import demo

logger = logging.getLogger("bench.dataset")

TEMPLATE_DATABASE = "bench_template"
GROWN_TABLES = ("collection_attempts", "payment_promises")
LOAD_CHUNK_ROWS = 1_000_000

# The seed gives every single-instalment contract one invoice with the
# contract's own id, so these ids are valid under both foreign keys.
DUAL_VALID_CONTRACTS = """
SELECT c.id::text, c.customer_id::text, c.contract_number
FROM operator_contracts c
JOIN invoices i ON i.id = c.id
ORDER BY c.contract_number
"""

_VALID_ARRAYS = """
(SELECT array_agg(c.id ORDER BY c.contract_number) AS ids,
        array_agg(c.customer_id ORDER BY c.contract_number) AS customers,
        count(*)::int AS n
 FROM operator_contracts c JOIN invoices i ON i.id = c.id) AS v
"""

INSERT_ATTEMPTS = sql.SQL("""
INSERT INTO collection_attempts
    (customer_id, invoice_id, collector_id, channel, status, notes, created_at)
SELECT v.customers[1 + g %% v.n],
       v.ids[1 + g %% v.n],
       md5('collector:' || (1 + g %% 3))::uuid,
       (ARRAY['whatsapp', 'telefone', 'email', 'sms'])[1 + (g / 7) %% 4]::collection_channel,
       (ARRAY['sent', 'delivered', 'read', 'replied'])[1 + (g / 3) %% 4]::attempt_status,
       'Synthetic attempt ' || g,
       timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'
FROM {valid}, generate_series(%(first)s::bigint, %(last)s::bigint) AS g
""").format(valid=sql.SQL(_VALID_ARRAYS))

INSERT_PROMISES = sql.SQL("""
INSERT INTO payment_promises
    (invoice_id, collector_id, promised_date, promised_amount, status, created_at)
SELECT v.ids[1 + g %% v.n],
       md5('collector:' || (1 + g %% 3))::uuid,
       date '2026-12-01' + (g %% 365)::int,
       150.00 + (g %% 100) * 10,
       (ARRAY['pending', 'kept', 'broken'])[1 + g %% 3],
       timestamptz '2026-01-01 00:00:00+00' + g * interval '4 seconds'
FROM {valid}, generate_series(%(first)s::bigint, %(last)s::bigint) AS g
""").format(valid=sql.SQL(_VALID_ARRAYS))

# Primary keys and foreign keys of a table, recreated after the load.
_TABLE_CONSTRAINTS = """
SELECT conname, contype, pg_get_constraintdef(oid)
FROM pg_constraint
WHERE conrelid = %s::regclass AND contype IN ('p', 'f')
ORDER BY contype DESC, conname
"""

# Indexes that do not belong to a constraint, recreated after the load.
_TABLE_INDEXES = """
SELECT ic.relname, pg_get_indexdef(i.indexrelid)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = %s::regclass
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                  WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid)
ORDER BY ic.relname
"""


def dual_valid_contracts(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """Return (contract id, customer id, contract number) valid under both FKs."""
    return conn.execute(DUAL_VALID_CONTRACTS).fetchall()


def _table_definitions(conn: psycopg.Connection, table: str) -> dict:
    return {
        "constraints": conn.execute(_TABLE_CONSTRAINTS, [table]).fetchall(),
        "indexes": conn.execute(_TABLE_INDEXES, [table]).fetchall(),
    }


def _drop_keys_and_indexes(conn: psycopg.Connection, table: str, definitions: dict) -> None:
    # Foreign keys go first, so the order also works for a referenced table.
    for name, kind, _ in sorted(definitions["constraints"], key=lambda c: c[1] != "f"):
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            sql.Identifier(table), sql.Identifier(name)))
    for name, _ in definitions["indexes"]:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))


def _recreate_keys_and_indexes(conn: psycopg.Connection, table: str,
                               definitions: dict) -> None:
    primary = [c for c in definitions["constraints"] if c[1] == "p"]
    foreign = [c for c in definitions["constraints"] if c[1] == "f"]
    for name, _, definition in primary:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            sql.Identifier(table), sql.Identifier(name), sql.SQL(definition)))
    for _, definition in definitions["indexes"]:
        conn.execute(definition)
    # ADD CONSTRAINT without NOT VALID checks every loaded row.
    for name, _, definition in foreign:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            sql.Identifier(table), sql.Identifier(name), sql.SQL(definition)))


def _insert_in_chunks(conn: psycopg.Connection, query: sql.Composed, table: str,
                      rows: int) -> None:
    first = 1
    started = time.perf_counter()
    while first <= rows:
        last = min(rows, first + LOAD_CHUNK_ROWS - 1)
        conn.execute(query, {"first": first, "last": last})
        elapsed = time.perf_counter() - started
        logger.info("%s: %d of %d rows inserted (%.1f s)", table, last, rows, elapsed)
        first = last + 1


def grow_table(conn: psycopg.Connection, table: str, query: sql.Composed,
               target_rows: int) -> dict:
    """Grow ``table`` to ``target_rows`` rows and return the timings.

    The primary key, the foreign keys and the other indexes are dropped
    before the load and recreated from their catalog definitions after it,
    as pg_restore does, because building an index once is faster than
    updating it row by row. Raises ``RuntimeError`` if a definition differs
    after the rebuild.
    """
    present = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
        sql.Identifier(table))).fetchone()[0]
    to_insert = max(0, target_rows - present)
    definitions = _table_definitions(conn, table)
    started = time.perf_counter()
    with conn.transaction():
        _drop_keys_and_indexes(conn, table, definitions)
    _insert_in_chunks(conn, query, table, to_insert)
    inserted = time.perf_counter()
    with conn.transaction():
        _recreate_keys_and_indexes(conn, table, definitions)
    rebuilt = time.perf_counter()
    if _table_definitions(conn, table) != definitions:
        raise RuntimeError(
            f"{table}: constraints or indexes differ after the bulk load; "
            f"expected {definitions}, found {_table_definitions(conn, table)}")
    return {"rows": present + to_insert, "inserted": to_insert,
            "insert_s": round(inserted - started, 3),
            "rebuild_s": round(rebuilt - inserted, 3)}


def build_template(server, rows: int, promise_ratio: float) -> dict:
    """Create the template database with ``rows`` attempts and return the load figures."""
    conninfo = demo.create_database(server, TEMPLATE_DATABASE)
    started = time.perf_counter()
    with psycopg.connect(conninfo, autocommit=True,
                         application_name="bench-loader") as conn:
        demo.load_fixture(conn)
        conn.execute("SET maintenance_work_mem = '256MB'")
        attempts = grow_table(conn, "collection_attempts", INSERT_ATTEMPTS, rows)
        promises = grow_table(conn, "payment_promises", INSERT_PROMISES,
                              max(1, round(rows * promise_ratio)))
        # pg_prewarm lives in its own schema, so public keeps the fixture's objects only.
        conn.execute("CREATE SCHEMA bench")
        conn.execute("CREATE EXTENSION pg_prewarm SCHEMA bench")
        vacuum_started = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        vacuum_s = time.perf_counter() - vacuum_started
        sizes = dict(conn.execute(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class"
            " WHERE relname = ANY(%s)", [list(GROWN_TABLES)]).fetchall())
    figures = {
        "collection_attempts": {**attempts, "total_bytes": sizes["collection_attempts"]},
        "payment_promises": {**promises, "total_bytes": sizes["payment_promises"]},
        "vacuum_analyze_s": round(vacuum_s, 3),
        "total_s": round(time.perf_counter() - started, 3),
    }
    logger.info("template ready: %s", figures)
    return figures


def _sessions_on(admin: psycopg.Connection, dbname: str) -> list[tuple]:
    # Autovacuum workers are left out, because CREATE DATABASE signals them to exit.
    return admin.execute(
        "SELECT pid, application_name, state FROM pg_stat_activity"
        " WHERE datname = %s AND backend_type = 'client backend'",
        [dbname]).fetchall()


def freeze_template(server, template: str) -> None:
    """Mark ``template`` as a template that accepts no new connection."""
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true"
                              " ALLOW_CONNECTIONS false").format(sql.Identifier(template)))


def copy_database(server, template: str, dbname: str) -> str:
    """Create ``dbname`` as a file copy of ``template`` and return its conninfo.

    Raises ``RuntimeError`` naming the sessions still connected to the
    template, because CREATE DATABASE fails while any is.
    """
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        sessions = _sessions_on(admin, template)
        if sessions:
            raise RuntimeError(
                f"cannot copy {template!r}: session(s) {sessions} are still "
                f"connected to it; close them before copying.")
        # FILE_COPY copies the data files after a checkpoint. The default
        # WAL_LOG strategy would write the whole database to the WAL.
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
            sql.Identifier(dbname), sql.Identifier(template)))
        admin.execute("CHECKPOINT")
    return demo.database_conninfo(server, dbname)


# Largest first, so the small tables and indexes every insert touches are
# the ones left in shared_buffers when the tables do not fit.
_PREWARM = """
SELECT c.oid::regclass::text, bench.pg_prewarm(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i')
ORDER BY pg_relation_size(c.oid) DESC, c.relname
"""


def prewarm(conninfo: str) -> int:
    """Read every table and index of ``public`` into shared_buffers.

    A fresh copy starts with none of its blocks in shared_buffers. Reading
    them first gives every scenario the same starting cache, whichever
    migration scans the table first. Returns the number of blocks read.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return sum(blocks for _, blocks in conn.execute(_PREWARM).fetchall())


def drop_database(server, dbname: str) -> None:
    """Drop ``dbname``, ending any session still connected to it."""
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(dbname)))
