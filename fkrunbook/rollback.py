"""Restore the constraints that a migration saved in constraints_before.json.

The saved file is untrusted input: every table, column and constraint name
is matched against the catalog, and each FK definition must be a plain
``FOREIGN KEY (col) REFERENCES table(col)`` with optional MATCH FULL, ON
UPDATE, ON DELETE and DEFERRABLE clauses. The SQL is rebuilt from the
parsed parts with ``psycopg.sql.Identifier``, and the saved text itself
is never run.

A restore plan is the difference between the current state and the saved
one, in three phases. Phase 1, one short transaction per table, drops the
FKs that are not in the saved state and adds the saved ones NOT VALID (plus
a NOT VALID ``CHECK (col IS NOT NULL)`` when NOT NULL must come back).
Phase 2 validates each of them in a transaction of its own, under SHARE
UPDATE EXCLUSIVE. Phase 3 runs SET NOT NULL, which skips its table scan
because of the validated CHECK (PostgreSQL 12 and later), and drops the
CHECK.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psycopg
from psycopg import sql

from . import catalog, locks, migration
from .catalog import Table
from .errors import ParameterError, PreflightError, RunbookError, TargetError

logger = logging.getLogger(__name__)

STATE_FILE = "constraints_before.json"
RESTORE_SQL_FILE = "restore.sql"
DEMO_MIGRATE_FOLDER = "demo-migrate"

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

_CHECK_STATE_QUERY = (
    "SELECT con.convalidated,"
    " con.conkey = ARRAY[a.attnum]"
    r" AND pg_get_constraintdef(con.oid) ~ '^CHECK \(\([^()]* IS NOT NULL\)\)'"
    " FROM pg_constraint con"
    " JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attname = %s"
    " WHERE con.conrelid = %s AND con.conname = %s AND con.contype = 'c'"
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

    @property
    def states(self) -> list[migration.ColumnState]:
        return [column.state for column in self.columns]


@dataclass
class RestorePlan:
    """The steps that bring the current state back to the saved one."""

    saved: SavedState
    current: list[migration.ColumnState]
    steps: list[migration.Step]
    preflight: pd.DataFrame
    rejections: list[str] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not self.steps

    def as_migration_plan(self) -> migration.Plan:
        return migration.Plan(self.saved.option, self.current, self.steps, [])


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
    ``TargetError`` when the file was saved from another database.
    """
    path = saved_state_path(run_dir)
    data = read_state_file(path)
    database = _require_field(path, "the file", data, "database", str)
    option = _require_field(path, "the file", data, "option", int)
    columns = _require_field(path, "the file", data, "columns", list)
    check_database(conn, path, database)
    if option not in (1, 2):
        raise ParameterError(f"{path}: option must be 1 or 2, got {option!r}.")
    if not columns:
        raise ParameterError(f"{path}: 'columns' is empty, so there is nothing to restore.")

    parsed = [parse_column(conn, path, column) for column in columns]
    keys = [(column.table.qualified, column.column) for column in parsed]
    if len(set(keys)) != len(keys):
        raise ParameterError(f"{path}: a column is listed twice: {keys}.")
    return SavedState(path, database, option, parsed)


# Planning


def _add_fk(table: Table, column: str, fk: SavedForeignKey) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(
        table.identifier, sql.Identifier(fk.name), fk.constraint_sql(column))


def _alter(table: Table, action: str, *names: str) -> sql.Composed:
    # ``action`` is a fixed clause with one {} per name, written in this module.
    return sql.SQL("ALTER TABLE {} " + action).format(
        table.identifier, *[sql.Identifier(name) for name in names])


def _rejected_rows_query(table: Table, column: str,
                         fk: SavedForeignKey) -> sql.Composed:
    return sql.SQL(
        "SELECT * FROM {tbl} t WHERE t.{col} IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM {ref} r WHERE r.{ref_col} = t.{col})"
    ).format(tbl=table.identifier, col=sql.Identifier(column),
             ref=fk.referenced.identifier,
             ref_col=sql.Identifier(fk.referenced_column))


def _null_rows_query(table: Table, column: str) -> sql.Composed:
    return sql.SQL("SELECT * FROM {} WHERE {} IS NULL").format(
        table.identifier, sql.Identifier(column))


def _count(conn: psycopg.Connection, query: sql.Composed) -> int:
    return conn.execute(
        sql.SQL("SELECT count(*) FROM ({}) AS r").format(query)).fetchone()[0]


def read_check_state(conn: psycopg.Connection, saved: SavedColumn) -> bool | None:
    """Return whether the temporary NOT NULL CHECK is validated, or None if absent.

    Raises ``RunbookError`` when a constraint of that name exists but is not
    a ``CHECK (column IS NOT NULL)``, because the restore would drop it.
    """
    row = conn.execute(_CHECK_STATE_QUERY, [saved.column, saved.table.oid,
                                            saved.check_name]).fetchone()
    if row is None:
        return None
    validated, is_not_null_check = row
    if not is_not_null_check:
        raise RunbookError(
            f"{saved.table.qualified} has a CHECK constraint named "
            f"{saved.check_name!r} that is not CHECK ({saved.column} IS NOT "
            f"NULL), but the restore uses that name for its own CHECK. "
            f"Rename that constraint, then re-run."
        )
    return validated


@dataclass
class _TablePlan:
    """The statements one table needs, by phase, and its pre-flight counts."""

    phase_one: list[sql.Composable] = field(default_factory=list)
    phase_one_parts: list[str] = field(default_factory=list)
    validate: list[tuple[str, sql.Composable, list[Table]]] = field(default_factory=list)
    finish: list[sql.Composable] = field(default_factory=list)
    relations: list[Table] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)


def _referenced_by(conn: psycopg.Connection, table: Table, name: str) -> Table:
    # The referenced table of an FK about to be dropped, so that sessions
    # holding a lock on it show up as blockers too.
    schema, relname, oid = conn.execute(
        "SELECT n.nspname, c.relname, c.oid FROM pg_constraint con"
        " JOIN pg_class c ON c.oid = con.confrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE con.conrelid = %s AND con.conname = %s AND con.contype = 'f'",
        [table.oid, name]).fetchone()
    return Table(schema, relname, oid)


def _plan_foreign_keys(conn: psycopg.Connection, saved: SavedColumn,
                       current: migration.ColumnState, plan: _TablePlan) -> None:
    table, column = saved.table, saved.column
    current_by_name = {fk.name: fk for fk in current.foreign_keys}
    saved_names = {fk.name for fk in saved.foreign_keys}
    for fk in current.foreign_keys:
        if fk.name not in saved_names:
            plan.phase_one.append(_alter(table, "DROP CONSTRAINT {}", fk.name))
            plan.phase_one_parts.append(f"drop {fk.name}")
            plan.relations.append(_referenced_by(conn, table, fk.name))

    for fk in saved.foreign_keys:
        now = current_by_name.get(fk.name)
        same = now is not None and now.definition == fk.definition
        if same and now.validated == fk.validated:
            continue
        if not same or now.validated:
            # Missing, different, or validated where the saved FK was not.
            if now is not None:
                plan.phase_one.append(_alter(table, "DROP CONSTRAINT {}", fk.name))
                plan.phase_one_parts.append(f"drop {fk.name}")
                plan.relations.append(_referenced_by(conn, table, fk.name))
            plan.phase_one.append(_add_fk(table, column, fk))
            plan.phase_one_parts.append(
                f"add {fk.name} NOT VALID (references {fk.referenced.qualified})")
        plan.relations.append(fk.referenced)
        if fk.validated:
            plan.validate.append((fk.name, _alter(table, "VALIDATE CONSTRAINT {}",
                                                  fk.name), [table, fk.referenced]))
            _count_rejected(conn, saved, fk, plan)


def _count_rejected(conn: psycopg.Connection, saved: SavedColumn,
                    fk: SavedForeignKey, plan: _TablePlan) -> None:
    table, column = saved.table, saved.column
    target = f"{fk.referenced.qualified}({fk.referenced_column})"
    query = _rejected_rows_query(table, column, fk)
    rows = _count(conn, query)
    plan.checks.append({"table_name": table.qualified, "constraint_name": fk.name,
                        "check": f"{column} values not in {target}", "rows": rows})
    if rows:
        plan.rejections.append(
            f"{table.qualified}: {rows} row(s) hold a {column} value that is "
            f"not in {target}, so restoring {fk.name} would fail at VALIDATE "
            f"CONSTRAINT, and nothing was changed. Such rows were written after "
            f"the fix, when {column} stores operator_contracts ids, and the "
            f"old FK rejects them. Keep the fix in place, or delete or correct "
            f"these rows first. List them with: {query.as_string(conn)};"
        )


def _plan_not_null(conn: psycopg.Connection, saved: SavedColumn,
                   current: migration.ColumnState, plan: _TablePlan) -> None:
    table, column, check = saved.table, saved.column, saved.check_name
    check_validated = read_check_state(conn, saved)
    if not saved.not_null:
        if current.not_null:
            plan.phase_one.append(_alter(table, "ALTER COLUMN {} DROP NOT NULL", column))
            plan.phase_one_parts.append(f"DROP NOT NULL on {column}")
        if check_validated is not None:
            plan.finish.append(_alter(table, "DROP CONSTRAINT {}", check))
        return

    if not current.not_null:
        if check_validated is None:
            plan.phase_one.append(sql.SQL(
                "ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID"
            ).format(table.identifier, sql.Identifier(check), sql.Identifier(column)))
            plan.phase_one_parts.append(f"add {check} NOT VALID")
        if not check_validated:
            plan.validate.append((check, _alter(table, "VALIDATE CONSTRAINT {}", check),
                                  [table]))
        _count_nulls(conn, saved, plan)
        plan.finish.append(_alter(table, "ALTER COLUMN {} SET NOT NULL", column))
    if check_validated is not None or not current.not_null:
        plan.finish.append(_alter(table, "DROP CONSTRAINT {}", check))


def _count_nulls(conn: psycopg.Connection, saved: SavedColumn, plan: _TablePlan) -> None:
    table, column = saved.table, saved.column
    query = _null_rows_query(table, column)
    rows = _count(conn, query)
    plan.checks.append({"table_name": table.qualified,
                        "constraint_name": saved.check_name,
                        "check": f"NULL {column}", "rows": rows})
    if rows:
        plan.rejections.append(
            f"{table.qualified}: {rows} row(s) have {column} NULL, so NOT NULL "
            f"cannot come back, and nothing was changed. Such rows were written "
            f"after Option 2 made {column} nullable. Keep the fix in place, or "
            f"set {column} on these rows first. List them with: "
            f"{query.as_string(conn)};"
        )


def _table_steps(saved: SavedColumn, plan: _TablePlan) -> list[list[migration.Step]]:
    table = saved.table
    relations = [table, *dict.fromkeys(plan.relations)]
    phase_one, validate, finish = [], [], []
    if plan.phase_one:
        phase_one.append(migration.Step(
            table.qualified, "ddl",
            f"{table.qualified}: {', '.join(plan.phase_one_parts)}",
            plan.phase_one, "ACCESS EXCLUSIVE (brief)", relations))
    for name, statement, step_relations in plan.validate:
        validate.append(migration.Step(
            table.qualified, "validate",
            f"{table.qualified}: VALIDATE CONSTRAINT {name}", [statement],
            "SHARE UPDATE EXCLUSIVE (inserts continue)", step_relations))
    if plan.finish:
        description = f"{table.qualified}: drop {saved.check_name}"
        if len(plan.finish) > 1:
            description = (f"{table.qualified}: SET NOT NULL on {saved.column} "
                           f"and drop {saved.check_name}")
        finish.append(migration.Step(
            table.qualified, "ddl", description, plan.finish,
            "ACCESS EXCLUSIVE (brief, no table scan)", [table]))
    return [phase_one, validate, finish]


PREFLIGHT_COLUMNS = ["table_name", "constraint_name", "check", "rows"]


def plan_restore(conn: psycopg.Connection, saved: SavedState) -> RestorePlan:
    """Read the current state and return the steps that restore ``saved``.

    Also counts the rows that the restored constraints would reject, which
    ``check_preflight`` raises on.
    """
    current, phases = [], [[], [], []]
    checks, rejections = [], []
    for column in saved.columns:
        state = migration.read_column_state(conn, column.table, column.column)
        current.append(state)
        table_plan = _TablePlan()
        _plan_foreign_keys(conn, column, state, table_plan)
        _plan_not_null(conn, column, state, table_plan)
        for phase, steps in zip(phases, _table_steps(column, table_plan)):
            phase.extend(steps)
        checks += table_plan.checks
        rejections += table_plan.rejections

    steps = [step for phase in phases for step in phase]
    preflight = pd.DataFrame(checks, columns=PREFLIGHT_COLUMNS)
    return RestorePlan(saved, current, steps, preflight, rejections)


def check_preflight(plan: RestorePlan) -> None:
    """Raise ``PreflightError`` before any change if the restore would fail."""
    if plan.rejections:
        raise PreflightError("\n".join(plan.rejections))


# Applying and checking


def run_step(conn: psycopg.Connection, step: migration.Step,
             settings: locks.LockSettings) -> dict:
    """Run one step in a transaction with timeouts and retries, and return its record."""
    def body():
        for statement in step.statements:
            conn.execute(statement)

    started = time.monotonic()
    _, attempts = locks.run_with_retries(conn, body, step.relations, settings,
                                         step.description)
    logger.info("applied: %s (%d attempt(s))", step.description, attempts)
    return {"table": step.table, "kind": step.kind, "step": step.description,
            "attempts": attempts,
            "duration_s": round(time.monotonic() - started, 3)}


def run_restore(conn: psycopg.Connection, plan: RestorePlan,
                settings: locks.LockSettings, mode: str,
                wait_for_other_run_s: float = 10.0) -> list[dict]:
    """Run the pre-flight, then apply the plan when ``mode`` is ``"apply"``.

    ``mode`` is what ``parameters.check_gate`` returned, and a dry run
    changes nothing. Holds the runbook's advisory lock while applying, and
    plans again under it, since another run may have changed the state
    meanwhile. Returns one record per step applied.
    """
    if mode not in ("apply", "dry run"):
        raise ParameterError(f"mode must be 'apply' or 'dry run', got {mode!r}.")
    check_preflight(plan)
    if mode == "dry run" or plan.nothing_to_do:
        return []

    applied = []
    with locks.advisory_lock(conn, wait_for_other_run_s):
        fresh = plan_restore(conn, plan.saved)
        check_preflight(fresh)
        # NOTE: a row the old FK rejects, inserted after this pre-flight and
        # before phase 1 commits, makes VALIDATE raise ForeignKeyViolation.
        # Phase 1 stays applied then, with the FK NOT VALID.
        for step in fresh.steps:
            applied.append(run_step(conn, step, settings))
    return applied


def _comparison_row(column: SavedColumn, item: str, saved, current) -> dict:
    return {"table_name": column.table.qualified, "column": column.column,
            "property": item, "saved": saved, "current": current,
            "matches": saved == current}


def compare_with_saved(conn: psycopg.Connection, saved: SavedState) -> pd.DataFrame:
    """Return one row per saved property with its current value and whether they match.

    The properties are the NOT NULL flag and each FK's definition and
    validated flag. FKs on the column that the saved state does not list,
    and a leftover temporary CHECK, show as rows that do not match.
    """
    rows = []
    for column in saved.columns:
        state = migration.read_column_state(conn, column.table, column.column)
        current = {fk.name: fk for fk in state.foreign_keys}
        rows.append(_comparison_row(column, "NOT NULL", column.not_null, state.not_null))
        for fk in column.foreign_keys:
            now = current.pop(fk.name, None)
            rows.append(_comparison_row(column, f"{fk.name} definition", fk.definition,
                                        now.definition if now else None))
            rows.append(_comparison_row(column, f"{fk.name} validated", fk.validated,
                                        now.validated if now else None))
        for name in sorted(current):
            rows.append(_comparison_row(column, f"{name} definition", None,
                                        current[name].definition))
        if read_check_state(conn, column) is not None:
            rows.append(_comparison_row(column, f"{column.check_name} (temporary)",
                                        None, "present"))
    return pd.DataFrame(rows, columns=["table_name", "column", "property", "saved",
                                       "current", "matches"])


def is_restored(comparison: pd.DataFrame) -> bool:
    """Return True when every row of ``compare_with_saved`` matches."""
    return bool(comparison["matches"].all())


# Notebook helpers


def apply_demo_fix(conn: psycopg.Connection, folder: Path) -> list[dict]:
    """Apply Option 1 to a demo database and save its state in ``folder``.

    Gives the rollback notebook, run alone in demo mode, something to undo.
    """
    options = migration.MigrationOptions(option=1)
    plan = migration.plan_migration(conn, options)
    if plan.nothing_to_do:
        raise ParameterError(
            f"The demo database {conn.info.dbname!r} already has Option 1, so "
            f"there is no state before it to save. Set run_dir to the output "
            f"folder of the migrate run that applied it."
        )
    return migration.apply_plan(conn, plan, options, output_dir=folder)


def resolve_state_file(conn: psycopg.Connection, run_dir, is_demo: bool,
                    output_dir: Path) -> tuple[Path, str]:
    """Return the saved state file to restore and a sentence saying where it came from.

    With ``run_dir`` empty on a demo target, Option 1 is applied first
    (see ``apply_demo_fix``) and its folder is used.
    """
    if run_dir not in (None, "") or not is_demo:
        path = saved_state_path(run_dir)
        return path, f"Restoring the state saved in `{path}`."
    folder = Path(output_dir) / DEMO_MIGRATE_FOLDER
    applied = apply_demo_fix(conn, folder)
    return folder / STATE_FILE, (
        f"**Demo mode:** run_dir is empty, so Option 1 was applied to the demo "
        f"database first ({len(applied)} step(s)) and its state was saved in "
        f"`{DEMO_MIGRATE_FOLDER}/{STATE_FILE}` in this run's output folder. "
        f"This run rolls that migration back."
    )


def render_sql(conn: psycopg.Connection, plan: RestorePlan,
               settings: locks.LockSettings) -> str:
    """Return the plan as the SQL text it runs, one transaction per block."""
    options = migration.MigrationOptions(locks=settings)
    return migration.render_sql(conn, plan.as_migration_plan(), options)


def save_restore_sql(conn: psycopg.Connection, plan: RestorePlan,
                     settings: locks.LockSettings, output_dir: Path) -> Path:
    """Write the planned SQL to restore.sql in ``output_dir``."""
    path = Path(output_dir) / RESTORE_SQL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_sql(conn, plan, settings) or "-- nothing to do\n",
                    encoding="utf-8")
    return path


def steps_frame(plan: RestorePlan) -> pd.DataFrame:
    """Return the plan's steps, one row per transaction, for display."""
    return migration.steps_frame(plan.as_migration_plan())


def describe_outcome(mode: str, plan: RestorePlan, applied: list[dict]) -> str:
    """Return one paragraph on what the apply step did."""
    if plan.nothing_to_do:
        return (f"**Nothing to do:** the constraints saved in {STATE_FILE} are "
                f"already in place, so nothing was changed.")
    if mode == "dry run":
        return (f"**Dry run:** {len(plan.steps)} step(s) planned and nothing "
                f"changed. The SQL is in {RESTORE_SQL_FILE}. To apply, set "
                f"dry_run=False and confirm to the database name.")
    retried = sum(record["attempts"] - 1 for record in applied)
    return (f"**Applied** {len(applied)} step(s) of the restore ({retried} "
            f"retry(ies) after lock timeouts).")


def describe_conclusion(mode: str, saved: SavedState, restored: bool) -> str:
    """Return the closing paragraph of the rollback notebook."""
    if restored:
        return (f"**Restored:** every constraint saved before Option "
                f"{saved.option} is back as it was. The app's inserts that "
                f"store an operator_contracts id which is not an invoice id "
                f"fail again with 23503 until a fix is applied again.")
    if mode == "dry run":
        return ("**Not restored yet** (dry run): the rows marked False above "
                "differ from the saved state. Re-run with dry_run=False and "
                "confirm set to restore them.")
    return ("**Only partly restored:** the rows marked False above still "
            "differ from the saved state. Re-run this notebook to finish, "
            "and it plans only what is left.")
