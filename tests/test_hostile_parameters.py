"""Hostile notebook parameters, each run through papermill on a real database.

Every case must stop with an ``fkrunbook.errors`` class whose message names
the parameter and the value (or states that the value is not shown), and must
leave the constraints, the NOT NULL flags and the rows exactly as they were.
Cases that could change the database if a check were missing (dry_run
False with the right confirm) get a database of their own. The others
share one, and the snapshot taken around each run still catches a change.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import nbformat
import papermill
import psycopg
import pytest
from psycopg import sql

from fkrunbook import chain, connection, demo, errors
from fkrunbook.paths import RUNBOOKS_DIR

FIXTURE_TABLES = demo.FIXTURE_TABLES
RUNBOOK_ERRORS = {name for name in dir(errors)
                  if isinstance(getattr(errors, name), type)
                  and issubclass(getattr(errors, name), errors.RunbookError)}

# Replaced by the test database's name when the case runs.
DATABASE = "<database>"

SECRET = "Hostile-pw-7f3a9c"
SECRET_URL = f"postgresql://oncall:{SECRET}@db.internal:5432/collections"

LOG_WITH_BAD_KEY = """Error registering attempt: {
  code: "23503",
  details: 'Key (invoice_id)=(12345) is not present in table "invoices".',
  message: 'insert or update on table "collection_attempts" violates foreign key constraint "collection_attempts_invoice_id_fkey"'
}"""


@dataclass
class Case:
    """One papermill run that must fail before it changes anything."""

    id: str
    notebook: str
    parameters: dict
    error: str
    fragments: list[str]
    own_database: bool = False
    hidden: str | None = None


def migrate(case_id, error, fragments, own_database=False, **parameters):
    return Case(case_id, "03-migrate", parameters, error, fragments, own_database)


def apply_migrate(case_id, error, fragments, **parameters):
    """A migrate case that would apply: dry_run False and the right confirm."""
    return migrate(case_id, error, fragments, own_database=True,
                   **{"dry_run": False, "confirm": DATABASE, **parameters})


def hiding(case: Case) -> Case:
    """Mark a case whose parameters contain SECRET, which no output may show."""
    case.hidden = SECRET
    return case


CASES = [
    # option
    migrate("option-3", "ParameterError", ["option must be 1", "got 3"], option=3),
    migrate("option-x", "ParameterError", ["option must be 1", "got 'x'"], option="x"),
    # booleans and integers
    migrate("dry-run-maybe", "ParameterError",
            ["dry_run must be True or False", "got 'maybe'", "-p dry_run False"],
            dry_run="maybe"),
    migrate("dry-run-minus-one", "ParameterError",
            ["dry_run must be True or False", "got -1"], dry_run=-1),
    migrate("batch-size-zero", "ParameterError",
            ["batch_size must be at least 1", "got 0"], batch_size=0),
    migrate("batch-size-float", "ParameterError",
            ["batch_size must be an integer", "got 1.5"], batch_size=1.5),
    migrate("lock-timeout-zero", "ParameterError",
            ["lock_timeout_ms must be at least 1", "got 0"], lock_timeout_ms=0),
    apply_migrate("lock-timeout-above-int", "ParameterError",
                  ["lock_timeout_ms must be at most 2147483647", "got 3000000000"],
                  lock_timeout_ms=3_000_000_000),
    # table, column and schema names, and on_delete
    migrate("table-quote-injection", "ParameterError",
            ["Table 'collection_attempts\"; DROP TABLE invoices; --' was not found",
             "matched exactly"],
            tables=['collection_attempts"; DROP TABLE invoices; --']),
    migrate("table-dotted", "ParameterError",
            ["Table 'public.collection_attempts' was not found in schema 'public'"],
            tables=["public.collection_attempts"]),
    migrate("table-mixed-case", "ParameterError",
            ["Table 'Collection_Attempts' was not found", "case and quotes included"],
            tables=["Collection_Attempts"]),
    migrate("tables-empty", "ParameterError",
            ["tables must be a non-empty list", "got []"], tables=[]),
    migrate("table-empty-name", "ParameterError",
            ["Table name must be a non-empty string", "got ''"], tables=[""]),
    migrate("table-unknown", "ParameterError",
            ["Table 'no_such_table' was not found"], tables=["no_such_table"]),
    migrate("column-unknown", "ParameterError",
            ["Column 'no_such_column' was not found in table "
             "'public.collection_attempts'"], column="no_such_column"),
    migrate("schema-unknown", "ParameterError",
            ["Table 'collection_attempts' was not found in schema 'no_such_schema'"],
            schema="no_such_schema"),
    migrate("on-delete-injection", "ParameterError",
            ["on_delete must be one of CASCADE, RESTRICT, NO ACTION, SET NULL",
             "got 'CASCADE; DROP TABLE invoices'"],
            on_delete="CASCADE; DROP TABLE invoices"),
    apply_migrate("on-delete-set-null-not-null", "ParameterError",
                  ["on_delete='SET NULL' needs public.collection_attempts.invoice_id "
                   "to be nullable", "Use CASCADE or RESTRICT"],
                  on_delete="SET NULL"),
    # the confirmation
    migrate("confirm-wrong", "GateError",
            ["confirm is 'production', not the target database",
             "nothing was changed", "set confirm="],
            own_database=True, dry_run=False, confirm="production"),
    migrate("confirm-empty", "GateError",
            ["confirm is nothing, not the target database", "set confirm="],
            own_database=True, dry_run=False, confirm=""),
    # secrets
    hiding(migrate("confirm-url-with-password", "ParameterError",
                   ["Parameter 'confirm' looks like a connection string with a "
                    "password", "its value is not shown"],
                   own_database=True, dry_run=False, confirm=SECRET_URL)),
    hiding(migrate("dry-run-url-with-password", "ParameterError",
                   ["'dry_run' looks like a connection string with a password"],
                   dry_run=SECRET_URL)),
    hiding(migrate("table-in-dict-with-password", "ParameterError",
                   ["'tables' looks like a connection string with a password"],
                   tables={"collection_attempts": SECRET_URL})),
    hiding(migrate("confirm-pgpassword-assignment", "ParameterError",
                   ["'confirm' looks like a connection string with a password"],
                   own_database=True, dry_run=False,
                   confirm=f"PGPASSWORD={SECRET}")),
    # 01-reproduce
    Case("keys-not-uuid", "01-reproduce", {"keys": ["not-a-uuid"]}, "ParameterError",
         ["Key 'not-a-uuid' is not a valid uuid", "Copy the value"]),
    Case("keys-and-log-empty", "01-reproduce", {"keys": [], "log_text": ""},
         "ParameterError", ["No failing key given", "Paste the"]),
    Case("log-text-bad-key", "01-reproduce", {"log_text": LOG_WITH_BAD_KEY},
         "ParameterError", ["Key '12345' is not a valid uuid"]),
    hiding(Case("log-text-with-url-password", "01-reproduce",
                {"log_text": f"connecting to {SECRET_URL}\n{LOG_WITH_BAD_KEY}"},
                "ParameterError", ["'log_text' looks like a connection string",
                                   "its value is not shown"])),
    Case("collector-not-uuid", "01-reproduce", {"collector_id": "nope"},
         "ParameterError", ["collector_id must be a uuid", "got 'nope'"]),
    Case("customer-injection", "01-reproduce",
         {"customer_id": "x'; DELETE FROM customers; --"}, "ParameterError",
         ["customer_id must be a uuid", "DELETE FROM customers"]),
    # 02-inspect
    Case("inspect-schema-empty", "02-inspect", {"schema": ""}, "ParameterError",
         ["Schema name must be a non-empty string", "got ''"]),
    # 04-verify
    Case("history-rows-zero", "04-verify", {"history_rows": 0}, "ParameterError",
         ["history_rows must be at least 1", "got 0"]),
]

# Cases whose check is in the notebook's first code cell, run in-process:
# that cell's source with the parameters set, without a kernel.
FIRST_CELL_CASES = [
    migrate("option-true", "ParameterError", ["option must be 1", "got True"], option=True),
    migrate("option-none", "ParameterError", ["option must be 1", "got None"], option=None),
    migrate("dry-run-list", "ParameterError",
            ["dry_run must be True or False", "got []"], dry_run=[]),
    migrate("remap-float", "ParameterError",
            ["remap_invoice_rows must be True or False", "got 1.5"],
            remap_invoice_rows=1.5),
    migrate("batch-size-negative", "ParameterError",
            ["batch_size must be at least 1", "got -1"], batch_size=-1),
    migrate("batch-size-list", "ParameterError",
            ["batch_size must be an integer", "got []"], batch_size=[]),
    migrate("lock-timeout-maybe", "ParameterError",
            ["lock_timeout_ms must be an integer", "got 'maybe'"],
            lock_timeout_ms="maybe"),
    migrate("max-retries-negative", "ParameterError",
            ["max_retries must be at least 0", "got -1"], max_retries=-1),
    Case("keys-dict", "01-reproduce", {"keys": {"a": 1}}, "ParameterError",
         ["keys must be a list of uuids", "got dict {'a': 1}"]),
    Case("log-text-number", "01-reproduce", {"log_text": 5}, "ParameterError",
         ["log_text must be text, got int"]),
    Case("keep-test-row-maybe", "04-verify", {"keep_test_row": "maybe"},
         "ParameterError", ["keep_test_row must be True or False", "got 'maybe'"]),
    Case("verify-collector-none", "04-verify", {"collector_id": None},
         "ParameterError", ["collector_id must be a uuid", "got None"]),
]

# Cases whose checks live in migration.py, runtime.py and the notebooks.
OTHER_MODULE_CASES = [
    hiding(migrate("option-url-with-password", "ParameterError",
                   ["'option' looks like a connection string with a password"],
                   option=SECRET_URL)),
    migrate("table-semicolons", "ParameterError",
            ["Table 'collection_attempts;payment_promises' was not found"],
            tables="collection_attempts;payment_promises"),
    Case("inspect-second-table-without-column", "02-inspect",
         {"tables": ["collection_attempts", "customers"]}, "ParameterError",
         ["Column 'invoice_id' was not found in table 'public.customers'"]),
    apply_migrate("option-two-other-column", "ParameterError",
                  ["customer_id", "customers"], option=2,
                  tables=["collection_attempts"], column="customer_id"),
    Case("output-dir-is-file", "03-migrate", {}, "ParameterError",
         ["output_dir", "is a file"]),
]


def case_params() -> list:
    params = []
    for case in CASES + OTHER_MODULE_CASES:
        params.append(pytest.param(case, id=case.id))
    return params


@pytest.fixture(scope="module")
def shared_db(pg_server, template_db):
    """One incident-state database for the cases that fail before any change."""
    name = f"h_{uuid.uuid4().hex[:12]}"
    conninfo = demo.create_database(pg_server, name, template=template_db)
    yield conninfo
    demo.drop_database(pg_server, name)


@pytest.fixture
def target_environment(monkeypatch):
    for name in ("DATABASE_URL", "PGPASSWORD", connection.DEMO_URL_VARIABLE,
                 *connection.TARGET_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def snapshot(conninfo: str) -> dict:
    """Return the constraints, NOT NULL flags, row counts and row digests."""
    with psycopg.connect(conninfo) as conn:
        constraints = conn.execute(
            "SELECT conrelid::regclass::text, conname, contype, convalidated,"
            " pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2").fetchall()
        not_null = conn.execute(
            "SELECT attrelid::regclass::text, attname, attnotnull FROM pg_attribute"
            " WHERE attrelid = ANY(%s::regclass[]) AND attnum > 0"
            " AND NOT attisdropped ORDER BY 1, 2", [list(FIXTURE_TABLES)]).fetchall()
        rows = {}
        for table in FIXTURE_TABLES:
            rows[table] = conn.execute(sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY t::text),"
                " '')) FROM {} t").format(sql.Identifier(table))).fetchone()
    return {"constraints": constraints, "not_null": not_null, "rows": rows}


def run_notebook(tmp_path, notebook: str, parameters: dict):
    output = tmp_path / f"{notebook}.ipynb"
    papermill.execute_notebook(
        str(RUNBOOKS_DIR / f"{notebook}.ipynb"), str(output),
        parameters=parameters, kernel_name="python3", cwd=str(RUNBOOKS_DIR),
        progress_bar=False)
    return output


def resolve_parameters(case: Case, database: str, tmp_path) -> dict:
    parameters = {"output_dir": str(tmp_path / "run"), **case.parameters}
    if case.id == "output-dir-is-file":
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the output folder should be\n")
        parameters["output_dir"] = str(blocker)
    return {name: database if value == DATABASE else value
            for name, value in parameters.items()}


def run_first_cell(notebook: str, parameters: dict) -> None:
    """Run a notebook's parameters cell, then its first code cell, in this process."""
    cells = [cell for cell in nbformat.read(RUNBOOKS_DIR / f"{notebook}.ipynb",
                                            as_version=4).cells
             if cell.cell_type == "code"]
    assert "parameters" in cells[0].metadata.get("tags", [])
    namespace: dict = {}
    exec(cells[0].source, namespace)
    namespace.update(parameters)
    try:
        exec(cells[1].source, namespace)
    finally:
        if "run" in namespace:
            namespace["run"].close()


def outputs_text(notebook_path) -> str:
    """Return every cell's source and outputs except papermill's parameter cell.

    NOTE: papermill writes each parameter into the injected-parameters cell
    and into metadata.papermill.parameters before the notebook runs, so a
    password passed as a parameter is in the executed file whatever the
    notebook does. Only the caller, checking before papermill runs, can keep it out.
    """
    notebook = nbformat.read(notebook_path, as_version=4)
    cells = [cell for cell in notebook.cells
             if "injected-parameters" not in cell.metadata.get("tags", [])]
    return json.dumps([{"source": cell.source, "outputs": cell.get("outputs", [])}
                       for cell in cells])


@pytest.mark.parametrize("case", case_params())
def test_hostile_parameter_fails_cleanly(case, request, shared_db, tmp_path,
                                         target_environment):
    conninfo = request.getfixturevalue("incident_db") if case.own_database else shared_db
    target_environment.setenv("DATABASE_URL", conninfo)
    with psycopg.connect(conninfo) as conn:
        database = conn.info.dbname
    parameters = resolve_parameters(case, database, tmp_path)
    before = snapshot(conninfo)

    with pytest.raises(papermill.PapermillExecutionError) as caught:
        run_notebook(tmp_path, case.notebook, parameters)

    assert snapshot(conninfo) == before
    assert caught.value.ename in RUNBOOK_ERRORS, caught.value.evalue
    for fragment in case.fragments:
        assert fragment in caught.value.evalue
    if case.hidden:
        assert case.hidden not in caught.value.evalue
        assert case.hidden not in outputs_text(tmp_path / f"{case.notebook}.ipynb")


def fk_targets(conninfo: str) -> list[tuple]:
    with psycopg.connect(conninfo) as conn:
        return conn.execute(
            "SELECT conrelid::regclass::text, confrelid::regclass::text, convalidated"
            " FROM pg_constraint WHERE contype = 'f' AND conname IN"
            " ('collection_attempts_invoice_id_fkey', 'payment_promises_invoice_id_fkey')"
            " ORDER BY 1").fetchall()


def nullable_columns(conninfo: str) -> list[str]:
    with psycopg.connect(conninfo) as conn:
        return [name for (name,) in conn.execute(
            "SELECT attrelid::regclass::text FROM pg_attribute"
            " WHERE attname = 'invoice_id' AND NOT attnotnull"
            " AND attrelid IN ('collection_attempts'::regclass,"
            " 'payment_promises'::regclass) ORDER BY 1").fetchall()]


def test_string_parameters_apply_option_one(incident_db, tmp_path, target_environment):
    target_environment.setenv("DATABASE_URL", incident_db)
    with psycopg.connect(incident_db) as conn:
        database = conn.info.dbname
    run_notebook(tmp_path, "03-migrate", {
        "option": "1", "dry_run": "False", "confirm": database,
        "remap_invoice_rows": "false", "batch_size": "100",
        "lock_timeout_ms": "250", "max_retries": "3",
        "output_dir": str(tmp_path / "run")})
    assert fk_targets(incident_db) == [
        ("collection_attempts", "operator_contracts", True),
        ("payment_promises", "operator_contracts", True)]
    result = json.loads((tmp_path / "run" / "results" / "migrate.json").read_text())
    assert result["mode"] == "apply"
    assert result["converged"] is True


def test_string_parameters_apply_option_two(incident_db, tmp_path, target_environment):
    target_environment.setenv("DATABASE_URL", incident_db)
    with psycopg.connect(incident_db) as conn:
        database = conn.info.dbname
    run_notebook(tmp_path, "03-migrate", {
        "option": "2", "dry_run": "false", "confirm": database,
        "output_dir": str(tmp_path / "run")})
    assert fk_targets(incident_db) == []
    assert nullable_columns(incident_db) == ["collection_attempts", "payment_promises"]


def test_string_dry_run_true_changes_nothing(shared_db, tmp_path, target_environment):
    target_environment.setenv("DATABASE_URL", shared_db)
    before = snapshot(shared_db)
    run_notebook(tmp_path, "03-migrate", {
        "option": "1", "dry_run": "True", "output_dir": str(tmp_path / "run")})
    assert snapshot(shared_db) == before
    result = json.loads((tmp_path / "run" / "results" / "migrate.json").read_text())
    assert result["mode"] == "dry run"


def test_tables_as_comma_string_plans_both(shared_db, tmp_path, target_environment):
    target_environment.setenv("DATABASE_URL", shared_db)
    run_notebook(tmp_path, "03-migrate", {
        "tables": "collection_attempts, payment_promises",
        "output_dir": str(tmp_path / "run")})
    result = json.loads((tmp_path / "run" / "results" / "migrate.json").read_text())
    assert [state["table"] for state in result["constraints_before"]] == [
        "public.collection_attempts", "public.payment_promises"]


def test_chain_confirm_with_password_leaves_no_trace(shared_db, tmp_path,
                                                     target_environment):
    target_environment.setenv("DATABASE_URL", shared_db)
    before = snapshot(shared_db)
    with pytest.raises((chain.ChainFailed, errors.ParameterError)):
        chain.run_chain(option=1, confirm=SECRET_URL, output_root=tmp_path,
                        progress=lambda line: None)
    assert snapshot(shared_db) == before
    leaks = [str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")
             if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert leaks == []


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id)
                                  for case in FIRST_CELL_CASES])
def test_first_cell_rejects_parameter(case, shared_db, tmp_path, target_environment):
    target_environment.setenv("DATABASE_URL", shared_db)
    parameters = resolve_parameters(case, "unused", tmp_path)
    before = snapshot(shared_db)

    with pytest.raises(errors.RunbookError) as caught:
        run_first_cell(case.notebook, parameters)

    assert snapshot(shared_db) == before
    assert type(caught.value).__name__ == case.error
    for fragment in case.fragments:
        assert fragment in str(caught.value)
