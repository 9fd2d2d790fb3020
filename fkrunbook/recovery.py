"""Recover the collection attempts that the wrong FK lost, from the function logs.

``log_analysis`` finds the lost attempts in the hosting dashboard's log
export. This module checks that the app's insert now accepts their keys and
inserts the missing rows as the app would. Each row's id is derived from the
log, so a re-run adds nothing. The counts, chart and descriptions here
summarise the run for the recover notebook.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import matplotlib.pyplot as plt
import pandas as pd
import psycopg
from psycopg import errors, sql

from . import catalog, diagnosis, migration, parameters
from .demo_logs import DEMO_COLLECTOR_ID, demo_export
from .errors import ParameterError, PreflightError
from .log_analysis import (DEFAULT_PAIRING_WINDOW_S, FK_COLUMN, FK_TABLE, FK_VIOLATION,
                           LOST, REQUEST, SUCCEEDED, UNPARSED, LogAnalysis,
                           LostAttempt, analyse_export, check_parsed, read_export)
from .masking import mask_name

logger = logging.getLogger(__name__)

RECOVERED_NOTE_PREFIX = "Recovered from edge function logs"

# The source of the export that demo mode generates when log_export is empty.
DEMO_SOURCE = "synthetic demo export"


def export_name(source: str | None) -> str:
    """Return how a message names an export: its log_export path, or the demo export."""
    if source == DEMO_SOURCE:
        return f"the {DEMO_SOURCE}"
    if source is None:
        return "the log export"
    return f"log_export {source!r}"


# --- counts and chart ---------------------------------------------------------

def daily_counts(lost: list[LostAttempt]) -> pd.DataFrame:
    """Return lost attempts per UTC day of sending."""
    days = Counter(attempt.sent_at.date().isoformat() for attempt in lost)
    return pd.DataFrame(sorted(days.items()), columns=["day", "lost_attempts"])


def customer_counts(lost: list[LostAttempt], names: dict[str, str] | None = None,
                    show_names: bool = False) -> pd.DataFrame:
    """Return lost attempts per customer, most first, with names as initials.

    ``show_names`` shows the full names instead.
    """
    names = names or {}
    rows = {}
    for attempt in lost:
        row = rows.setdefault(attempt.customer_id, {
            "customer_id": attempt.customer_id, "lost_attempts": 0,
            "first_sent": attempt.sent_at, "last_sent": attempt.sent_at})
        row["lost_attempts"] += 1
        row["first_sent"] = min(row["first_sent"], attempt.sent_at)
        row["last_sent"] = max(row["last_sent"], attempt.sent_at)
    for customer_id, row in rows.items():
        name = names.get(customer_id)
        row["customer"] = name if show_names and name else mask_name(name)
    columns = ["customer_id", "customer", "lost_attempts", "first_sent", "last_sent"]
    frame = pd.DataFrame(list(rows.values()), columns=columns)
    return frame.sort_values(["lost_attempts", "customer_id"],
                             ascending=[False, True]).reset_index(drop=True)


def customer_names(conn: psycopg.Connection, customer_ids) -> dict[str, str]:
    """Return the name of each customer id found in ``customers``."""
    rows = conn.execute("SELECT id::text, name FROM customers WHERE id = ANY(%s::uuid[])",
                        [sorted(set(customer_ids))]).fetchall()
    return dict(rows)


def plot_lost_attempts(lost: list[LostAttempt]):
    """Bar chart of lost attempts per UTC hour (per day when they span over 3 days)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    if lost:
        times = pd.Series([attempt.sent_at for attempt in lost])
        by_day = times.max() - times.min() > pd.Timedelta(days=3)
        unit = "day" if by_day else "hour"
        bins = times.dt.floor("D" if by_day else "h").value_counts().sort_index()
        ax.bar(bins.index, bins.values, width=0.8 if by_day else 1 / 30)
        ax.set_xlabel(f"time sent (UTC), per {unit}")
        fig.autofmt_xdate()
    else:
        ax.text(0.5, 0.5, "no lost attempt", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_ylabel("lost attempts")
    ax.set_title("Messages sent with no collection_attempts row")
    fig.tight_layout()
    # Closed so that the inline backend does not show it twice, because the
    # notebook displays the returned figure itself.
    plt.close(fig)
    return fig


# --- the database -----------------------------------------------------------

def current_fk_state(conn: psycopg.Connection, schema: str = "public") -> dict:
    """Return the NOT NULL flag and FKs of collection_attempts.invoice_id."""
    table = catalog.resolve_table(conn, FK_TABLE, schema)
    state = migration.read_column_state(conn, table, FK_COLUMN)
    return {"table": state.table, "column": state.column, "not_null": state.not_null,
            "foreign_keys": [{"name": fk.name, "referenced_table": fk.referenced_table,
                              "validated": fk.validated} for fk in state.foreign_keys]}


def describe_fk_state(state: dict) -> str:
    """Return which fix, if any, the FK state corresponds to."""
    referenced = {fk["referenced_table"].split(".")[-1] for fk in state["foreign_keys"]}
    if not referenced:
        nullable = "NOT NULL" if state["not_null"] else "nullable"
        return (f"{state['table']}.{state['column']} has no FK and is {nullable}, "
                f"so Option 2 is in place.")
    if referenced == {catalog.REFERENCED_CONTRACTS}:
        return (f"{state['table']}.{state['column']} references operator_contracts, "
                f"so Option 1 is in place.")
    return (f"{state['table']}.{state['column']} references "
            f"{', '.join(sorted(referenced))}, so no fix is in place yet.")


def check_keys(conn: psycopg.Connection, lost: list[LostAttempt],
               collector_id: str) -> pd.DataFrame:
    """Run the app's insert once per key, in one transaction that is always rolled back.

    Each key gets a savepoint, so one rejection does not hide the next.
    Returns one row per key: its attempts, whether the insert was accepted,
    and the rejecting constraint and detail as the server sent them.
    """
    first_by_key: dict[str, LostAttempt] = {}
    for attempt in lost:
        first_by_key.setdefault(attempt.invoice_id, attempt)
    attempts_per_key = Counter(attempt.invoice_id for attempt in lost)
    rows = []
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL lock_timeout = '2s'")
        conn.execute("SET LOCAL statement_timeout = '10s'")
        for key in sorted(first_by_key):
            attempt = first_by_key[key]
            row = {"invoice_id": key, "attempts": attempts_per_key[key],
                   "accepted": True, "sqlstate": None, "constraint": None,
                   "detail": None}
            try:
                with conn.transaction():
                    conn.execute(diagnosis.app_insert_query(), {
                        "customer_id": attempt.customer_id, "invoice_id": key,
                        "collector_id": collector_id, "notes": diagnosis.APP_NOTES})
            except errors.IntegrityError as exc:
                row.update(accepted=False, constraint=exc.diag.constraint_name,
                           detail=exc.diag.message_detail, sqlstate=exc.sqlstate)
            rows.append(row)
    frame = pd.DataFrame(rows, columns=["invoice_id", "attempts", "accepted",
                                        "sqlstate", "constraint", "detail"])
    return frame.astype({"accepted": bool})


def blocking_reason(checks: pd.DataFrame, fk_state: dict, database: str) -> str | None:
    """Return why the recovery may not insert, with the fix to apply first, or None."""
    rejected = checks[~checks["accepted"]]
    if rejected.empty:
        return None
    fk_names = {fk["name"]: fk["referenced_table"].split(".")[-1]
                for fk in fk_state["foreign_keys"]}
    by_fk = rejected[rejected["constraint"].isin(list(fk_names))]
    migrate = (f"run runbooks/03-migrate.ipynb with option=1 (FK re-pointed "
               f"to operator_contracts) or option=2 (nullable column, no FK), "
               f"dry_run=False and confirm={database!r}, then run this "
               f"notebook again")
    if not by_fk.empty:
        constraint = by_fk["constraint"].iloc[0]
        if fk_names[constraint] == catalog.REFERENCED_CONTRACTS:
            return (f"{len(by_fk)} key(s) are rejected by {constraint}, which "
                    f"already references operator_contracts: they are not "
                    f"contract ids (first: {by_fk['invoice_id'].iloc[0]}). "
                    f"Nothing was inserted. Apply Option 2 with "
                    f"runbooks/03-migrate.ipynb (option=2), or correct the keys.")
        return (f"{len(by_fk)} of {len(checks)} key(s) are still rejected by "
                f"{constraint}, which references {fk_names[constraint]} "
                f"(first: {by_fk['invoice_id'].iloc[0]}), so nothing was "
                f"inserted. Apply the fix first: {migrate}.")
    first = rejected.iloc[0]
    return (f"{len(rejected)} key(s) are rejected by {first['constraint']} "
            f"({first['detail']}), so nothing was inserted. The log's "
            f"customer_id or collector_id does not fit the table; check them "
            f"before running this notebook again.")


def recovery_insert_query() -> sql.Composed:
    """Return the app's insert with a given id and created_at, skipping ids present."""
    return sql.SQL(
        "INSERT INTO collection_attempts"
        " (id, customer_id, invoice_id, collector_id, channel, status, notes, created_at)"
        " VALUES (%(id)s, %(customer_id)s, %(invoice_id)s, %(collector_id)s,"
        " {channel}, {status}, %(notes)s, %(created_at)s)"
        " ON CONFLICT (id) DO NOTHING"
        " RETURNING id::text"
    ).format(channel=sql.Literal(diagnosis.APP_CHANNEL),
             status=sql.Literal(diagnosis.APP_STATUS))


def recovery_note(attempt: LostAttempt) -> str:
    """Return the notes of a recovered row: where it came from, no message text."""
    execution = attempt.execution_id or "not logged"
    return (f"{RECOVERED_NOTE_PREFIX}: sent {attempt.sent_at:%Y-%m-%d %H:%M:%S} UTC, "
            f"execution {execution}")


def existing_attempt_ids(conn: psycopg.Connection, lost: list[LostAttempt]) -> set[str]:
    """Return the recovered ids that collection_attempts already has."""
    rows = conn.execute("SELECT id::text FROM collection_attempts WHERE id = ANY(%s::uuid[])",
                        [[attempt.attempt_id for attempt in lost]]).fetchall()
    return {attempt_id for (attempt_id,) in rows}


def insert_attempts(conn: psycopg.Connection, lost: list[LostAttempt],
                    collector_id: str) -> list[str]:
    """Insert the lost attempts in one transaction and return the ids actually inserted."""
    inserted = []
    query = recovery_insert_query()
    with conn.transaction():
        conn.execute("SET LOCAL lock_timeout = '2s'")
        conn.execute("SET LOCAL statement_timeout = '60s'")
        for attempt in lost:
            row = conn.execute(query, {
                "id": attempt.attempt_id, "customer_id": attempt.customer_id,
                "invoice_id": attempt.invoice_id, "collector_id": collector_id,
                "notes": recovery_note(attempt), "created_at": attempt.sent_at,
            }).fetchone()
            if row is not None:
                inserted.append(row[0])
    logger.info("inserted %d recovered attempt(s) into collection_attempts and "
                "skipped %d already there", len(inserted), len(lost) - len(inserted))
    return inserted


@dataclass
class RecoveryOutcome:
    """Result of the insert step, or of the dry run in its place."""

    mode: str
    lost: int
    already_present: int
    inserted: int
    blocked: str | None
    fk_state: dict
    key_checks: pd.DataFrame = field(repr=False)
    statuses: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def to_insert(self) -> int:
        return self.lost - self.already_present


def recover(conn: psycopg.Connection, analysis: LogAnalysis, collector_id: str,
            dry_run: bool, confirm, raise_when_blocked: bool = True) -> RecoveryOutcome:
    """Insert the lost attempts unless this is a dry run or the FK rejects a key.

    Inserts only with ``dry_run=False`` and ``confirm`` equal to the target
    database (``parameters.check_gate``). While the app's insert is still
    rejected for any key, nothing is inserted and ``blocked`` names the fix
    to apply first. An export with no parsed record raises
    ``ParameterError`` before anything is read or inserted. An apply run then raises ``PreflightError``, unless
    ``raise_when_blocked`` is false. The notebook passes false so that it
    can record the outcome before ``require_unblocked`` raises.
    """
    check_parsed(analysis, export_name(analysis.source))
    collector_id = parameters.to_uuid("collector_id", collector_id)
    mode = parameters.check_gate(conn, dry_run, confirm)
    database = conn.info.dbname

    fk_state = current_fk_state(conn)
    checks = check_keys(conn, analysis.lost, collector_id)
    blocked = blocking_reason(checks, fk_state, database)
    present = existing_attempt_ids(conn, analysis.lost)

    inserted: list[str] = []
    if mode == "apply" and not blocked:
        inserted = insert_attempts(conn, analysis.lost, collector_id)
    statuses = {a.attempt_id: _status(a.attempt_id, present, set(inserted), mode, blocked)
                for a in analysis.lost}
    outcome = RecoveryOutcome(mode, len(analysis.lost), len(present), len(inserted),
                              blocked, fk_state, checks, statuses)
    if raise_when_blocked:
        require_unblocked(outcome)
    return outcome


def require_unblocked(outcome: RecoveryOutcome) -> None:
    """Raise ``PreflightError`` if an apply run inserted nothing because a key was rejected."""
    if outcome.mode == "apply" and outcome.blocked:
        raise PreflightError(outcome.blocked)


def _status(attempt_id: str, present: set, inserted: set, mode: str, blocked) -> str:
    if attempt_id in present:
        return "already present"
    if attempt_id in inserted:
        return "inserted"
    if blocked:
        return "blocked"
    return "to insert (dry run)" if mode == "dry run" else "not inserted"


def describe_export(source: str, analysis: LogAnalysis) -> str:
    """Return one paragraph on what the export contains."""
    paired = ", ".join(f"{count} by {how}" for how, count in sorted(analysis.paired_by.items()))
    origin = f"the {DEMO_SOURCE}" if source == DEMO_SOURCE else f"`{source}`"
    return (f"Read **{analysis.records}** record(s) from {origin} "
            f"({analysis.export_format}): **{analysis.outcomes[LOST]}** lost "
            f"attempt(s), {analysis.outcomes[SUCCEEDED]} request(s) with no "
            f"error after them, {analysis.counts[UNPARSED]} record(s) not "
            f"parsed. Errors paired with their request: {paired or 'none'}.")


def export_warnings(analysis: LogAnalysis) -> list[str]:
    """Return warnings on an export that parsed but cannot show a lost attempt.

    An export with no "Received request" line gives 0 lost attempts whether
    or not messages were lost, for example when it contains another
    function's logs or was filtered to errors only.
    """
    if analysis.counts[REQUEST]:
        return []
    parsed = analysis.records - analysis.counts[UNPARSED]
    warning = (f"The export has {parsed} parsed record(s) but no \"Received "
               f"request\" line, so it cannot show a lost attempt, and 0 lost "
               f"attempts here does not mean that none were lost.")
    if analysis.counts[FK_VIOLATION]:
        warning += (f" Its {analysis.counts[FK_VIOLATION]} 23503 line(s) have no "
                    f"request to pair with, so their attempts cannot be rebuilt.")
    warning += (" Export the logs of the edge function that sends the messages "
                "(it logs \"Received request: {...}\" before calling n8n), over "
                "the incident's time range and with no search or level filter.")
    return [warning]


def describe_outcome(outcome: RecoveryOutcome) -> str:
    """Return one paragraph on what the insert step did."""
    if outcome.lost == 0:
        return "**Nothing to recover:** the export has no lost attempt."
    if outcome.blocked:
        return f"**Nothing inserted ({outcome.mode}):** {outcome.blocked}"
    if outcome.mode == "dry run":
        return (f"**Dry run:** {outcome.to_insert} of {outcome.lost} lost "
                f"attempt(s) would be inserted ({outcome.already_present} already "
                f"present) and nothing changed. To insert, set dry_run=False and "
                f"confirm to the database name.")
    return (f"**Inserted** {outcome.inserted} of {outcome.lost} lost attempt(s); "
            f"{outcome.lost - outcome.inserted} were already present, so nothing "
            f"was inserted twice.")


def describe_conclusion(analysis: LogAnalysis, outcome: RecoveryOutcome) -> str:
    """Return the closing sentence of the recover notebook."""
    if not analysis.counts[REQUEST]:
        return ("**No lost attempt found, but the export has no Received "
                "request line** (see the warning in step 2), so it cannot show "
                "whether attempts were lost. Nothing was recovered.")
    if not analysis.lost:
        return "**No lost attempt** in this export, so nothing was recovered."
    first, last = analysis.lost[0].sent_at, analysis.lost[-1].sent_at
    span = f"sent between {first:%Y-%m-%d %H:%M} and {last:%Y-%m-%d %H:%M} UTC"
    if outcome.blocked:
        state = "none recovered, because the FK still rejects keys"
    elif outcome.mode == "dry run":
        state = f"{outcome.to_insert} still to insert (dry run)"
    else:
        state = "all of them are now in collection_attempts"
    return f"**{len(analysis.lost)} lost attempt(s)** {span}: {state}."


def statuses_frame(analysis: LogAnalysis, outcome: RecoveryOutcome) -> pd.DataFrame:
    """Return each lost attempt's id, time sent and what the insert step did with it."""
    return pd.DataFrame(
        [{"attempt_id": a.attempt_id, "sent_at": a.sent_at, "invoice_id": a.invoice_id,
          "status": outcome.statuses.get(a.attempt_id)} for a in analysis.lost],
        columns=["attempt_id", "sent_at", "invoice_id", "status"])


def result_record(source: str, analysis: LogAnalysis, outcome: RecoveryOutcome,
                  names: dict[str, str]) -> dict:
    """Return the facts the notebook writes to ``results/recover.json``.

    Customer names are stored in full so that the incident report can show
    them on request. The report and the notebook show initials by default.
    """
    lost = analysis.lost_frame().drop(columns=["phone", "message"])
    lost["status"] = [outcome.statuses.get(a.attempt_id) for a in analysis.lost]
    customers = customer_counts(analysis.lost, names)
    customers["customer_name"] = [names.get(c) for c in customers["customer_id"]]
    return {
        "source": source, "export_format": analysis.export_format,
        "records": analysis.records, "pairing_window_s": analysis.pairing_window_s,
        "counts": analysis.counts, "outcomes": analysis.outcomes,
        "paired_by": analysis.paired_by,
        "first_failure": analysis.first_failure, "last_failure": analysis.last_failure,
        "unparsed": [asdict(item) for item in analysis.unparsed],
        "unpaired": analysis.unpaired,
        "warnings": export_warnings(analysis),
        "mode": outcome.mode, "lost": outcome.lost, "inserted": outcome.inserted,
        "already_present": outcome.already_present, "blocked": outcome.blocked,
        "fk_state": outcome.fk_state,
        "key_checks": outcome.key_checks.to_dict(orient="records"),
        "attempts": lost.to_dict(orient="records"),
        "daily": daily_counts(analysis.lost).to_dict(orient="records"),
        "customers": customers.drop(columns=["customer"]).to_dict(orient="records"),
        "recorded_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def resolve_collector(collector_id, is_demo: bool) -> str:
    """Return ``collector_id`` as a uuid. Only a demo run may leave it empty."""
    if collector_id not in (None, ""):
        return parameters.to_uuid("collector_id", collector_id)
    if is_demo:
        return DEMO_COLLECTOR_ID
    raise ParameterError(
        "collector_id is empty, and the log does not name who sent the "
        "message. Set collector_id to the uuid the recovered rows should "
        "carry, for example the collector who ran the campaign.")


def load_export(log_export, conn: psycopg.Connection, is_demo: bool,
                pairing_window_s=DEFAULT_PAIRING_WINDOW_S) -> tuple[str, LogAnalysis]:
    """Return (source, analysis) of ``log_export``, or of the demo export if empty.

    Raises ``ParameterError`` when the export has no record or none parsed
    (``log_analysis.check_parsed``).
    """
    if log_export not in (None, ""):
        analysis = read_export(log_export, pairing_window_s)
    elif is_demo:
        analysis = analyse_export(demo_export(conn), pairing_window_s)
        analysis.source = DEMO_SOURCE
    else:
        raise ParameterError(
            "log_export is empty. Give the path of the edge function's log "
            "export (CSV or JSON from the dashboard), because only demo mode "
            "generates a synthetic export.")
    check_parsed(analysis, export_name(analysis.source))
    return analysis.source, analysis
