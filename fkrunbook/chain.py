"""Run the runbook notebooks against one database with papermill.

The chain writes ``outputs/<UTC time>-option<N>/``: each executed notebook,
an HTML rendering of it, the notebooks' results and ``summary.json``. A
failed notebook is still written and rendered before the chain stops.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import papermill
from nbconvert import HTMLExporter

from . import connection, demo, incident_report, parameters, report
from .errors import ParameterError, TargetError
from .paths import OUTPUTS_DIR, RUNBOOKS_DIR
from .runtime import utc_stamp

logger = logging.getLogger(__name__)

NOTEBOOKS = ("01-reproduce", "02-inspect", "03-migrate", "04-verify")
# Run after the others only when asked for: it inserts the attempts the
# incident lost, from the edge function's log export.
RECOVER_NOTEBOOK = "06-recover"
# ipykernel 7 warns on every start that its local TCP sockets are not
# encrypted; the kernel runs on this machine for this run only.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


@dataclass
class ChainResult:
    """The output folder and summary of one chain run."""

    output_dir: Path
    summary: dict
    failed: str | None = None


class ChainFailed(Exception):
    """A notebook of the chain raised; the message names it and the cell."""

    def __init__(self, message: str, output_dir: Path):
        super().__init__(message)
        self.output_dir = output_dir


class ChainInterrupted(ChainFailed):
    """The user interrupted the chain; the folder contains what had run."""


def execute(name: str, path: Path, params: dict, log_output: bool) -> None:
    """Execute one runbook notebook into ``path`` with papermill."""
    papermill.execute_notebook(
        str(RUNBOOKS_DIR / f"{name}.ipynb"), str(path), parameters=params,
        kernel_name="python3", cwd=str(RUNBOOKS_DIR), progress_bar=False,
        log_output=log_output, extra_arguments=KERNEL_ARGUMENTS,
    )


def notebook_parameters(name: str, output_dir: Path, option: int, remap: bool,
                        apply: bool, confirm: str, extra: dict) -> dict:
    """Return the papermill parameters for one notebook of the chain."""
    params = {"output_dir": str(output_dir)}
    if name == "03-migrate":
        params.update(option=option, remap_invoice_rows=remap,
                      dry_run=not apply, confirm=confirm)
    if name == RECOVER_NOTEBOOK:
        params.update(dry_run=not apply, confirm=confirm)
    params.update(extra.get(name, {}))
    return params


def render_html(notebook_path: Path) -> Path:
    """Write an HTML rendering beside an executed notebook."""
    exporter = HTMLExporter()
    # nbconvert warns once per chart that it has no alt text, but the
    # chart's title and the table above it carry the same figures.
    exporter.log.setLevel(logging.ERROR)
    body, _ = exporter.from_notebook_node(nbformat.read(notebook_path, as_version=4))
    html_path = notebook_path.with_suffix(".html")
    html_path.write_text(body, encoding="utf-8")
    return html_path


def _failure_message(name: str, exc: papermill.PapermillExecutionError, path: Path) -> str:
    return (f"{name} failed in cell {exc.exec_count or exc.cell_index}: "
            f"{exc.ename}: {exc.evalue}\nExecuted notebook: {path}")


def run_chain(option: int = 1, remap: bool = False, use_demo: bool = False,
              confirm: str = "", output_root: Path | None = None,
              extra_parameters: dict | None = None, progress=print,
              log_output: bool = False, recover: bool = False,
              show_names: bool = False) -> ChainResult:
    """Run reproduce, inspect, migrate and verify; return the output folder and summary.

    With ``use_demo`` the chain starts its own embedded server, loads the
    fixture and applies the option for real. Otherwise the target comes
    from the environment, and the chain raises ``TargetError`` when none is
    set. Against a target it applies only when ``confirm`` names the
    database, and that is checked before any notebook runs. Without it,
    migrate is a dry run and verify is skipped. With ``recover`` the recover
    notebook runs last. The folder always gets ``report.md`` and
    ``report.html``; customer names in them are initials unless
    ``show_names``.
    """
    extra = extra_parameters or {}
    # papermill writes every parameter into the executed notebook, so a
    # password must be stopped here, before any notebook runs.
    parameters.reject_secrets({"confirm": confirm, **{
        f"{name}.{key}": value for name, params in extra.items()
        for key, value in params.items()}})
    env_backup = dict(os.environ)
    server = None
    try:
        if use_demo:
            server, conninfo = demo.start_demo_database()
            _use_demo_environment(conninfo)
            confirm, apply = demo.DEMO_DATABASE, True
            progress(f"Target: embedded demo database {demo.DEMO_DATABASE} "
                     f"(throwaway; the option is applied for real)")
        else:
            apply = bool(confirm)
            progress(describe_chain_target(confirm, recover, extra))
        output_dir = Path(output_root or OUTPUTS_DIR) / f"{utc_stamp()}-option{option}"
        output_dir.mkdir(parents=True, exist_ok=False)
        notebooks = NOTEBOOKS + ((RECOVER_NOTEBOOK,) if recover else ())
        return _run_notebooks(output_dir, notebooks, option, remap, apply, confirm,
                              extra, progress, log_output, show_names)
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
        if server is not None:
            demo.stop_server(server)


def describe_chain_target(confirm: str, recover: bool, extra: dict) -> str:
    """Check the target before any notebook runs; return a line naming it.

    Raises ``TargetError`` when no target is set or it cannot be reached,
    ``GateError`` when ``confirm`` is given but names another database, and
    ``ParameterError`` when recover lacks what a target needs.
    """
    if not _environment_has_target():
        raise TargetError(
            "No target database is set: DATABASE_URL and the PG* variables "
            "(PGHOST, PGDATABASE, PGSERVICE, ...) are all empty. Set them to "
            "the database to fix, or pass --demo to run on a throwaway "
            "embedded database.")
    if recover and not all(extra.get(RECOVER_NOTEBOOK, {}).get(name)
                           for name in ("log_export", "collector_id")):
        raise ParameterError(
            "--recover against a target needs --log-export FILE (the edge "
            "function's log export) and --collector-id UUID (the collector "
            "the recovered attempts are recorded under); nothing was run.")
    target = connection.resolve_target()
    with connection.connect(target) as conn:
        info = connection.describe_target(conn)
        if confirm:
            parameters.check_gate(conn, dry_run=False, confirm=confirm)
    mode = (f"changes are applied (confirmed {confirm!r})" if confirm else
            "dry run: nothing is changed; add --confirm DATABASE to apply")
    return (f"Target: {info['user']}@{info['host']}:{info['port']}/{info['database']} "
            f"(PostgreSQL {info['server_version']}, from {target.source}); {mode}")


def _environment_has_target() -> bool:
    return bool(os.environ.get("DATABASE_URL")) or any(
        os.environ.get(name) for name in connection.TARGET_VARIABLES)


def _use_demo_environment(conninfo: str) -> None:
    for name in ("DATABASE_URL",) + connection.TARGET_VARIABLES:
        os.environ.pop(name, None)
    os.environ[connection.DEMO_URL_VARIABLE] = conninfo


def _run_notebooks(output_dir: Path, notebooks: tuple, option: int, remap: bool,
                   apply: bool, confirm: str, extra: dict, progress, log_output: bool,
                   show_names: bool) -> ChainResult:
    records = []
    failed = None
    interrupted = False
    count = len(notebooks)
    for index, name in enumerate(notebooks, start=1):
        if name == "04-verify" and not apply:
            progress(f"[{index}/{count}] {name}: skipped, migrate ran as a dry run")
            records.append({"notebook": name, "status": "skipped"})
            continue
        path = output_dir / f"{name}.ipynb"
        params = notebook_parameters(name, output_dir, option, remap, apply,
                                     confirm, extra)
        progress(f"[{index}/{count}] {name} ...")
        started = time.monotonic()
        try:
            execute(name, path, params, log_output)
        except papermill.PapermillExecutionError as exc:
            failed = _failure_message(name, exc, path)
        except KeyboardInterrupt:
            interrupted = True
            failed = (f"{name} was interrupted (Ctrl-C). Read the migrate notebook "
                      f"and re-run the chain: a re-run continues where this one "
                      f"stopped, and rollback.sql undoes what was applied.")
        seconds = round(time.monotonic() - started, 1)
        if path.exists():
            render_html(path)
        status = "failed" if failed else "ok"
        records.append({"notebook": name, "status": status, "seconds": seconds})
        progress(f"[{index}/{count}] {name}: {status} in {seconds} s")
        if failed:
            break
    summary = report.build_summary(output_dir, option, records)
    summary["applied"] = apply
    summary["failed"] = failed
    report.write_summary(output_dir, summary)
    incident_report.write_incident_report(output_dir, show_names=show_names)
    if interrupted:
        raise ChainInterrupted(failed, output_dir)
    if failed:
        raise ChainFailed(failed, output_dir)
    return ChainResult(output_dir, summary)
