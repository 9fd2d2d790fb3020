"""Tests of the incident report, built from a real run of the notebooks.

One database per module goes through reproduce, inspect, migrate (Option
1, applied), verify and recover (applied, on the demo export) with
papermill, as the chain runs them. The report written from that folder is
then compared with the database it describes.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid

import papermill
import psycopg
import pytest

from fkrunbook import (chain, connection, demo, demo_logs, incident_report, log_analysis,
                       masking, recovery, report)
from fkrunbook.paths import RUNBOOKS_DIR
from fkrunbook.runtime import utc_stamp

NOTEBOOKS = ("01-reproduce", "02-inspect", "03-migrate", "04-verify", "06-recover")


def run_notebooks(folder, dbname: str) -> list[dict]:
    records = []
    for name in NOTEBOOKS:
        params = {"output_dir": str(folder)}
        if name in ("03-migrate", "06-recover"):
            params.update(dry_run=False, confirm=dbname)
        papermill.execute_notebook(
            str(RUNBOOKS_DIR / f"{name}.ipynb"), str(folder / f"{name}.ipynb"),
            parameters=params, kernel_name="python3", cwd=str(RUNBOOKS_DIR),
            progress_bar=False)
        records.append({"notebook": name, "status": "ok"})
    return records


@pytest.fixture(scope="module")
def report_run(pg_server, template_db, tmp_path_factory):
    """Run the notebooks on a fresh database; yield (output folder, conninfo)."""
    dbname = f"r_{uuid.uuid4().hex[:12]}"
    conninfo = demo.create_database(pg_server, dbname, template=template_db)
    folder = tmp_path_factory.mktemp("runs") / f"{utc_stamp()}-option1"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("DATABASE_URL",) + connection.TARGET_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv(connection.DEMO_URL_VARIABLE, conninfo)
        records = run_notebooks(folder, dbname)
    report.write_summary(folder, report.build_summary(folder, 1, records))
    incident_report.write_incident_report(folder)
    yield folder, conninfo
    demo.drop_database(pg_server, dbname)


@pytest.fixture
def report_db(report_run):
    with psycopg.connect(report_run[1], autocommit=True) as conn:
        yield conn


def read_markdown(folder) -> str:
    return (folder / "report.md").read_text(encoding="utf-8")


def markdown_table(text: str, heading: str) -> list[dict]:
    """Return the rows of the first table after ``heading``, as dicts."""
    lines = text.splitlines()
    start = lines.index(heading)
    table = []
    for line in lines[start + 1:]:
        if line.startswith("#") or (table and not line.startswith("|")):
            break
        if line.startswith("|"):
            table.append(line)
    cells = [[re.sub(r"\\(.)", r"\1", cell.strip())
              for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table]
    header, rows = cells[0], cells[2:]
    return [dict(zip(header, row)) for row in rows]


def recovered_from_database(conn) -> list[tuple]:
    return conn.execute(
        "SELECT id::text, customer_id::text, invoice_id::text, created_at"
        " FROM collection_attempts WHERE notes LIKE %s ORDER BY created_at, id",
        [recovery.RECOVERED_NOTE_PREFIX + "%"]).fetchall()


def test_report_files_written(report_run):
    folder, _ = report_run
    assert (folder / "report.md").is_file()
    assert (folder / "report.html").is_file()
    assert (folder / "results" / "recover.json").is_file()


def test_report_attempts_equal_database(report_run, report_db):
    rows = markdown_table(read_markdown(report_run[0]), "### Attempts")
    stored = recovered_from_database(report_db)
    assert [row["attempt_id"] for row in rows] == [row[0] for row in stored]
    assert [row["invoice_id"] for row in rows] == [row[2] for row in stored]
    assert [row["sent"] for row in rows] == [
        f"{row[3]:%Y-%m-%d %H:%M:%S} UTC" for row in stored]
    assert {row["status"] for row in rows} == {"inserted"}


def test_report_recovered_count_equals_database(report_run, report_db):
    text = read_markdown(report_run[0])
    stored = len(recovered_from_database(report_db))
    assert stored > 0
    assert f"{stored} lost attempt(s): {stored} inserted by this run" in text


def test_report_daily_counts_equal_database(report_run, report_db):
    rows = markdown_table(read_markdown(report_run[0]), "### Lost attempts per day (UTC)")
    stored = report_db.execute(
        "SELECT (created_at AT TIME ZONE 'UTC')::date::text, count(*)"
        " FROM collection_attempts WHERE notes LIKE %s GROUP BY 1 ORDER BY 1",
        [recovery.RECOVERED_NOTE_PREFIX + "%"]).fetchall()
    assert [(row["day"], int(row["lost attempts"])) for row in rows] == stored


def test_report_customer_counts_equal_database(report_run, report_db):
    rows = markdown_table(read_markdown(report_run[0]), "### Lost attempts per customer")
    stored = dict(report_db.execute(
        "SELECT customer_id::text, count(*) FROM collection_attempts"
        " WHERE notes LIKE %s GROUP BY 1",
        [recovery.RECOVERED_NOTE_PREFIX + "%"]).fetchall())
    assert {row["customer_id"]: int(row["lost attempts"]) for row in rows} == stored


def test_report_constraints_after_equal_catalog(report_run, report_db):
    rows = markdown_table(read_markdown(report_run[0]), "### Constraints after the fix")
    stored = report_db.execute(
        "SELECT a.attrelid::regclass::text, a.attnotnull::text, c.conname,"
        " c.confrelid::regclass::text, pg_get_constraintdef(c.oid)"
        " FROM pg_attribute a JOIN pg_constraint c ON c.conrelid = a.attrelid"
        " AND c.contype = 'f' AND c.conkey = ARRAY[a.attnum]"
        " WHERE a.attname = 'invoice_id'"
        " AND a.attrelid IN ('collection_attempts'::regclass, 'payment_promises'::regclass)"
        " ORDER BY c.conname").fetchall()
    reported = sorted((row["table"].removeprefix("public."), row["not null"].lower(),
                       row["constraint"], row["references"], row["definition"])
                      for row in rows)
    assert reported == stored


def test_report_constraints_after_is_one_table(report_run):
    text = read_markdown(report_run[0])
    section = text.split("### Constraints after the fix", 1)[1].split("\n#", 1)[0]
    header_rows = [line for line in section.splitlines() if line.startswith("| table |")]
    assert len(header_rows) == 1
    assert "not null" in header_rows[0]


def test_report_constraints_before_equal_incident(report_run, pg_server, template_db):
    rows = markdown_table(read_markdown(report_run[0]), "### Constraints before the fix")
    with psycopg.connect(demo.database_conninfo(pg_server, template_db)) as incident:
        stored = incident.execute(
            "SELECT conname, confrelid::regclass::text, pg_get_constraintdef(oid)"
            " FROM pg_constraint WHERE contype = 'f' AND conname LIKE '%invoice_id_fkey'"
            " ORDER BY conname").fetchall()
    reported = sorted((row["constraint"], row["references"], row["definition"])
                      for row in rows)
    assert reported == stored


def test_report_sql_is_migration_file(report_run):
    folder, _ = report_run
    text = read_markdown(folder)
    migration_sql = (folder / "migration.sql").read_text(encoding="utf-8").rstrip("\n")
    assert f"```sql\n{migration_sql}\n```" in text


def test_report_timeline_failures_equal_export(report_run, report_db):
    analysis = log_analysis.analyse_export(demo_logs.demo_export(report_db))
    rows = markdown_table(read_markdown(report_run[0]), "## Timeline")
    times = {row["event"]: row["time"] for row in rows}
    first = analysis.first_failure.strftime("%Y-%m-%d %H:%M:%S UTC")
    last = analysis.last_failure.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert times["First 23503 in the function logs"] == first
    assert times["Last 23503 in the function logs"] == last
    assert times["Lost attempts inserted"].endswith(" UTC")


def test_report_verification_equal_summary(report_run):
    folder, _ = report_run
    summary = json.loads((folder / "summary.json").read_text())
    rows = markdown_table(read_markdown(folder), "## Verification")
    assert {row["check"]: row["result"] for row in rows} == {
        name: "yes" if value else "no" for name, value in summary["checks"].items()}


def customer_names(conn) -> list[str]:
    return [name for (name,) in conn.execute(
        "SELECT DISTINCT cu.name FROM collection_attempts a"
        " JOIN customers cu ON cu.id = a.customer_id WHERE a.notes LIKE %s",
        [recovery.RECOVERED_NOTE_PREFIX + "%"]).fetchall()]


def test_report_masks_names_by_default(report_run, report_db):
    text = read_markdown(report_run[0])
    html_text = (report_run[0] / "report.html").read_text(encoding="utf-8")
    for name in customer_names(report_db):
        assert name not in text
        assert name not in html_text
        assert masking.mask_name(name) in text


def test_report_shows_names_on_request(report_run, report_db, tmp_path):
    folder = tmp_path / report_run[0].name
    shutil.copytree(report_run[0], folder)
    incident_report.write_incident_report(folder, show_names=True)
    text = read_markdown(folder)
    for name in customer_names(report_db):
        assert name in text


def test_report_has_no_phone_or_message(report_run, report_db):
    folder, _ = report_run
    phones = [phone for (phone,) in report_db.execute(
        "SELECT phone FROM customers").fetchall()]
    written = {path.name: path.read_text(encoding="utf-8")
               for path in [folder / "report.md", folder / "report.html",
                            folder / "results" / "recover.json",
                            folder / "06-recover.ipynb"]}
    for name, text in written.items():
        assert [phone for phone in phones if phone in text] == [], name
        assert "consta um valor" not in text, name


def test_report_has_no_password(report_run, tmp_path):
    folder = tmp_path / report_run[0].name
    shutil.copytree(report_run[0], folder)
    summary = json.loads((folder / "summary.json").read_text())
    summary["target"]["password"] = "s3cret-pw"
    summary["target"]["conninfo"] = "postgresql://app:s3cret-pw@db.example/incident"
    (folder / "summary.json").write_text(json.dumps(summary))
    paths = incident_report.write_incident_report(folder)
    for path in paths.values():
        text = path.read_text(encoding="utf-8")
        assert "s3cret-pw" not in text
        assert "password" not in text.lower()


def test_report_without_recover(report_run, tmp_path):
    folder = tmp_path / report_run[0].name
    shutil.copytree(report_run[0], folder)
    (folder / "results" / "recover.json").unlink()
    incident_report.write_incident_report(folder)
    text = read_markdown(folder)
    assert "The recover notebook did not run for this folder" in text
    assert "First 23503 in the function logs" not in text


def test_report_fix_time_when_recorded(report_run, tmp_path):
    folder = tmp_path / report_run[0].name
    shutil.copytree(report_run[0], folder)
    migrate = report.read_result(folder, "migrate")
    migrate["applied_at"] = "2026-11-11T12:30:05+00:00"
    report.write_result(folder, "migrate", migrate)
    incident_report.write_incident_report(folder)
    rows = markdown_table(read_markdown(folder), "## Timeline")
    assert {row["event"]: row["time"] for row in rows}["Fix applied (Option 1)"] == \
        "2026-11-11 12:30:05 UTC"


def test_report_fix_time_from_last_step(report_run, tmp_path):
    folder = tmp_path / report_run[0].name
    shutil.copytree(report_run[0], folder)
    migrate = report.read_result(folder, "migrate")
    migrate.pop("applied_at")
    migrate["applied"][-1]["finished_at"] = "2026-11-11T12:31:00+00:00"
    report.write_result(folder, "migrate", migrate)
    incident_report.write_incident_report(folder)
    rows = markdown_table(read_markdown(folder), "## Timeline")
    assert {row["event"]: row["time"] for row in rows}["Fix applied (Option 1)"] == \
        "2026-11-11 12:31:00 UTC"


def test_report_fix_time_from_migrate(report_run):
    migrate = report.read_result(report_run[0], "migrate")
    rows = markdown_table(read_markdown(report_run[0]), "## Timeline")
    times = {row["event"]: row["time"] for row in rows}
    assert times["Fix applied (Option 1)"] == incident_report.format_time(migrate["applied_at"])


def test_report_fix_time_missing(report_run, tmp_path):
    folder = tmp_path / report_run[0].name
    shutil.copytree(report_run[0], folder)
    migrate = report.read_result(folder, "migrate")
    migrate.pop("applied_at")
    for step in migrate["applied"]:
        step.pop("finished_at")
    report.write_result(folder, "migrate", migrate)
    incident_report.write_incident_report(folder)
    rows = markdown_table(read_markdown(folder), "## Timeline")
    times = {row["event"]: row["time"] for row in rows}
    assert times["Fix applied (Option 1)"] == "applied; the time was not recorded"


def test_report_names_demo_export(report_run):
    text = read_markdown(report_run[0])
    assert "record(s) read from the synthetic demo export (json lines)" in text


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    """Run the demo chain with a key that reproduce rejects; return its folder."""
    root = tmp_path_factory.mktemp("failed")
    bad_keys = {"01-reproduce": {"keys": ["not-a-uuid"]}}
    with pytest.raises(chain.ChainFailed) as raised:
        chain.run_chain(option=1, use_demo=True, output_root=root,
                        extra_parameters=bad_keys, progress=lambda line: None)
    return raised.value.output_dir


def test_report_failed_run_says_so_first(failed_run):
    text = read_markdown(failed_run)
    summary = json.loads((failed_run / "summary.json").read_text())
    first_line = summary["failed"].splitlines()[0]
    assert text.index("## Run failed") < text.index("## Timeline")
    assert incident_report.escape_markdown(f"The chain stopped: {first_line}") in text
    assert "01-reproduce failed in cell" in text


def test_report_failed_run_lists_notebooks(failed_run):
    rows = markdown_table(read_markdown(failed_run), "## Run failed")
    assert [(row["notebook"], row["status"]) for row in rows] == [("01-reproduce", "failed")]


def test_report_failed_run_claims_no_fix(failed_run):
    text = read_markdown(failed_run)
    assert "Fix chosen" not in text
    assert "Option 1 was requested, but the migrate notebook did not run" in text


def test_report_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        incident_report.write_incident_report(tmp_path / "nothing")


def test_report_empty_folder(tmp_path):
    paths = incident_report.write_incident_report(tmp_path)
    text = paths["markdown"].read_text(encoding="utf-8")
    assert "Not available: results/migrate.json" in text


BLOCKS = [incident_report.Heading(1, "Report <b>"),
          incident_report.Paragraph("5 < 6 & <script>alert(1)</script> *bold* a_b _c_"),
          incident_report.Table(["a|b", "c"], [["<i>x</i>", None], ["p|q", 3]]),
          incident_report.Code("SELECT '<tag>' AS x;\n```", "sql")]


@pytest.mark.parametrize("renderer", ["mistune", "html.escape"])
def test_html_escapes_values(renderer):
    markdown_text = incident_report.render_markdown(BLOCKS)
    if renderer == "mistune":
        body = incident_report.markdown_to_html(markdown_text)
    else:
        body = incident_report.render_html_body(BLOCKS)
    assert "<script>" not in body
    assert "&lt;script&gt;" in body
    assert "<i>" not in body
    assert "<strong>" not in body
    assert "<em>" not in body
    assert "p|q" in body
    assert "&lt;tag&gt;" in body


def test_markdown_escapes_cells():
    markdown_text = incident_report.render_markdown(BLOCKS)
    assert "| a\\|b | c |" in markdown_text
    assert "\\*bold\\*" in markdown_text
    assert "a_b \\_c\\_" in markdown_text
    assert "````sql" in markdown_text
