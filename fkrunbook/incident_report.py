"""Write the incident report from a run's output folder.

The report is built only from the files the notebooks wrote there:
``summary.json``, ``results/<step>.json``, ``constraints_before.json`` and
``migration.sql``. It is written twice, as ``report.md`` and as
``report.html``. A missing file leaves its section saying which file is
missing, and a chain that stopped at a failed notebook is named at the top.
The target is described by host, port, database and user only.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import report
from .masking import mask_name
from .recovery import DEMO_SOURCE, describe_fk_state

REPORT_TITLE = "Incident report: 23503 on collection_attempts_invoice_id_fkey"
TARGET_FIELDS = ("host", "port", "database", "user")
STEPS = ("reproduce", "inspect", "migrate", "verify", "recover")
_FOLDER_STAMP = re.compile(r"^(\d{8}T\d{6}Z)-")


# --- the report's building blocks -------------------------------------------

@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list]


@dataclass
class Code:
    text: str
    language: str = ""


@dataclass
class BulletList:
    items: list[str] = field(default_factory=list)


# --- reading the folder -----------------------------------------------------

@dataclass
class RunFiles:
    """The files of one output folder; None where a file is missing."""

    folder: Path
    summary: dict | None
    results: dict[str, dict | None]
    constraints_before: dict | None
    migration_sql: str | None

    def result(self, step: str) -> dict:
        return self.results.get(step) or {}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_run_files(output_dir) -> RunFiles:
    """Read the files the notebooks and the chain wrote in ``output_dir``."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"output folder {str(folder)!r} does not exist. Pass the folder that "
            f"a chain or notebook run wrote, such as outputs/<UTC time>-option1.")
    sql_path = folder / "migration.sql"
    return RunFiles(
        folder=folder,
        summary=_read_json(folder / "summary.json"),
        results={step: report.read_result(folder, step) for step in STEPS},
        constraints_before=_read_json(folder / "constraints_before.json"),
        migration_sql=sql_path.read_text(encoding="utf-8") if sql_path.is_file() else None,
    )


def _target(files: RunFiles) -> dict:
    sources = [files.summary or {}] + [files.result(step) for step in STEPS]
    for source in sources:
        target = source.get("target")
        if target:
            return {name: target.get(name) for name in TARGET_FIELDS}
    return {}


def format_time(value) -> str:
    """Return an ISO timestamp as ``YYYY-MM-DD HH:MM:SS UTC``, or a dash."""
    if not value:
        return "-"
    moment = dt.datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _folder_time(folder: Path) -> str | None:
    match = _FOLDER_STAMP.match(folder.name)
    if not match:
        return None
    moment = dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ")
    return moment.replace(tzinfo=dt.timezone.utc).isoformat()


# --- the sections -----------------------------------------------------------

def _missing(name: str) -> Paragraph:
    return Paragraph(f"Not available: {name} is not in this output folder.")


def header_section(files: RunFiles) -> list:
    target = _target(files)
    where = ", ".join(f"{name} {target[name]}" for name in TARGET_FIELDS
                      if target.get(name) is not None) or "not recorded"
    blocks = [Heading(1, REPORT_TITLE),
              Paragraph(f"Output folder: {files.folder.name}. Target: {where}. "
                        f"{_fix_sentence(files)}")]
    summary = files.summary or {}
    if summary.get("failed"):
        blocks += _failure_blocks(summary)
    return blocks


def _fix_sentence(files: RunFiles) -> str:
    migrate = files.result("migrate")
    option = migrate.get("option") or (files.summary or {}).get("option")
    if not option:
        return "Fix chosen: (not recorded)."
    if not migrate:
        return (f"Option {option} was requested, but the migrate notebook did "
                f"not run, so no fix was applied.")
    return f"Fix chosen: Option {option}."


def _failure_blocks(summary: dict) -> list:
    # The chain stores "<notebook> failed in cell <n>: <error>" and then
    # "Executed notebook: <path>" on a second line.
    lines = [line for line in str(summary["failed"]).splitlines() if line.strip()]
    notebooks = summary.get("notebooks") or []
    blocks = [Heading(2, "Run failed"),
              Paragraph(f"The chain stopped: {lines[0] if lines else 'no message recorded'}")]
    blocks += [Paragraph(line) for line in lines[1:]]
    blocks.append(Table(["notebook", "status", "seconds"],
                        [[item.get("notebook"), item.get("status"), item.get("seconds")]
                         for item in notebooks]))
    blocks.append(Paragraph(
        "The chain stops at the first notebook that fails, so the notebooks "
        "after it did not run, and the sections below show only what the "
        "notebooks listed above recorded."))
    return blocks


def timeline_section(files: RunFiles) -> list:
    recover = files.result("recover")
    migrate = files.result("migrate")
    rows = []
    if recover:
        rows.append(["First 23503 in the function logs",
                     format_time(recover.get("first_failure")), "results/recover.json"])
        rows.append(["Last 23503 in the function logs",
                     format_time(recover.get("last_failure")), "results/recover.json"])
    started = _folder_time(files.folder)
    if started:
        rows.append(["Run started", format_time(started), "output folder name"])
    rows.append(["Fix applied" + (f" (Option {migrate['option']})" if migrate else ""),
                 _applied_time(migrate), "results/migrate.json"])
    verified = _verified_time(files.result("verify"))
    if verified:
        rows.append(["App insert verified", format_time(verified),
                     "results/verify.json"])
    if recover:
        rows.append([_recovery_event(recover), format_time(recover.get("recorded_at")),
                     "results/recover.json"])
    return [Heading(2, "Timeline"), Table(["event", "time", "source"], rows)]


def _applied_time(migrate: dict) -> str:
    if not migrate:
        return "migrate did not run"
    if migrate.get("mode") != "apply":
        return "not applied (dry run)"
    if not migrate.get("applied"):
        return "nothing to apply (already in place)"
    # The notebook's applied_at, else the end of the last step applied.
    applied_at = migrate.get("applied_at") or migrate["applied"][-1].get("finished_at")
    if applied_at:
        return format_time(applied_at)
    return "applied; the time was not recorded"


def _verified_time(verify: dict) -> str | None:
    # The test row's created_at is the verification time, kept or rolled back.
    for row in verify.get("history") or []:
        if row.get("new"):
            return row.get("created_at")
    return None


def _recovery_event(recover: dict) -> str:
    if recover.get("blocked"):
        return "Recovery refused: the FK still rejected keys"
    if recover.get("mode") == "apply":
        return "Lost attempts inserted"
    return "Lost attempts listed (dry run)"


def root_cause_section(files: RunFiles) -> list:
    reproduce = files.result("reproduce")
    fk = _incident_fk(files)
    recover = files.result("recover")
    if not reproduce and not fk:
        return [Heading(2, "Root cause"), _missing("results/reproduce.json")]
    if fk and reproduce.get("keys_in_operator_contracts", True):
        first = (f"The app writes operator_contracts ids into {fk['table']}."
                 f"{fk['column']}, but {fk['name']} referenced "
                 f"{fk['referenced_table']}(id), so every insert for a contract "
                 f"with no invoice of the same id failed with SQLSTATE 23503.")
    else:
        first = reproduce.get("root_cause") or "The root cause was not recorded."
    found = (f", {recover.get('lost', 0)} of them found in the function logs"
             if recover else "")
    second = ("The WhatsApp message had already gone out through n8n, so each "
              f"failure left a sent message with no row in collection_attempts{found}.")
    return [Heading(2, "Root cause"), Paragraph(f"{first} {second}")]


def _incident_fk(files: RunFiles) -> dict | None:
    columns = (files.constraints_before or {}).get("columns") or \
        files.result("migrate").get("constraints_before") or []
    for column in columns:
        if column["table"].endswith(".collection_attempts"):
            for fk in column["foreign_keys"]:
                return {"table": column["table"].split(".")[-1],
                        "column": column["column"], **fk}
    return None


_NO_FK = {"name": "(no FK)", "referenced_table": "-", "definition": "-", "validated": "-"}


def evidence_section(files: RunFiles) -> list:
    blocks = [Heading(2, "Evidence"), Heading(3, "Constraints before the fix")]
    columns = (files.constraints_before or {}).get("columns") or \
        files.result("migrate").get("constraints_before")
    if columns:
        blocks.append(_column_table(columns))
    else:
        blocks.append(_missing("constraints_before.json"))

    blocks.append(Heading(3, "Constraints after the fix"))
    blocks += _constraints_after(files)
    blocks += _key_blocks(files)
    return blocks


def _column_table(columns: list[dict]) -> Table:
    rows = [[c["table"], c["column"], c["not_null"], fk["name"], fk["referenced_table"],
             fk["definition"], fk["validated"]]
            for c in columns for fk in (c["foreign_keys"] or [_NO_FK])]
    return Table(["table", "column", "not null", "constraint", "references",
                  "definition", "validated"], rows)


def _constraints_after(files: RunFiles) -> list:
    # The per-column table also shows NOT NULL, which Option 2 drops, so it
    # replaces migrate's FK list when the notebook recorded both.
    migrate = files.result("migrate")
    if migrate.get("columns_after"):
        return [_column_table(migrate["columns_after"])]
    after = migrate.get("constraints_after")
    if after is not None:
        rows = [[fk["table_name"], fk["columns"], fk["constraint_name"],
                 fk["referenced_table"], fk["definition"], fk["validated"]] for fk in after]
        return [Table(["table", "columns", "constraint", "references",
                       "definition", "validated"], rows)]
    blocks = [_missing("results/migrate.json")]
    fk_state = files.result("recover").get("fk_state")
    if fk_state:
        blocks.append(Paragraph(f"Read by the recover notebook: {describe_fk_state(fk_state)}"))
    return blocks


def _key_blocks(files: RunFiles) -> list:
    blocks = [Heading(3, "Failing keys and the tables that contain them")]
    reproduce = files.result("reproduce")
    if reproduce:
        outcomes = {row["key"]: row for row in reproduce.get("reproduce", [])}
        rows = [[key, ", ".join(tables) or "(no table)",
                 outcomes.get(key, {}).get("outcome", "-"),
                 outcomes.get(key, {}).get("sqlstate") or "-"]
                for key, tables in reproduce.get("owners", {}).items()]
        blocks.append(Table(["key", "found in", "app insert", "sqlstate"], rows))
    else:
        blocks.append(_missing("results/reproduce.json"))

    blocks.append(Heading(3, "Provenance of the stored invoice_id values"))
    provenance = files.result("inspect").get("provenance")
    if provenance:
        blocks.append(Table(["table", "found in", "rows"],
                            [[p["table_name"], p["found_in"], p["rows"]] for p in provenance]))
    else:
        blocks.append(_missing("results/inspect.json"))
    return blocks


def sql_section(files: RunFiles) -> list:
    blocks = [Heading(2, "SQL applied")]
    migrate = files.result("migrate")
    applied = migrate.get("applied") or []
    if not migrate:
        return blocks + [_missing("results/migrate.json")]
    if migrate.get("mode") != "apply":
        blocks.append(Paragraph("Dry run: the SQL below was planned and not applied."))
    elif not applied:
        blocks.append(Paragraph("Nothing was applied: the option was already in place."))
        return blocks
    else:
        blocks.append(Paragraph(f"{len(applied)} transaction(s) applied, as saved in "
                                f"migration.sql:"))
        blocks.append(Table(["table", "kind", "step", "attempts", "duration (s)"],
                            [[s["table"], s["kind"], s["step"], s["attempts"],
                              s["duration_s"]] for s in applied]))
    if files.migration_sql:
        blocks.append(Code(files.migration_sql.rstrip("\n"), "sql"))
    else:
        blocks.append(_missing("migration.sql"))
    return blocks


def verification_section(files: RunFiles) -> list:
    blocks = [Heading(2, "Verification")]
    checks = (files.summary or {}).get("checks")
    if checks:
        blocks.append(Table(["check", "result"],
                            [[name, _yes_no(value)] for name, value in checks.items()]))
    verify = files.result("verify")
    if not verify:
        return blocks + [_missing("results/verify.json")]
    realtime = verify.get("realtime") or {}
    blocks.append(Table(
        ["key", "app insert", "attempt on top of history", "test row kept",
         "collection_attempts in supabase_realtime"],
        [[verify.get("key"), verify.get("outcome"), _yes_no(verify.get("on_top")),
          _yes_no(verify.get("kept")), _yes_no(realtime.get("table_published"))]]))
    return blocks


def _yes_no(value) -> str:
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if value is None:
        return "-"
    return str(value)


def recovery_section(files: RunFiles, show_names: bool) -> list:
    blocks = [Heading(2, "Recovered attempts")]
    recover = files.result("recover")
    if not recover:
        return blocks + [Paragraph(
            "The recover notebook did not run for this folder "
            "(no results/recover.json), so the lost attempts are not counted.")]
    source = recover["source"]
    origin = f"the {DEMO_SOURCE}" if source == DEMO_SOURCE else source
    blocks.append(Paragraph(
        f"{recover['records']} record(s) read from {origin} "
        f"({recover['export_format']}), pairing window {recover['pairing_window_s']:g} s. "
        f"{recover['lost']} lost attempt(s): {_recovery_figures(recover)}."))
    blocks += [Paragraph(f"Warning: {warning}") for warning in recover.get("warnings") or []]
    if recover.get("blocked"):
        blocks.append(Paragraph(f"Not inserted: {recover['blocked']}"))
    blocks.append(Table(["log records and outcomes", "count"],
                        [[name, count] for name, count in
                         list(recover["counts"].items()) + list(recover["outcomes"].items())]))
    blocks += _recovery_tables(recover, show_names)
    return blocks


def _recovery_figures(recover: dict) -> str:
    present = recover["already_present"]
    if recover["mode"] == "dry run":
        return (f"{recover['lost'] - present} to insert and {present} already "
                f"present (dry run, nothing inserted)")
    return f"{recover['inserted']} inserted by this run and {present} already present"


def _customer_label(row: dict, show_names: bool) -> str:
    name = row.get("customer_name")
    return name if show_names and name else mask_name(name)


def _recovery_tables(recover: dict, show_names: bool) -> list:
    customers = {row["customer_id"]: row for row in recover.get("customers", [])}
    blocks = [Heading(3, "Lost attempts per day (UTC)"),
              Table(["day", "lost attempts"],
                    [[row["day"], row["lost_attempts"]] for row in recover.get("daily", [])]),
              Heading(3, "Lost attempts per customer"),
              Table(["customer", "customer_id", "lost attempts", "first sent", "last sent"],
                    [[_customer_label(row, show_names), row["customer_id"],
                      row["lost_attempts"], format_time(row["first_sent"]),
                      format_time(row["last_sent"])] for row in customers.values()]),
              Heading(3, "Attempts"),
              Table(["attempt_id", "customer", "invoice_id", "sent", "status"],
                    [[row["attempt_id"],
                      _customer_label(customers.get(row["customer_id"], {}), show_names),
                      row["invoice_id"], format_time(row["sent_at"]), row["status"]]
                     for row in recover.get("attempts", [])])]
    if recover.get("unparsed"):
        blocks += [Heading(3, "Records not parsed"),
                   Table(["record", "time", "reason"],
                         [[row["number"], format_time(row.get("timestamp")), row["reason"]]
                          for row in recover["unparsed"]])]
    if recover.get("unpaired"):
        blocks += [Heading(3, "23503s without a request (not recovered)"),
                   Table(["record", "time", "key", "reason"],
                         [[row["number"], format_time(row["timestamp"]), row["key"],
                           row["reason"]] for row in recover["unpaired"]])]
    return blocks


def build_report(files: RunFiles, show_names: bool = False) -> list:
    """Return the report as a list of blocks, section by section."""
    return (header_section(files) + timeline_section(files) + root_cause_section(files)
            + evidence_section(files) + sql_section(files)
            + verification_section(files) + recovery_section(files, show_names))


# --- rendering --------------------------------------------------------------

# Characters that would start emphasis, code, links, HTML or table cells.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>|&~])")
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def escape_markdown(value) -> str:
    """Return ``value`` as Markdown text that renders literally."""
    text = "-" if value is None else str(value)
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text.replace("\n", " "))
    return _EDGE_UNDERSCORE.sub(r"\\_", text)


def _code_fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(blocks: list) -> str:
    """Return the blocks as CommonMark with pipe tables."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {escape_markdown(block.text)}")
        elif isinstance(block, Paragraph):
            parts.append(escape_markdown(block.text))
        elif isinstance(block, Table):
            parts.append(_markdown_table(block))
        elif isinstance(block, Code):
            fence = _code_fence(block.text)
            parts.append(f"{fence}{block.language}\n{block.text}\n{fence}")
        elif isinstance(block, BulletList):
            parts.append("\n".join(f"- {escape_markdown(item)}" for item in block.items))
    return "\n\n".join(parts) + "\n"


def _markdown_table(table: Table) -> str:
    if not table.rows:
        return "(none)"
    lines = ["| " + " | ".join(escape_markdown(c) for c in table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(escape_markdown(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)


def render_html_body(blocks: list) -> str:
    """Return the blocks as HTML, every value escaped with ``html.escape``."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, Code):
            language = f' class="language-{html.escape(block.language)}"' if block.language else ""
            parts.append(f"<pre><code{language}>{html.escape(block.text)}\n</code></pre>")
        elif isinstance(block, BulletList):
            items = "".join(f"<li>{html.escape(item)}</li>" for item in block.items)
            parts.append(f"<ul>{items}</ul>")
    return "\n".join(parts) + "\n"


def _html_table(table: Table) -> str:
    if not table.rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('-' if v is None else str(v))}</td>"
                                    for v in row) + "</tr>\n" for row in table.rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def markdown_to_html(markdown_text: str) -> str | None:
    """Render Markdown with mistune (installed with nbconvert), or None without it."""
    try:
        import mistune
    except ImportError:
        return None
    render = mistune.create_markdown(escape=True, plugins=["table"])
    return render(markdown_text)


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1rem; }}
th, td {{ border: 1px solid #bbb; padding: 0.2rem 0.5rem; text-align: left; }}
pre {{ background: #f4f4f4; padding: 0.75rem; overflow-x: auto; }}
</style>
</head>
<body>
{body}</body>
</html>
"""


def render_html(blocks: list, markdown_text: str) -> str:
    """Return the report page: the Markdown rendered by mistune, else the blocks."""
    body = markdown_to_html(markdown_text) or render_html_body(blocks)
    return _HTML_PAGE.format(title=html.escape(REPORT_TITLE), body=body)


def write_incident_report(output_dir, show_names: bool = False) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` in ``output_dir``; return their paths.

    Customer names appear as initials unless ``show_names`` is true.
    """
    files = read_run_files(output_dir)
    blocks = build_report(files, show_names)
    markdown_text = render_markdown(blocks)
    paths = {"markdown": files.folder / "report.md", "html": files.folder / "report.html"}
    paths["markdown"].write_text(markdown_text, encoding="utf-8")
    paths["html"].write_text(render_html(blocks, markdown_text), encoding="utf-8")
    return paths
