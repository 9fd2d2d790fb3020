"""Inspect the constraints and the data before choosing a fix."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import psycopg
from psycopg import sql

from .catalog import REFERENCED_CONTRACTS, REFERENCED_INVOICES, Table, resolve_table
from .paths import read_sql

PROVENANCE_ORDER = ("operator_contracts", "both", "invoices", "neither", "null")


def list_foreign_keys(conn: psycopg.Connection, tables: list[Table],
                      referenced: list[Table]) -> pd.DataFrame:
    """Return the FKs on ``tables`` and every FK pointing at ``referenced``."""
    rows = conn.execute(
        read_sql("queries/foreign_keys.sql"),
        {"tables": [t.qualified for t in tables],
         "referenced": [t.qualified for t in referenced]},
    ).fetchall()
    columns = ["constraint_name", "table_name", "columns", "referenced_table",
               "definition", "validated", "on_delete", "deferrable",
               "initially_deferred", "column_indexed"]
    return pd.DataFrame(rows, columns=columns)


def count_rows(conn: psycopg.Connection, tables: list[Table]) -> pd.DataFrame:
    """Return the exact row count of each table."""
    rows = []
    for table in tables:
        query = sql.SQL("SELECT count(*) FROM {}").format(table.identifier)
        rows.append((table.qualified, conn.execute(query).fetchone()[0]))
    return pd.DataFrame(rows, columns=["table_name", "rows"])


def _reference_tables(conn: psycopg.Connection, schema: str) -> tuple[Table, Table]:
    return (resolve_table(conn, REFERENCED_INVOICES, schema),
            resolve_table(conn, REFERENCED_CONTRACTS, schema))


def key_provenance(conn: psycopg.Connection, table: Table, column: str) -> pd.DataFrame:
    """Count the values of ``table.column`` by where they are found.

    One pass with two left joins on the primary keys of invoices and
    operator_contracts; no per-row lookups.
    """
    invoices, contracts = _reference_tables(conn, table.schema)
    query = sql.SQL(
        "SELECT CASE WHEN t.{col} IS NULL THEN 'null'"
        " WHEN i.id IS NOT NULL AND c.id IS NOT NULL THEN 'both'"
        " WHEN i.id IS NOT NULL THEN 'invoices'"
        " WHEN c.id IS NOT NULL THEN 'operator_contracts'"
        " ELSE 'neither' END AS found_in, count(*) AS rows"
        " FROM {tbl} t"
        " LEFT JOIN {inv} i ON i.id = t.{col}"
        " LEFT JOIN {con} c ON c.id = t.{col}"
        " GROUP BY 1"
    ).format(col=sql.Identifier(column), tbl=table.identifier,
             inv=invoices.identifier, con=contracts.identifier)
    counts = dict(conn.execute(query).fetchall())
    rows = [(table.qualified, found_in, counts.get(found_in, 0))
            for found_in in PROVENANCE_ORDER]
    return pd.DataFrame(rows, columns=["table_name", "found_in", "rows"])


def breaking_rows_query(table: Table, column: str, invoices: Table,
                        contracts: Table) -> sql.Composed:
    """Return a query for rows whose value is not an operator_contracts id.

    ``remap_to`` is the contract of the invoice the value names, when the
    value is an invoice id whose invoice has a contract.
    """
    return sql.SQL(
        "SELECT t.ctid::text AS row_ctid, t.{col}::text AS value,"
        " inv.contract_id::text AS remap_to"
        " FROM {tbl} t"
        " LEFT JOIN {inv} inv ON inv.id = t.{col}"
        " WHERE t.{col} IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM {con} c WHERE c.id = t.{col})"
    ).format(col=sql.Identifier(column), tbl=table.identifier,
             inv=invoices.identifier, con=contracts.identifier)


@dataclass
class BreakingRows:
    """Rows of one table that the FK to operator_contracts would reject."""

    table: str
    total: int
    remappable: int
    sample: pd.DataFrame = field(repr=False)

    @property
    def unremappable(self) -> int:
        return self.total - self.remappable


def find_breaking_rows(conn: psycopg.Connection, table: Table, column: str,
                       sample_size: int = 20) -> BreakingRows:
    """Count and sample the rows that would make VALIDATE CONSTRAINT fail."""
    invoices, contracts = _reference_tables(conn, table.schema)
    base = breaking_rows_query(table, column, invoices, contracts)
    rows = []
    with conn.transaction():
        # Parallel workers would compete with the app's inserts for the
        # same cores while this runs on a live database.
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        total, remappable = conn.execute(
            sql.SQL("SELECT count(*), count(remap_to) FROM ({}) AS b").format(base)
        ).fetchone()
        if total:
            rows = conn.execute(
                sql.SQL("SELECT value, remap_to FROM ({}) AS b"
                        " ORDER BY value, remap_to LIMIT %s").format(base),
                [sample_size],
            ).fetchall()
    sample = pd.DataFrame(rows, columns=[column, "remap_to"])
    sample.insert(0, "table_name", table.qualified)
    return BreakingRows(table.qualified, total, remappable, sample)


def cascade_impact(conn: psycopg.Connection, tables: list[Table], column: str,
                   limit: int = 10) -> pd.DataFrame:
    """Return, per contract, the rows ON DELETE CASCADE would delete with it.

    Only rows whose value is already an operator_contracts id count; the
    contracts with the most dependent rows come first.
    """
    contracts = resolve_table(conn, REFERENCED_CONTRACTS, tables[0].schema)
    counts = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {col} AS contract_id, {name} AS table_name FROM {tbl}").format(
            col=sql.Identifier(column), name=sql.Literal(t.name), tbl=t.identifier)
        for t in tables
    )
    query = sql.SQL(
        "SELECT c.contract_number, d.table_name, count(*) AS rows"
        " FROM ({counts}) AS d JOIN {con} c ON c.id = d.contract_id"
        " GROUP BY c.contract_number, d.table_name"
    ).format(counts=counts, con=contracts.identifier)
    frame = pd.DataFrame(conn.execute(query).fetchall(),
                         columns=["contract_number", "table_name", "rows"])
    if frame.empty:
        return pd.DataFrame(columns=["contract_number", "total"])
    wide = frame.pivot_table(index="contract_number", columns="table_name",
                             values="rows", fill_value=0, aggfunc="sum")
    wide["total"] = wide.sum(axis=1)
    wide = wide.reset_index().sort_values(["total", "contract_number"],
                                          ascending=[False, True])
    wide.columns.name = None
    return wide.head(limit).reset_index(drop=True)


def unindexed_fk_warnings(foreign_keys: pd.DataFrame) -> list[str]:
    """Return one warning per FK whose column has no index."""
    warnings = []
    for fk in foreign_keys.itertuples():
        if fk.column_indexed:
            continue
        table = fk.table_name
        index = f"{table.split('.')[-1]}_{fk.columns.replace(', ', '_')}_idx"
        warnings.append(
            f"{table}.{fk.columns} ({fk.constraint_name}) has no index: every "
            f"DELETE or key UPDATE on {fk.referenced_table} scans {table} to "
            f"check or cascade. Create one without blocking writes: "
            f"CREATE INDEX CONCURRENTLY {index} ON {table} ({fk.columns});"
        )
    return warnings
