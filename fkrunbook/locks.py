"""Run DDL with lock and statement timeouts, retries and an advisory lock.

Every transaction that takes a lock sets ``lock_timeout`` first, so a DDL
statement waiting behind a long transaction gives up after a short time
instead of queueing every reader and writer of the table behind itself.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import psycopg
from psycopg import errors, sql

from .catalog import Table
from .errors import ConcurrentRunError, LockRetriesExhausted
from .paths import read_sql

logger = logging.getLogger(__name__)

# Key of the session-level advisory lock that keeps two runs apart.
ADVISORY_LOCK_KEY = 7_366_031_412


@dataclass
class LockSettings:
    """Timeouts and retry policy for one run; times in milliseconds."""

    lock_timeout_ms: int = 100
    statement_timeout_ms: int = 1_800_000
    max_retries: int = 10
    backoff_base_ms: int = 200
    backoff_max_ms: int = 5_000


def set_local_timeouts(conn: psycopg.Connection, lock_timeout_ms: int,
                       statement_timeout_ms: int) -> None:
    """Set both timeouts for the current transaction only."""
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
        sql.Literal(f"{int(lock_timeout_ms)}ms")))
    conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
        sql.Literal(f"{int(statement_timeout_ms)}ms")))


def find_lock_holders(conn: psycopg.Connection, relations: Iterable[Table],
                      exclude_pid: int) -> list[dict]:
    """Return the sessions holding a lock on any of ``relations``."""
    cursor = conn.execute(read_sql("queries/lock_holders.sql"), {
        "relations": [t.qualified for t in relations], "pid": exclude_pid})
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def describe_holders(holders: list[dict]) -> str:
    if not holders:
        return "no session holds a lock on these tables any more"
    return "; ".join(
        f"pid {h['pid']} ({h['state']}, transaction open "
        f"{h['transaction_age_s']} s, query {h['query']!r})" for h in holders)


def backoff_delay(attempt: int, settings: LockSettings) -> float:
    """Return the wait in seconds before retry ``attempt``: exponential, jittered."""
    ceiling = min(settings.backoff_max_ms, settings.backoff_base_ms * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling) / 1000


def run_with_retries(conn: psycopg.Connection, body: Callable[[], object],
                     relations: list[Table], settings: LockSettings,
                     description: str, statement_timeout_ms: int | None = None,
                     retry_statement_timeout: bool = False) -> tuple[object, int]:
    """Run ``body`` in a transaction with timeouts, retrying on lock timeout.

    ``statement_timeout_ms`` overrides the settings' statement timeout.
    With ``retry_statement_timeout`` a statement timeout is retried like a
    lock timeout, because a DDL statement that waits for several locks in
    turn is cancelled by its statement timeout, not by one lock_timeout.
    Returns ``(result of body, attempts)``. Each failed attempt is rolled
    back, so when the last retry fails too the schema is as it was before
    the step, and ``LockRetriesExhausted`` names the blocking sessions.
    """
    attempts = settings.max_retries + 1
    if statement_timeout_ms is None:
        statement_timeout_ms = settings.statement_timeout_ms
    retryable: tuple = (errors.LockNotAvailable,)
    if retry_statement_timeout:
        retryable += (errors.QueryCanceled,)
    holders: list[dict] = []
    for attempt in range(1, attempts + 1):
        try:
            with conn.transaction():
                set_local_timeouts(conn, settings.lock_timeout_ms, statement_timeout_ms)
                return body(), attempt
        except retryable:
            holders = find_lock_holders(conn, relations, conn.info.backend_pid)
            if attempt == attempts:
                break
            delay = backoff_delay(attempt, settings)
            logger.warning(
                "%s: locks not granted within %d ms (attempt %d of %d); "
                "blocked by %s; retrying in %.2f s",
                description, settings.lock_timeout_ms, attempt, attempts,
                describe_holders(holders), delay)
            time.sleep(delay)
    pids = ", ".join(str(h["pid"]) for h in holders) or "none left"
    raise LockRetriesExhausted(
        f"{description}: lock not granted within {settings.lock_timeout_ms} ms "
        f"in {attempts} attempts, so nothing was changed by this step. "
        f"Blocking sessions: {describe_holders(holders)}. Wait for them to "
        f"finish and re-run; if one is an idle transaction that should not "
        f"be open, end it with SELECT pg_terminate_backend(pid) for pid(s) "
        f"{pids}, or raise max_retries or lock_timeout_ms.",
        blockers=holders, attempts=attempts,
    )


@contextlib.contextmanager
def advisory_lock(conn: psycopg.Connection, wait_s: float = 10.0):
    """Hold the runbook's session-level advisory lock, or raise after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        acquired = conn.execute("SELECT pg_try_advisory_lock(%s)",
                                [ADVISORY_LOCK_KEY]).fetchone()[0]
        if acquired:
            break
        if time.monotonic() >= deadline:
            holder = conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory'"
                " AND granted AND ((classid::bigint << 32) | objid::bigint) = %s",
                [ADVISORY_LOCK_KEY]).fetchone()
            holder_label = f"pid {holder[0]}" if holder else "another session"
            raise ConcurrentRunError(
                f"Another runbook run ({holder_label}) is changing database "
                f"{conn.info.dbname!r}; waited {wait_s:g} s for it. Let it "
                f"finish, then re-run: a re-run skips what is already applied."
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", [ADVISORY_LOCK_KEY])
        except psycopg.Error as exc:
            # The lock ends with the session anyway; keep the original error.
            logger.warning("could not release the advisory lock: %s", exc)
