"""The whole chain run with papermill, in demo mode and against a target."""

import json

import nbformat
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from fkrunbook import chain

FK_QUERY = """
SELECT conrelid::regclass::text, confrelid::regclass::text, convalidated, confdeltype
FROM pg_constraint
WHERE contype = 'f' AND conname IN ('collection_attempts_invoice_id_fkey',
                                    'payment_promises_invoice_id_fkey')
ORDER BY 1
"""


def run(tmp_path, **kwargs):
    return chain.run_chain(output_root=tmp_path, progress=lambda line: None, **kwargs)


@pytest.fixture
def target(incident_db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", incident_db)
    return incident_db


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo chain for Option 1 with recover, shared by the tests that only read it."""
    return run(tmp_path_factory.mktemp("demo"), option=1, use_demo=True, recover=True)


def dbname(conninfo):
    return conninfo_to_dict(conninfo)["dbname"]


def fks(conninfo):
    with psycopg.connect(conninfo) as conn:
        return conn.execute(FK_QUERY).fetchall()


def nullable(conninfo, table):
    with psycopg.connect(conninfo) as conn:
        return not conn.execute("SELECT attnotnull FROM pg_attribute WHERE attrelid = %s::regclass"
                                " AND attname = 'invoice_id'", [table]).fetchone()[0]


def test_demo_chain_writes_every_file(demo_run):
    result = demo_run
    names = sorted(p.name for p in result.output_dir.iterdir())
    for notebook in chain.NOTEBOOKS:
        assert f"{notebook}.ipynb" in names
        assert f"{notebook}.html" in names
    assert "summary.json" in names
    assert "rollback.sql" in names
    assert "06-recover.html" in names
    assert "report.md" in names
    assert "report.html" in names
    assert result.output_dir.name.endswith("-option1")


def test_demo_chain_summary_records_findings(demo_run):
    result = demo_run
    summary = json.loads((result.output_dir / "summary.json").read_text())
    key = "2f44c1c9-9c8b-4c76-b56c-527f5242cafd"
    assert summary["keys"] == [key]
    assert summary["key_tables"] == {key: ["public.operator_contracts"]}
    assert summary["recommendation"]["option"] == 1
    assert summary["checks_passed"] is True
    assert [c["kind"] for c in summary["changes"]] == ["ddl", "ddl", "validate", "validate"]
    after = {(c["table_name"], c["referenced_table"], c["validated"])
             for c in summary["constraints_after"] if c["columns"] == "invoice_id"}
    assert after == {("collection_attempts", "operator_contracts", True),
                     ("payment_promises", "operator_contracts", True)}


def test_demo_chain_notebooks_show_expected_results(demo_run):
    result = demo_run
    reproduce = nbformat.read(result.output_dir / "01-reproduce.ipynb", as_version=4)
    text = json.dumps([c.get("outputs", []) for c in reproduce.cells])
    assert "ForeignKeyViolation" in text
    verify = json.loads((result.output_dir / "results" / "verify.json").read_text())
    assert verify["on_top"] is True
    assert verify["history"][0]["new"] is True


def test_target_chain_option_one_repoints_fks(tmp_path, target):
    run(tmp_path, option=1, confirm=dbname(target))
    assert fks(target) == [
        ("collection_attempts", "operator_contracts", True, "c"),
        ("payment_promises", "operator_contracts", True, "c")]


def test_target_chain_option_two_drops_fks(tmp_path, target):
    result = run(tmp_path, option=2, confirm=dbname(target))
    assert fks(target) == []
    assert nullable(target, "collection_attempts")
    assert nullable(target, "payment_promises")
    assert result.summary["checks_passed"] is True


def test_target_chain_without_confirm_is_dry_run(tmp_path, target):
    result = run(tmp_path, option=1)
    assert fks(target) == [("collection_attempts", "invoices", True, "a"),
                           ("payment_promises", "invoices", True, "a")]
    assert result.summary["applied"] is False
    assert result.summary["notebooks"][-1]["status"] == "skipped"


def test_chain_stops_on_rows_that_break_validate(tmp_path, target):
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO collection_attempts (customer_id, invoice_id, collector_id, channel, status)"
            " SELECT customer_id, id, gen_random_uuid(), 'telefone', 'sent' FROM invoices"
            " WHERE id <> contract_id ORDER BY id LIMIT 5")
        database = conn.info.dbname
    with pytest.raises(chain.ChainFailed) as caught:
        run(tmp_path, option=1, confirm=database)
    message = str(caught.value)
    assert message.startswith("03-migrate failed in cell")
    assert "PreflightError" in message
    assert fks(target)[0][1] == "invoices"
    assert (caught.value.output_dir / "03-migrate.html").exists()
    summary = json.loads((caught.value.output_dir / "summary.json").read_text())
    assert summary["failed"] == message

    run(tmp_path, option=1, remap=True, confirm=database)
    assert fks(target)[0][1:3] == ("operator_contracts", True)


def test_chain_outputs_never_contain_password(tmp_path, pg_server, incident_db, monkeypatch):
    password = "s3cret-Pa55word-for-tests"
    with psycopg.connect(incident_db, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE runbook_oncall LOGIN SUPERUSER PASSWORD '{password}'")
        database = conn.info.dbname
    try:
        url = incident_db.replace("postgres:@", f"runbook_oncall:{password}@", 1)
        monkeypatch.setenv("DATABASE_URL", url)
        result = run(tmp_path, option=1, confirm=database)
    finally:
        with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE usename = 'runbook_oncall'")
            admin.execute("DROP ROLE runbook_oncall")
    hits = [p for p in result.output_dir.rglob("*") if p.is_file()
            and password in p.read_text(errors="replace")]
    assert hits == []


def test_demo_chain_recovers_lost_attempts(demo_run):
    summary = demo_run.summary
    assert summary["checks"]["lost_attempts_recovered"] is True
    assert summary["recovery"]["inserted"] == summary["recovery"]["lost"]
    assert summary["recovery"]["lost"] > 0


def test_demo_chain_report_names_root_cause(demo_run):
    text = (demo_run.output_dir / "report.md").read_text()
    assert "## Root cause" in text
    assert "collection_attempts_invoice_id_fkey" in text


def test_chain_rerun_after_fix_passes(tmp_path, target):
    run(tmp_path / "first", option=1, confirm=dbname(target))
    result = run(tmp_path / "second", option=1, confirm=dbname(target))
    assert result.summary["checks_passed"] is True
    assert result.summary["checks"]["reproduced_23503"] is None
    assert result.summary["changes"] == []
