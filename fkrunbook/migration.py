"""Plan and apply Option 1 or Option 2, two-phase and safe to re-run.

A plan is the difference between the state each ``invoice_id`` column is in
and the state the chosen option wants, so an applied migration plans no
step and a half-applied one plans only what is left.

Option 1, per table: one short transaction drops the old FK and adds the
new one NOT VALID. It is the only step that takes strong locks. Old rows
are remapped in batches when asked. Then VALIDATE CONSTRAINT runs in a
transaction of its own under SHARE UPDATE EXCLUSIVE, so inserts go on
during the scan.
Option 2, per table: DROP NOT NULL, then drop the FK, in one short
transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import psycopg
from psycopg import sql
from tqdm.auto import tqdm

from . import catalog, inspection, locks
from .catalog import Table
from .errors import ParameterError, PreflightError
from .paths import read_sql

logger = logging.getLogger(__name__)

ON_DELETE_ACTIONS = {
    "CASCADE": "c", "RESTRICT": "r", "NO ACTION": "a", "SET NULL": "n",
}
DEFAULT_TABLES = ("collection_attempts", "payment_promises")


@dataclass
class MigrationOptions:
    """Settings of one migration run, as the migrate notebook's parameters set them."""

    option: int = 1
    tables: tuple = DEFAULT_TABLES
    column: str = "invoice_id"
    schema: str = "public"
    on_delete: str = "CASCADE"
    remap_invoice_rows: bool = False
    batch_size: int = 5_000
    locks: locks.LockSettings = field(default_factory=locks.LockSettings)


@dataclass
class ForeignKey:
    """A foreign key as read from pg_constraint."""

    name: str
    referenced_table: str
    definition: str
    validated: bool
    on_delete: str


@dataclass
class ColumnState:
    """The NOT NULL flag and the foreign keys of one FK column."""

    table: str
    column: str
    not_null: bool
    foreign_keys: list[ForeignKey]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Step:
    """One transaction of the migration (or one batched remap)."""

    table: str
    kind: str  # "ddl", "remap" or "validate"
    description: str
    statements: list[sql.Composable]
    lock: str
    relations: list[Table] = field(repr=False, default_factory=list)


@dataclass
class Plan:
    """The steps that bring every table to the chosen option."""

    option: int
    before: list[ColumnState]
    steps: list[Step]
    breaking: list[inspection.BreakingRows]

    @property
    def nothing_to_do(self) -> bool:
        return not self.steps


def read_column_state(conn: psycopg.Connection, table: Table, column: str) -> ColumnState:
    """Return the NOT NULL flag and the FKs of ``table.column``."""
    row = conn.execute(read_sql("queries/column_constraints.sql"),
                       {"table": table.qualified, "column": column}).fetchone()
    not_null, fks = row
    foreign_keys = [ForeignKey(
        name=fk["name"], referenced_table=fk["referenced_table"],
        definition=fk["definition"].removesuffix(" NOT VALID"),
        validated=fk["validated"], on_delete=fk["on_delete"]) for fk in fks]
    return ColumnState(table.qualified, column, not_null, foreign_keys)


def validate_options(options: MigrationOptions) -> MigrationOptions:
    """Raise ``ParameterError`` for an option the migration cannot run."""
    if str(options.option) not in ("1", "2") or isinstance(options.option, bool):
        raise ParameterError(
            f"option must be 1 (re-point the FK to operator_contracts) or 2 "
            f"(nullable column, no FK), got {options.option!r}."
        )
    options.option = int(options.option)
    action = str(options.on_delete).upper().strip()
    if action not in ON_DELETE_ACTIONS:
        raise ParameterError(
            f"on_delete must be one of {', '.join(ON_DELETE_ACTIONS)}, got "
            f"{options.on_delete!r}."
        )
    options.on_delete = action
    if not isinstance(options.batch_size, int) or options.batch_size < 1:
        raise ParameterError(
            f"batch_size must be a positive integer, got {options.batch_size!r}."
        )
    return options


def _alter_table(table: Table, actions: list[sql.Composable]) -> sql.Composed:
    # One statement for all subcommands, so a single statement_timeout
    # bounds the whole wait for the locks the subcommands take one by one.
    return sql.SQL("ALTER TABLE {} ").format(table.identifier) + sql.SQL(", ").join(actions)


def _drop_fk_action(name: str) -> sql.Composed:
    return sql.SQL("DROP CONSTRAINT {}").format(sql.Identifier(name))


def _validate_fk(table: Table, name: str) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
        table.identifier, sql.Identifier(name))


def _add_contract_fk_action(name: str, column: str, contracts: Table,
                            on_delete: str) -> sql.Composed:
    return sql.SQL(
        "ADD CONSTRAINT {name} FOREIGN KEY ({col})"
        " REFERENCES {ref} (id) ON DELETE {action} NOT VALID"
    ).format(name=sql.Identifier(name), col=sql.Identifier(column),
             ref=contracts.identifier, action=sql.SQL(on_delete))


def remap_batch_query(table: Table, column: str, invoices: Table,
                      contracts: Table) -> sql.Composed:
    """Return an UPDATE that rewrites up to %(batch)s invoice ids to their contract."""
    return sql.SQL(
        "WITH batch AS ("
        " SELECT t.ctid AS row_ctid, inv.contract_id"
        " FROM {tbl} t JOIN {inv} inv ON inv.id = t.{col}"
        " WHERE inv.contract_id IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM {con} c WHERE c.id = t.{col})"
        " LIMIT %(batch)s FOR UPDATE OF t)"
        " UPDATE {tbl} t SET {col} = batch.contract_id"
        " FROM batch WHERE t.ctid = batch.row_ctid"
    ).format(tbl=table.identifier, col=sql.Identifier(column),
             inv=invoices.identifier, con=contracts.identifier)


def _plan_option_one(table: Table, state: ColumnState, options: MigrationOptions,
                     invoices: Table, contracts: Table) -> list[Step]:
    action_code = ON_DELETE_ACTIONS[options.on_delete]
    contracts_name = contracts.qualified
    matching = [fk for fk in state.foreign_keys
              if _same_table(fk.referenced_table, contracts_name)
              and fk.on_delete == action_code]
    others = [fk for fk in state.foreign_keys if fk not in matching]
    name = matching[0].name if matching else f"{table.name}_{options.column}_fkey"
    relations = [table, invoices, contracts]
    if matching and matching[0].validated and not others:
        return []

    steps = []
    if others or not matching:
        actions = [_drop_fk_action(fk.name) for fk in others]
        dropped = ", ".join(fk.name for fk in others) or "no FK"
        added = ""
        if not matching:
            actions.append(_add_contract_fk_action(name, options.column,
                                                   contracts, options.on_delete))
            added = f" and add {name} NOT VALID"
        steps.append(Step(table.qualified, "ddl",
                          f"{table.qualified}: drop {dropped}{added}",
                          [_alter_table(table, actions)], "ACCESS EXCLUSIVE (brief)",
                          relations))

    if options.remap_invoice_rows:
        steps.append(Step(
            table.qualified, "remap",
            f"{table.qualified}: rewrite invoice ids to their contract in "
            f"batches of {options.batch_size}",
            [remap_batch_query(table, options.column, invoices, contracts)],
            "ROW EXCLUSIVE, one short transaction per batch", relations))

    if not (matching and matching[0].validated):
        steps.append(Step(
            table.qualified, "validate",
            f"{table.qualified}: VALIDATE CONSTRAINT {name}",
            [_validate_fk(table, name)],
            "SHARE UPDATE EXCLUSIVE (inserts continue)", relations))
    return steps


def _plan_option_two(table: Table, state: ColumnState, options: MigrationOptions,
                     invoices: Table, contracts: Table) -> list[Step]:
    actions = []
    if state.not_null:
        actions.append(sql.SQL("ALTER COLUMN {} DROP NOT NULL").format(
            sql.Identifier(options.column)))
    actions += [_drop_fk_action(fk.name) for fk in state.foreign_keys]
    if not actions:
        return []
    names = ", ".join(fk.name for fk in state.foreign_keys) or "no FK"
    return [Step(table.qualified, "ddl",
                 f"{table.qualified}: DROP NOT NULL on {options.column} and drop {names}",
                 [_alter_table(table, actions)], "ACCESS EXCLUSIVE (brief)",
                 [table, invoices, contracts])]


def _same_table(regclass_text: str, qualified: str) -> bool:
    return regclass_text in (qualified, qualified.split(".", 1)[1])


def plan_migration(conn: psycopg.Connection, options: MigrationOptions,
                   check_rows: bool = True) -> Plan:
    """Read the current state and return the steps the option still needs.

    With ``check_rows``, Option 1 also counts the rows VALIDATE would reject
    (one scan per table); without it, only the catalog is read.
    """
    options = validate_options(options)
    tables = catalog.resolve_tables(conn, options.tables, options.schema)
    invoices = catalog.resolve_table(conn, catalog.REFERENCED_INVOICES, options.schema)
    contracts = catalog.resolve_table(conn, catalog.REFERENCED_CONTRACTS, options.schema)

    before, steps, breaking = [], [], []
    for table in tables:
        catalog.resolve_column(conn, table, options.column)
        state = read_column_state(conn, table, options.column)
        check_fk_targets(state, invoices, contracts)
        before.append(state)
        if options.option == 1:
            if options.on_delete == "SET NULL" and state.not_null:
                raise ParameterError(
                    f"on_delete='SET NULL' needs {table.qualified}.{options.column} "
                    f"to be nullable, but it is NOT NULL: deleting a contract "
                    f"would fail. Use CASCADE or RESTRICT."
                )
            table_steps = _plan_option_one(table, state, options, invoices, contracts)
            if check_rows and any(step.kind == "validate" for step in table_steps):
                breaking.append(inspection.find_breaking_rows(conn, table, options.column))
        else:
            table_steps = _plan_option_two(table, state, options, invoices, contracts)
        steps += table_steps

    order = {"ddl": 0, "remap": 1, "validate": 2}
    steps.sort(key=lambda step: order[step.kind])
    return Plan(options.option, before, steps, breaking)


def check_fk_targets(state: ColumnState, invoices: Table, contracts: Table) -> None:
    """Raise ``ParameterError`` if the column has an FK to any other table.

    The fix changes only FKs to invoices or operator_contracts. A column
    with an FK elsewhere (customer_id, say) was named by mistake, and
    dropping its FK would lose a correct constraint.
    """
    for fk in state.foreign_keys:
        if not any(_same_table(fk.referenced_table, t.qualified)
                   for t in (invoices, contracts)):
            raise ParameterError(
                f"{state.table}.{state.column} has FK {fk.name!r} to "
                f"{fk.referenced_table!r}, not to invoices or operator_contracts, "
                f"so it is not the incident's column; nothing was changed. "
                f"Check the column parameter (the incident's column is invoice_id)."
            )


def check_preflight(plan: Plan, options: MigrationOptions) -> None:
    """Raise ``PreflightError`` before any change if VALIDATE would fail."""
    for rows in plan.breaking:
        if not rows.total:
            continue
        if not options.remap_invoice_rows:
            hint = ("Re-run with remap_invoice_rows=True to rewrite them to "
                    "their contract first." if rows.unremappable == 0 else
                    "Some of them cannot be remapped; use Option 2.")
            raise PreflightError(
                f"{rows.table}: {rows.total} row(s) hold an invoice_id that is "
                f"not an operator_contracts id, so VALIDATE CONSTRAINT would "
                f"fail; nothing was changed. {rows.remappable} of them are "
                f"invoice ids whose invoice has a contract. {hint}"
            )
        if rows.unremappable:
            raise PreflightError(
                f"{rows.table}: {rows.unremappable} row(s) hold an invoice_id "
                f"that is neither an operator_contracts id nor an invoice with "
                f"a contract, so the remap cannot fix them and VALIDATE would "
                f"fail; nothing was changed. Inspect them with the inspect "
                f"notebook, or use Option 2."
            )


def render_sql(conn: psycopg.Connection, plan: Plan, options: MigrationOptions) -> str:
    """Return the plan as the SQL text it runs, one transaction per block."""
    settings = options.locks
    blocks = []
    for step in plan.steps:
        lines = [f"-- {step.description}; lock: {step.lock}"]
        if step.kind == "remap":
            lines.append(f"-- repeated until it updates no row, with batch = {options.batch_size}")
        lines.append("BEGIN;")
        lines.append(f"SET LOCAL lock_timeout = '{settings.lock_timeout_ms}ms';")
        lines.append(f"SET LOCAL statement_timeout = '{step_statement_timeout(step, settings)}ms';")
        for statement in step.statements:
            text = statement.as_string(conn)
            if step.kind == "remap":
                text = text.replace("%(batch)s", str(options.batch_size))
            lines.append(text + ";")
        lines.append("COMMIT;")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def step_statement_timeout(step: Step, settings: locks.LockSettings) -> int:
    """Return the statement_timeout of ``step``, in ms.

    A DDL step holds ACCESS EXCLUSIVE on its table while it waits for the
    next lock, and every insert queues behind it, so its whole statement is
    bounded by lock_timeout. VALIDATE and remap batches scan rows under
    weaker locks and get the long statement_timeout.
    """
    if step.kind == "ddl":
        return settings.lock_timeout_ms
    return settings.statement_timeout_ms


def run_step(conn: psycopg.Connection, step: Step, options: MigrationOptions,
             progress=None) -> dict:
    """Run one step with the lock settings; return what it did."""
    started = time.monotonic()
    attempts = 0
    rows = None
    if step.kind == "remap":
        rows = 0
        while True:
            def batch():
                return conn.execute(step.statements[0],
                                    {"batch": options.batch_size}).rowcount
            updated, tries = locks.run_with_retries(
                conn, batch, step.relations, options.locks, step.description)
            attempts += tries
            rows += updated
            if progress is not None:
                progress.update(updated)
            logger.info("%s: %d row(s) remapped so far", step.table, rows)
            if updated == 0:
                break
    else:
        def body():
            for statement in step.statements:
                conn.execute(statement)
        _, attempts = locks.run_with_retries(
            conn, body, step.relations, options.locks, step.description,
            statement_timeout_ms=step_statement_timeout(step, options.locks),
            retry_statement_timeout=step.kind == "ddl")
    logger.info("applied: %s (%d attempt(s))", step.description, attempts)
    return {"table": step.table, "kind": step.kind, "step": step.description,
            "attempts": attempts, "rows_updated": rows,
            "duration_s": round(time.monotonic() - started, 3),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def apply_plan(conn: psycopg.Connection, plan: Plan, options: MigrationOptions,
               output_dir: Path | None, wait_for_other_run_s: float = 10.0) -> list[dict]:
    """Run the pre-flight checks, save the current state, then apply every step.

    Holds the runbook's advisory lock for the whole run. Returns one record
    per step applied; an empty list when the plan has nothing to do.
    """
    check_preflight(plan, options)
    if plan.nothing_to_do:
        return []
    if output_dir is not None:
        save_state(conn, plan, options, output_dir)
    applied = []
    remappable = {rows.table: rows.remappable for rows in plan.breaking}
    with locks.advisory_lock(conn, wait_for_other_run_s):
        # Another run may have finished while this one waited for the lock.
        # The catalog is read again but the rows are not: the pre-flight has
        # just counted them, and VALIDATE rejects any row written since.
        fresh = plan_migration(conn, options, check_rows=False)
        if fresh.nothing_to_do:
            logger.warning("another run applied Option %d while this one waited "
                           "for the advisory lock; nothing left to do", options.option)
        for step in fresh.steps:
            try:
                applied.append(run_planned_step(conn, step, options, remappable))
            except locks.LockRetriesExhausted as exc:
                raise_with_progress(exc, applied, output_dir)
    return applied


def run_planned_step(conn: psycopg.Connection, step: Step, options: MigrationOptions,
                     remappable: dict[str, int]) -> dict:
    """Run one step of ``apply_plan``, with a progress bar for a remap."""
    if step.kind != "remap":
        return run_step(conn, step, options)
    with tqdm(total=remappable.get(step.table, 0), unit="row",
              desc=f"remap {step.table}") as progress:
        return run_step(conn, step, options, progress)


def raise_with_progress(exc: locks.LockRetriesExhausted, applied: list[dict],
                        output_dir: Path | None) -> None:
    """Re-raise ``exc`` saying which earlier steps did commit.

    Each step is its own transaction, so a stop after the first leaves the
    earlier ones applied: a re-run continues from there, and the rollback
    needs the constraints saved before the first step.
    """
    if not applied:
        raise exc
    done = "; ".join(record["step"] for record in applied)
    saved = (f" The definitions from before them are in "
             f"{Path(output_dir) / 'constraints_before.json'}: use that folder "
             f"for a rollback." if output_dir is not None else "")
    raise locks.LockRetriesExhausted(
        f"{exc} Steps committed before this one: {done}. A re-run continues "
        f"from there.{saved}", blockers=exc.blockers, attempts=exc.attempts) from None


def save_state(conn: psycopg.Connection, plan: Plan, options: MigrationOptions,
               output_dir: Path) -> dict[str, Path]:
    """Write the constraint definitions, the planned SQL and a rollback script."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "constraints_before": output_dir / "constraints_before.json",
        "migration_sql": output_dir / "migration.sql",
        "rollback_sql": output_dir / "rollback.sql",
    }
    if paths["constraints_before"].exists():
        # A second run into the same folder must not replace the definitions
        # saved before the first change with the already-changed ones.
        logger.info("keeping the constraint definitions already saved in %s", output_dir)
        return paths
    paths["constraints_before"].write_text(json.dumps(
        {"database": conn.info.dbname, "server": server_identity(conn),
         "option": plan.option,
         "columns": [state.as_dict() for state in plan.before]}, indent=2) + "\n")
    paths["migration_sql"].write_text(render_sql(conn, plan, options))
    paths["rollback_sql"].write_text(render_rollback(conn, plan.before, options))
    logger.info("saved constraint definitions and rollback SQL in %s", output_dir)
    return paths


def server_identity(conn: psycopg.Connection) -> dict:
    """Return host, port and system identifier, so a rollback can tell servers apart.

    The identifier is text because it may exceed 2**53, past which JSON
    readers such as JavaScript lose digits. It is None when this role may
    not call pg_control_system().
    """
    try:
        with conn.transaction():
            identifier = conn.execute(
                "SELECT system_identifier::text FROM pg_control_system()").fetchone()[0]
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFunction):
        identifier = None
    return {"host": conn.info.host, "port": conn.info.port,
            "system_identifier": identifier}


def render_rollback(conn: psycopg.Connection, before: list[ColumnState],
                    options: MigrationOptions) -> str:
    """Return SQL that restores ``before`` after ``options.option`` was applied.

    The old FKs come back NOT VALID first and are validated in a separate
    transaction; validation fails if contract ids were stored meanwhile.
    After Option 2, NOT NULL comes back through a validated CHECK, so SET
    NOT NULL skips its full-table scan under ACCESS EXCLUSIVE.
    """
    settings = options.locks
    lock = f"SET LOCAL lock_timeout = '{settings.lock_timeout_ms}ms';\n"
    # Blocks 1 and 3 take ACCESS EXCLUSIVE and do no scan, so their
    # statements are bounded by lock_timeout as migrate's DDL steps are.
    short = lock + f"SET LOCAL statement_timeout = '{settings.lock_timeout_ms}ms';\n"
    long = lock + f"SET LOCAL statement_timeout = '{settings.statement_timeout_ms}ms';\n"
    phases: list[list[str]] = [[], [], []]
    for state in before:
        schema, name = state.table.split(".", 1)
        table = sql.Identifier(schema, name).as_string(conn)
        column = sql.Identifier(state.column).as_string(conn)
        if options.option == 1:
            added = sql.Identifier(f"{name}_{state.column}_fkey").as_string(conn)
            phases[0].append(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {added};")
        for fk in state.foreign_keys:
            fk_name = sql.Identifier(fk.name).as_string(conn)
            phases[0].append(
                f"ALTER TABLE {table} ADD CONSTRAINT {fk_name} {fk.definition} NOT VALID;")
            if fk.validated:
                phases[1].append(f"ALTER TABLE {table} VALIDATE CONSTRAINT {fk_name};")
        if options.option == 2 and state.not_null:
            check = sql.Identifier(f"{name}_{state.column}_not_null").as_string(conn)
            phases[0].append(f"ALTER TABLE {table} ADD CONSTRAINT {check}"
                             f" CHECK ({column} IS NOT NULL) NOT VALID;")
            phases[1].append(f"ALTER TABLE {table} VALIDATE CONSTRAINT {check};")
            phases[2].append(f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL;")
            phases[2].append(f"ALTER TABLE {table} DROP CONSTRAINT {check};")
    parts = ["-- Rollback: restores the constraints saved in constraints_before.json.\n"
             "-- Run each block as its own transaction, in order. The rollback\n"
             "-- notebook (05-rollback) does the same with pre-flight checks and retries."]
    if phases[0]:
        parts.append("BEGIN;\n" + short + "\n".join(phases[0]) + "\nCOMMIT;")
    # Each VALIDATE scans a whole table, so each gets a transaction of its own.
    parts += ["BEGIN;\n" + long + line + "\nCOMMIT;" for line in phases[1]]
    if phases[2]:
        parts.append("BEGIN;\n" + short + "\n".join(phases[2]) + "\nCOMMIT;")
    return "\n\n".join(parts) + "\n"


def states_frame(states: list[ColumnState]) -> pd.DataFrame:
    """Return one row per FK column and FK, for display."""
    rows = []
    for state in states:
        base = {"table_name": state.table, "column": state.column,
                "not_null": state.not_null}
        if not state.foreign_keys:
            rows.append({**base, "constraint_name": None, "definition": None,
                         "validated": None})
        for fk in state.foreign_keys:
            rows.append({**base, "constraint_name": fk.name,
                         "definition": fk.definition, "validated": fk.validated})
    return pd.DataFrame(rows)


def steps_frame(plan: Plan) -> pd.DataFrame:
    """Return the plan's steps, one row per transaction, for display."""
    return pd.DataFrame(
        [{"step": i, "kind": s.kind, "description": s.description, "lock": s.lock}
         for i, s in enumerate(plan.steps, start=1)],
        columns=["step", "kind", "description", "lock"])


def describe_outcome(mode: str, plan: Plan, applied: list[dict]) -> str:
    """Return one paragraph on what the apply step did."""
    if plan.nothing_to_do:
        return (f"**Nothing to do:** Option {plan.option} is already applied "
                f"on every table, so nothing was changed.")
    if mode == "dry run":
        return (f"**Dry run:** {len(plan.steps)} step(s) planned and nothing "
                f"changed. The SQL is in migration.sql. To apply, set "
                f"dry_run=False and confirm to the database name.")
    if not applied:
        return (f"**Nothing left to do:** another run applied Option {plan.option} "
                f"while this one waited for the advisory lock.")
    retried = sum(record["attempts"] - 1 for record in applied)
    return (f"**Applied** {len(applied)} step(s) of Option {plan.option}"
            f" ({retried} retry(ies) after lock timeouts).")


def describe_conclusion(mode: str, option: int, converged: bool) -> str:
    """Return the closing sentence of the migrate notebook."""
    if converged:
        return (f"**Option {option} is in place:** a new plan finds nothing "
                f"left to do.")
    if mode == "dry run":
        return (f"**Option {option} is not applied yet** (dry run). Re-run with "
                f"dry_run=False and confirm set to apply it.")
    return (f"**Option {option} is only partly applied:** re-run this notebook "
            f"to finish it, or restore with rollback.sql.")
