"""Look up tables and columns in the catalog before composing SQL with them.

Names that come from parameters are matched exactly against the catalog
and then composed with ``psycopg.sql.Identifier``, so a name with quotes,
semicolons, dots or mixed case is either found as it is or rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from .errors import ParameterError

REFERENCED_CONTRACTS = "operator_contracts"
REFERENCED_INVOICES = "invoices"


@dataclass(frozen=True)
class Table:
    """A table found in the catalog."""

    schema: str
    name: str
    oid: int

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def _require_name(kind: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(
            f"{kind} name must be a non-empty string, got {value!r}."
        )
    if "\x00" in value or len(value.encode("utf-8")) > 63:
        raise ParameterError(
            f"{kind} name {value!r} is not a valid PostgreSQL identifier "
            f"(at most 63 bytes, no NUL character)."
        )
    return value


def resolve_table(conn: psycopg.Connection, name, schema: str = "public") -> Table:
    """Return the table ``schema.name``, matched exactly, or raise ``ParameterError``."""
    name = _require_name("Table", name)
    schema = _require_name("Schema", schema)
    row = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        [schema, name],
    ).fetchone()
    if row is None:
        raise ParameterError(
            f"Table {name!r} was not found in schema {schema!r} of database "
            f"{conn.info.dbname!r}. Names are matched exactly (case and "
            f"quotes included); list the tables with \\dt {schema}.*"
        )
    return Table(schema, name, row[0])


def resolve_column(conn: psycopg.Connection, table: Table, column) -> str:
    """Return ``column`` if ``table`` has it, or raise ``ParameterError``."""
    column = _require_name("Column", column)
    row = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = %s AND attname = %s"
        " AND attnum > 0 AND NOT attisdropped",
        [table.oid, column],
    ).fetchone()
    if row is None:
        raise ParameterError(
            f"Column {column!r} was not found in table {table.qualified!r}; "
            f"check the spelling with \\d {table.qualified}"
        )
    return column


def resolve_tables(conn: psycopg.Connection, names, schema: str = "public") -> list[Table]:
    """Resolve a list of table names (or one comma-separated string)."""
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    if not isinstance(names, (list, tuple)) or not names:
        raise ParameterError(
            f"tables must be a non-empty list of table names, got {names!r}; "
            f"the default is ['collection_attempts', 'payment_promises']."
        )
    return [resolve_table(conn, name, schema) for name in names]
