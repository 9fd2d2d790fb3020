"""Load and validate the constraints_before.json that a migration saved.

The saved file is untrusted input: every table, column and constraint name
is matched against the catalog, and each FK definition must be a plain
``FOREIGN KEY (col) REFERENCES table(col)`` with optional MATCH FULL, ON
UPDATE, ON DELETE and DEFERRABLE clauses. The SQL is rebuilt from the
parsed parts with ``psycopg.sql.Identifier``, and the saved text itself
is never run.

The file must come from the target: its ``database`` must equal
``current_database()``, and its optional ``server`` object (``host``,
``port``, ``system_identifier``) must match the target's where both sides
have a value. A file without ``server`` passes with a warning that only the
database name was checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import errors, sql

from . import catalog, migration
from .catalog import Table
from .errors import ParameterError, TargetError

STATE_FILE = "constraints_before.json"
SERVER_FIELDS = ("host", "port", "system_identifier")

# pg_constraint.confdeltype codes and their referential actions.
ACTION_CODES = {
    "a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL",
    "d": "SET DEFAULT",
}

# An identifier as pg_get_constraintdef prints it: lower case without
# quotes, or double-quoted with "" for a quote inside.
_IDENTIFIER = r'(?:"(?:[^"]|"")+"|[a-z_][a-z0-9_]*)'
_IDENTIFIER_LIST = rf"{_IDENTIFIER}(?:, {_IDENTIFIER})*"
_ACTION = r"(?:NO ACTION|RESTRICT|CASCADE|SET NULL|SET DEFAULT)"
_FK_DEFINITION = re.compile(
    rf"FOREIGN KEY \((?P<columns>{_IDENTIFIER_LIST})\)"
    rf" REFERENCES (?P<referenced>{_IDENTIFIER}(?:\.{_IDENTIFIER})?)"
    rf"\((?P<referenced_columns>{_IDENTIFIER_LIST})\)"
    rf"(?P<match_full> MATCH FULL)?"
    rf"(?P<actions>(?: ON (?:UPDATE|DELETE) {_ACTION})*)"
    rf"(?P<deferrable> DEFERRABLE)?(?P<initially_deferred> INITIALLY DEFERRED)?"
)
_ACTION_CLAUSE = re.compile(rf" ON (UPDATE|DELETE) ({_ACTION})")

ACCEPTED_FORM = (
    "FOREIGN KEY (column) REFERENCES table(column) [MATCH FULL] "
    "[ON UPDATE action] [ON DELETE action] [DEFERRABLE [INITIALLY DEFERRED]]"
)


@dataclass
class SavedForeignKey:
    """A saved FK whose definition was parsed and checked against the catalog."""

    name: str
    definition: str
    validated: bool
    on_delete: str
    referenced_table: str
    referenced: Table
    referenced_column: str
    match_full: bool
    on_update_action: str
    on_delete_action: str
    deferrable: bool
    initially_deferred: bool

    def constraint_sql(self, column: str) -> sql.Composed:
        """Return the definition rebuilt from its parsed parts."""
        text = sql.SQL("FOREIGN KEY ({}) REFERENCES {} ({})").format(
            sql.Identifier(column), self.referenced.identifier,
            sql.Identifier(self.referenced_column))
        if self.match_full:
            text += sql.SQL(" MATCH FULL")
        # NO ACTION is the default, which pg_get_constraintdef leaves out too.
        for event, action in (("UPDATE", self.on_update_action),
                              ("DELETE", self.on_delete_action)):
            if action != "NO ACTION":
                text += sql.SQL(" ON {} {}").format(
                    sql.SQL(event), sql.SQL(_checked_action(action)))
        if self.deferrable:
            text += sql.SQL(" DEFERRABLE")
        if self.initially_deferred:
            text += sql.SQL(" INITIALLY DEFERRED")
        return text

    def as_foreign_key(self) -> migration.ForeignKey:
        return migration.ForeignKey(self.name, self.referenced_table,
                                    self.definition, self.validated,
                                    self.on_delete)


@dataclass
class SavedColumn:
    """One FK column of the saved state, resolved in the catalog."""

    table: Table
    column: str
    not_null: bool
    foreign_keys: list[SavedForeignKey]

    @property
    def state(self) -> migration.ColumnState:
        return migration.ColumnState(
            self.table.qualified, self.column, self.not_null,
            [fk.as_foreign_key() for fk in self.foreign_keys])

    @property
    def check_name(self) -> str:
        """Name of the temporary CHECK that brings NOT NULL back."""
        return _truncate_identifier(f"{self.table.name}_{self.column}_not_null")


@dataclass
class SavedState:
    """The contents of a validated constraints_before.json."""

    path: Path
    database: str
    option: int
    columns: list[SavedColumn]
    # The file's "server" object with each value as text, or None when the
    # file has none.
    server: dict[str, str | None] | None = None
    # What the checks could not prove, for the notebook to display.
    warnings: list[str] = field(default_factory=list)

    @property
    def states(self) -> list[migration.ColumnState]:
        return [column.state for column in self.columns]


def _checked_action(action: str) -> str:
    # The action is composed as SQL, so it must be one of the fixed keywords.
    if action not in ACTION_CODES.values():
        raise ValueError(f"unexpected referential action {action!r}")
    return action


def _truncate_identifier(name: str) -> str:
    # PostgreSQL truncates identifiers to 63 bytes (NAMEDATALEN - 1 in a
    # default build), so the name looked up later is the name it stored.
    return name.encode("utf-8")[:63].decode("utf-8", errors="ignore")


def _split_identifiers(text: str) -> list[str]:
    names = re.findall(_IDENTIFIER, text)
    return [name[1:-1].replace('""', '"') if name.startswith('"') else name
            for name in names]


# Loading and validating the saved file


def saved_state_path(run_dir) -> Path:
    """Return the constraints_before.json of ``run_dir``, which may also be the file."""
    if run_dir in (None, ""):
        raise ParameterError(
            "run_dir is empty: set it to the output folder of the migrate "
            "run to undo (the folder that contains constraints_before.json)."
        )
    path = Path(run_dir)
    return path / STATE_FILE if path.is_dir() else path


def read_state_file(path: Path) -> dict:
    """Return the parsed JSON of ``path``, or raise ``ParameterError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParameterError(
            f"{path}: file not found. Set run_dir to the output folder of the "
            f"migrate run, which contains {STATE_FILE} once the migrate "
            f"notebook ran there."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParameterError(f"{path}: could not be read: {exc}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParameterError(
            f"{path}: invalid JSON ({exc}). Use the file as the migrate run "
            f"wrote it."
        ) from None
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a JSON object at the top level.")
    return data


def _require_field(path: Path, where: str, data: dict, key: str, kind: type):
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ParameterError(
            f"{path}: {where} must have {key!r} of type {kind.__name__}, got "
            f"{value!r}."
        )
    return value


def check_database(conn: psycopg.Connection, path: Path, database: str) -> None:
    """Raise ``TargetError`` unless the file was saved from the target database."""
    current = conn.execute("SELECT current_database()").fetchone()[0]
    if database != current:
        raise TargetError(
            f"{path} was saved from database {database!r}, but the target is "
            f"{current!r}, so nothing was changed. Point the target at "
            f"{database!r}, or use the migrate run of {current!r}."
        )


def read_system_identifier(conn: psycopg.Connection) -> str | None:
    """Return the target's ``pg_control_system().system_identifier`` as text.

    Returns None when the role may not run ``pg_control_system()``, which
    managed services can revoke. The savepoint keeps an open transaction
    usable after that error.
    """
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT system_identifier::text FROM pg_control_system()").fetchone()
    except (errors.InsufficientPrivilege, errors.UndefinedFunction):
        return None
    return row[0]


def parse_server(path: Path, data: dict) -> dict[str, str | None] | None:
    """Return the file's ``server`` object with its values as text, or None if absent."""
    server = data.get("server")
    if server is None:
        return None
    if not isinstance(server, dict):
        raise ParameterError(
            f"{path}: 'server' must be an object with {', '.join(SERVER_FIELDS)}, "
            f"got {server!r}. Use the file as the migrate run wrote it."
        )
    values = {}
    for name in SERVER_FIELDS:
        value = server.get(name)
        if isinstance(value, bool) or not isinstance(value, (str, int, type(None))):
            raise ParameterError(
                f"{path}: server {name!r} must be text, a number or null, got "
                f"{value!r}. Use the file as the migrate run wrote it."
            )
        values[name] = None if value in (None, "") else str(value)
    return values


def _describe_server(values: dict) -> str:
    parts = [f"{name} {values[name]}" for name in SERVER_FIELDS if values.get(name)]
    return ", ".join(parts) or "no host, port or system_identifier"


def check_server(conn: psycopg.Connection, path: Path, database: str,
                 server: dict[str, str | None] | None) -> list[str]:
    """Raise ``TargetError`` unless the file was saved from the target server.

    A saved ``system_identifier`` decides when the target's can be read, and
    host and port are compared otherwise. Returns warnings on what could not
    be checked, for example a file that has no ``server`` object.
    """
    current = {"host": conn.info.host, "port": str(conn.info.port),
               "system_identifier": None}
    only_database = (
        f"{path.name} has no 'server' object (host, port, system_identifier), "
        f"so only the database name {database!r} was checked against the "
        f"target. Check that the target shown in step 1 is the server that "
        f"the migrate run changed.")
    if server is None or not any(server.values()):
        return [only_database]

    warnings = []
    if server["system_identifier"] is not None:
        current["system_identifier"] = read_system_identifier(conn)
        if current["system_identifier"] == server["system_identifier"]:
            return []
        if current["system_identifier"] is not None:
            raise TargetError(
                f"{path} was saved from the server with {_describe_server(server)}, "
                f"but the target has {_describe_server(current)}, so it is "
                f"another PostgreSQL cluster and nothing was changed. Point the "
                f"target at the server that the migrate run changed, or use the "
                f"output folder of a migrate run on this server."
            )
        warnings.append(
            "The role may not run pg_control_system(), so the target's "
            "system_identifier could not be compared with the saved one, and "
            "the server was checked by host and port only.")

    differ = [name for name in ("host", "port")
              if server[name] is not None and server[name] != current[name]]
    if differ:
        raise TargetError(
            f"{path} was saved from {_describe_server(server)}, but the target "
            f"is {_describe_server(current)}, so nothing was changed. Check the "
            f"target (DATABASE_URL, PGHOST, PGPORT or PGSERVICE). If it is the "
            f"same server reached under another name or address, connect with "
            f"the saved host and port so that this check can confirm it."
        )
    return warnings


def parse_foreign_key(conn: psycopg.Connection, path: Path, table: Table,
                      column: str, data: dict) -> SavedForeignKey:
    """Return a saved FK after checking its definition and names."""
    where = f"an FK of {table.qualified}.{column}"
    name = _require_field(path, where, data, "name", str)
    definition = _require_field(path, where, data, "definition", str)
    validated = _require_field(path, where, data, "validated", bool)
    on_delete = _require_field(path, where, data, "on_delete", str)
    referenced_table = _require_field(path, where, data, "referenced_table", str)
    where = f"FK {name!r} of {table.qualified}"
    if not name or "\x00" in name or len(name.encode("utf-8")) > 63:
        raise ParameterError(
            f"{path}: {where}: the name is not a valid PostgreSQL identifier "
            f"(1 to 63 bytes, no NUL character)."
        )

    match = _FK_DEFINITION.fullmatch(definition)
    if match is None:
        raise ParameterError(
            f"{path}: {where} has definition {definition!r}, which is not a "
            f"plain foreign key, so it was rejected and not run. Expected "
            f"{ACCEPTED_FORM}. Use the file as the migrate run wrote it."
        )
    columns = _split_identifiers(match["columns"])
    referenced_columns = _split_identifiers(match["referenced_columns"])
    if columns != [column] or len(referenced_columns) != 1:
        raise ParameterError(
            f"{path}: {where} has definition {definition!r}. Expected one "
            f"referencing column, {column!r}, and one referenced column."
        )
    if match["referenced"] != referenced_table:
        raise ParameterError(
            f"{path}: {where} references {match['referenced']!r} in its "
            f"definition but {referenced_table!r} in referenced_table, so "
            f"the file was changed after the migrate run wrote it."
        )
    actions = _parse_actions(path, where, match["actions"])
    if ACTION_CODES.get(on_delete) != actions["DELETE"]:
        raise ParameterError(
            f"{path}: {where} has on_delete {on_delete!r}, which does not "
            f"match ON DELETE {actions['DELETE']} in its definition."
        )
    if match["initially_deferred"] and not match["deferrable"]:
        raise ParameterError(
            f"{path}: {where} is INITIALLY DEFERRED without DEFERRABLE."
        )

    referenced = _resolve_referenced(conn, path, where, match["referenced"])
    referenced_column = _resolve_in_file(path, catalog.resolve_column, conn,
                                         referenced, referenced_columns[0])
    return SavedForeignKey(
        name=name, definition=definition, validated=validated,
        on_delete=on_delete, referenced_table=referenced_table,
        referenced=referenced, referenced_column=referenced_column,
        match_full=bool(match["match_full"]),
        on_update_action=actions["UPDATE"], on_delete_action=actions["DELETE"],
        deferrable=bool(match["deferrable"]),
        initially_deferred=bool(match["initially_deferred"]))


def _parse_actions(path: Path, where: str, text: str) -> dict[str, str]:
    actions = {}
    for event, action in _ACTION_CLAUSE.findall(text):
        if event in actions:
            raise ParameterError(f"{path}: {where} has ON {event} twice.")
        actions[event] = action
    return {"UPDATE": actions.get("UPDATE", "NO ACTION"),
            "DELETE": actions.get("DELETE", "NO ACTION")}


def _resolve_in_file(path: Path, resolve, *args):
    # Prefix catalog errors with the file, so the reader knows where the name came from.
    try:
        return resolve(*args)
    except ParameterError as exc:
        raise ParameterError(f"{path}: {exc}") from None


def _resolve_referenced(conn: psycopg.Connection, path: Path, where: str,
                        text: str) -> Table:
    names = _split_identifiers(text)
    if len(names) == 2:
        return _resolve_in_file(path, catalog.resolve_table, conn, names[1], names[0])
    # pg_get_constraintdef leaves out the schema of a table visible on the
    # search_path, so look the name up the same way.
    row = conn.execute(
        "SELECT n.nspname FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = %s AND c.relkind IN ('r', 'p')"
        " AND pg_table_is_visible(c.oid)", [names[0]]).fetchone()
    if row is None:
        raise ParameterError(
            f"{path}: {where} references table {names[0]!r}, which is not "
            f"found on the search_path of database {conn.info.dbname!r}."
        )
    return catalog.resolve_table(conn, names[0], row[0])


def parse_column(conn: psycopg.Connection, path: Path, data: dict) -> SavedColumn:
    """Return one saved column after resolving its table, column and FKs."""
    where = "each entry of 'columns'"
    qualified = _require_field(path, where, data, "table", str)
    column = _require_field(path, where, data, "column", str)
    not_null = _require_field(path, where, data, "not_null", bool)
    foreign_keys = _require_field(path, where, data, "foreign_keys", list)
    if "." not in qualified:
        raise ParameterError(
            f"{path}: table {qualified!r} must be schema-qualified, as in "
            f"'public.collection_attempts'."
        )
    # as_dict writes schema and name joined by the first dot.
    schema, name = qualified.split(".", 1)
    table = _resolve_in_file(path, catalog.resolve_table, conn, name, schema)
    _resolve_in_file(path, catalog.resolve_column, conn, table, column)
    parsed = [parse_foreign_key(conn, path, table, column, fk) for fk in foreign_keys]
    names = [fk.name for fk in parsed]
    if len(set(names)) != len(names):
        raise ParameterError(
            f"{path}: {qualified}.{column} lists an FK name twice: {names}."
        )
    return SavedColumn(table, column, not_null, parsed)


def load_saved_state(conn: psycopg.Connection, run_dir) -> SavedState:
    """Read and validate the constraints_before.json of ``run_dir``.

    Raises ``ParameterError`` naming the file and the problem, or
    ``TargetError`` when the file was saved from another database or server.
    """
    path = saved_state_path(run_dir)
    data = read_state_file(path)
    database = _require_field(path, "the file", data, "database", str)
    option = _require_field(path, "the file", data, "option", int)
    columns = _require_field(path, "the file", data, "columns", list)
    server = parse_server(path, data)
    check_database(conn, path, database)
    warnings = check_server(conn, path, database, server)
    if option not in (1, 2):
        raise ParameterError(f"{path}: option must be 1 or 2, got {option!r}.")
    if not columns:
        raise ParameterError(f"{path}: 'columns' is empty, so there is nothing to restore.")

    parsed = [parse_column(conn, path, column) for column in columns]
    keys = [(column.table.qualified, column.column) for column in parsed]
    if len(set(keys)) != len(keys):
        raise ParameterError(f"{path}: a column is listed twice: {keys}.")
    return SavedState(path, database, option, parsed, server, warnings)


def find_changed_columns(saved: SavedState) -> list[str]:
    """List the saved columns and FKs that a migration had already changed.

    The incident state has each column NOT NULL with a validated FK to
    invoices. A saved FK that references operator_contracts or is NOT
    VALID, or a column with no FK, shows that an earlier run had begun the
    fix before this file was saved. A re-run after a lock timeout, into a
    new output folder, saves such a file.
    """
    findings = []
    for column in saved.columns:
        where = f"{column.table.qualified}.{column.column}"
        if not column.foreign_keys:
            nullable = "" if column.not_null else " and is nullable"
            findings.append(f"{where} has no FK{nullable}, as Option 2 leaves it")
        for fk in column.foreign_keys:
            if fk.referenced.name == catalog.REFERENCED_CONTRACTS:
                state = "" if fk.validated else " and is NOT VALID"
                findings.append(f"{where}: {fk.name} references "
                                f"{fk.referenced.qualified}{state}")
            elif not fk.validated:
                findings.append(f"{where}: {fk.name} is NOT VALID")
    return findings
