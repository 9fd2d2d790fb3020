"""Restore the constraints that a migration saved in constraints_before.json.

``saved_state`` loads and validates the saved file, and this module plans
and runs the restore.

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

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psycopg
from psycopg import sql

from . import locks, migration
from .catalog import Table
from .errors import ParameterError, PreflightError, RunbookError
from .saved_state import (STATE_FILE, SavedColumn, SavedForeignKey, SavedState,
                          find_changed_columns, saved_state_path)

# TODO: move tests/test_faults.py and tests/test_pg15.py to
# saved_state.load_saved_state, then drop this re-export.
from .saved_state import load_saved_state  # noqa: F401

logger = logging.getLogger(__name__)

RESTORE_SQL_FILE = "restore.sql"
DEMO_MIGRATE_FOLDER = "demo-migrate"

_CHECK_STATE_QUERY = (
    "SELECT con.convalidated,"
    " con.conkey = ARRAY[a.attnum]"
    r" AND pg_get_constraintdef(con.oid) ~ '^CHECK \(\([^()]* IS NOT NULL\)\)'"
    " FROM pg_constraint con"
    " JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attname = %s"
    " WHERE con.conrelid = %s AND con.conname = %s AND con.contype = 'c'"
)


@dataclass
class RestorePlan:
    """The steps that bring the current state back to the saved one."""

    saved: SavedState
    current: list[migration.ColumnState]
    steps: list[migration.Step]
    preflight: pd.DataFrame
    rejections: list[str] = field(default_factory=list)
    # Set when the saved state is not the incident state (see
    # ``describe_changed_state``). The restore still goes ahead.
    saved_state_warning: str | None = None

    @property
    def nothing_to_do(self) -> bool:
        return not self.steps

    def as_migration_plan(self) -> migration.Plan:
        return migration.Plan(self.saved.option, self.current, self.steps, [])


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
            f"{table.qualified}: {rows} row(s) have a value in {column} that "
            f"is not in {target}, so restoring {fk.name} would fail at VALIDATE "
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


def describe_changed_state(saved: SavedState) -> str | None:
    """Return a warning when the saved state already had part of a fix, else None."""
    findings = find_changed_columns(saved)
    if not findings:
        return None
    return (
        f"The saved state is not the incident state: {'; '.join(findings)}. "
        f"The migrate run that wrote {saved.path} started after an earlier run "
        f"had already changed these constraints (for example a re-run after a "
        f"lock timeout, in a new output folder), so this restore brings back "
        f"that partly migrated state, not the original constraints. The "
        f"earlier run's output folder has the original definitions in its "
        f"{STATE_FILE}: set run_dir to that folder. Go on with this file only "
        f"if this state is the one you want back."
    )


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
    return RestorePlan(saved, current, steps, preflight, rejections,
                       describe_changed_state(saved))


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
