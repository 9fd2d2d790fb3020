"""Check the fix through the app's own queries: insert, history, realtime."""

from __future__ import annotations

import pandas as pd
import psycopg
from psycopg import errors

from . import diagnosis
from .errors import VerificationError
from .paths import read_sql

HISTORY_COLUMNS = ["id", "created_at", "channel", "status", "notes",
                   "invoice_id", "promises"]


def client_history(conn: psycopg.Connection, customer_id: str,
                   limit: int = 10) -> pd.DataFrame:
    """Return the customer's attempts newest first, each with its promises."""
    rows = conn.execute(read_sql("queries/client_history.sql"),
                        {"customer_id": customer_id, "limit": limit}).fetchall()
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def insert_and_read_history(conn: psycopg.Connection, key: str, customer_id: str,
                            collector_id: str, keep: bool,
                            history_limit: int = 10) -> dict:
    """Insert the app's attempt for ``key`` and read the history in the same transaction.

    The row is rolled back unless ``keep`` is true. Returns the outcome,
    the new attempt's id, the history as the app reads it, and whether the
    new attempt is the first row of that history.
    """
    params = {"customer_id": customer_id, "invoice_id": key,
              "collector_id": collector_id, "notes": diagnosis.APP_NOTES}
    result = {"key": key, "customer_id": customer_id, "kept": keep}
    try:
        with conn.transaction(force_rollback=not keep):
            conn.execute("SET LOCAL lock_timeout = '2s'")
            conn.execute("SET LOCAL statement_timeout = '10s'")
            attempt_id, created_at = conn.execute(
                diagnosis.app_insert_query(), params).fetchone()
            history = client_history(conn, customer_id, history_limit)
    except errors.ForeignKeyViolation as exc:
        result.update(outcome="rejected", sqlstate=exc.sqlstate,
                      constraint=exc.diag.constraint_name,
                      detail=exc.diag.message_detail, attempt_id=None,
                      on_top=False, history=client_history(conn, customer_id,
                                                           history_limit))
        return result
    result.update(outcome="inserted", sqlstate=None, constraint=None,
                  detail=None, attempt_id=attempt_id, created_at=created_at,
                  history=history,
                  on_top=bool(len(history)) and history.iloc[0]["id"] == attempt_id)
    return result


def realtime_status(conn: psycopg.Connection, table: str = "collection_attempts",
                    schema: str = "public") -> dict:
    """Return whether supabase_realtime exists and publishes ``table``."""
    exists, published = conn.execute(read_sql("queries/realtime_publication.sql"),
                                     {"schema": schema, "table": table}).fetchone()
    return {"publication_exists": exists, "table_published": published}


def describe_realtime(status: dict, table: str = "collection_attempts") -> str:
    """Return one sentence on what the realtime status means for the history screen."""
    if not status["publication_exists"]:
        return ("No supabase_realtime publication exists in this database, so "
                "the history screen shows new attempts on its next read, not "
                "live.")
    if status["table_published"]:
        return (f"{table} is in the supabase_realtime publication: open "
                f"history screens receive the new attempt as it is saved.")
    return (f"{table} is NOT in the supabase_realtime publication: open history "
            f"screens show the attempt only after a reload. To stream it: "
            f"ALTER PUBLICATION supabase_realtime ADD TABLE {table};")


def describe_result(result: dict) -> str:
    """Return one paragraph on the verification outcome."""
    if result["outcome"] != "inserted":
        return (f"**The insert is still rejected** ({result['sqlstate']} on "
                f"{result['constraint']}): the fix is not in place on this "
                f"database. Run the migrate notebook, then verify again.")
    row_outcome = "kept" if result["kept"] else "rolled back"
    top = ("is on top of the client's history" if result["on_top"] else
           "is NOT on top of the client's history")
    return (f"**The insert succeeds** for key {result['key']} and the new "
            f"attempt {top}; the test row was {row_outcome}.")


def require_success(result: dict) -> None:
    """Raise ``VerificationError`` unless the insert worked and shows on top."""
    if result["outcome"] != "inserted":
        raise VerificationError(
            f"The app's insert for key {result['key']} is still rejected "
            f"({result['sqlstate']} on {result['constraint']}). Apply Option 1 "
            f"or 2 with the migrate notebook, then re-run verify."
        )
    if not result["on_top"]:
        raise VerificationError(
            f"The attempt {result['attempt_id']} was saved but is not the "
            f"newest row of customer {result['customer_id']}'s history; "
            f"check created_at defaults and the history query's ORDER BY."
        )
