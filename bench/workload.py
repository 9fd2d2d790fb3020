"""The concurrent sessions of a scenario: the app's writer and a blocker.

The writer runs in a child process, so the GIL of the process running the
migration cannot delay its inserts or inflate their measured latency. The
blocker is a thread, because only its lock matters, not its timing. Times
shared between them use ``time.monotonic``, which is one clock for every
process on Linux (CLOCK_MONOTONIC).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from fkrunbook import diagnosis

logger = logging.getLogger("bench.workload")

# How long stop() waits for the writer before it terminates the process.
STOP_TIMEOUT_S = 10.0
# How long the blocker's release_now() waits for its thread to end.
JOIN_TIMEOUT_S = 10.0
# The writer logs this many failed inserts one by one and only counts the rest.
LOGGED_ERRORS = 5
# spawn starts a new interpreter, so the child gets none of the parent's
# psycopg connections or threads, as it would with fork.
_PROCESSES = multiprocessing.get_context("spawn")


@dataclass
class Insert:
    """One insert of the writer; times in seconds from the writer's start."""

    due_s: float
    start_s: float
    latency_s: float
    error: str | None = None


@dataclass
class WriterKey:
    """The row values the writer inserts, valid under the old and the new FK."""

    invoice_id: str
    customer_id: str
    collector_id: str = "00000000-0000-4000-8000-00000000be9c"

    def params(self) -> dict:
        return {"customer_id": self.customer_id, "invoice_id": self.invoice_id,
                "collector_id": self.collector_id, "notes": diagnosis.APP_NOTES}


def _warm_up(conn: psycopg.Connection, query, params: dict) -> None:
    # Enough rolled-back inserts for psycopg to prepare the statement
    # (prepare_threshold is 5), so the first measured one is not slower.
    for _ in range(conn.prepare_threshold + 1):
        with conn.transaction(force_rollback=True):
            conn.execute(query, params).fetchone()


def _insert_on_schedule(conn: psycopg.Connection, query, params: dict, rate: float,
                        deadline_s: float, stop, parent_pid: int, pipe) -> list[Insert]:
    inserts: list[Insert] = []
    started = time.perf_counter()
    pipe.send(("ready", time.monotonic()))
    index = failures = 0
    while not stop.is_set():
        due = index / rate
        wait = started + due - time.perf_counter()
        if wait > 0 and stop.wait(wait):
            break
        begin = time.perf_counter()
        if begin - started > deadline_s or os.getppid() != parent_pid:
            logger.warning("writer stops before stop(): deadline of %.0f s reached "
                           "or parent process gone", deadline_s)
            break
        error = None
        try:
            conn.execute(query, params).fetchone()
        except psycopg.Error as exc:
            error = f"{exc.sqlstate or type(exc).__name__}: {exc}".strip()
            failures += 1
            if failures <= LOGGED_ERRORS:
                logger.warning("writer insert %d failed: %s", index, error)
        inserts.append(Insert(due, begin - started, time.perf_counter() - begin, error))
        index += 1
        if conn.broken:
            logger.warning("writer connection lost; the writer stops")
            break
    if failures > LOGGED_ERRORS:
        logger.warning("writer: %d inserts failed in all", failures)
    return inserts


def _writer_process(conninfo: str, key: WriterKey, rate: float, deadline_s: float,
                    stop, parent_pid: int, pipe) -> None:
    # Ctrl-C sends SIGINT to the child too. The child ignores it and ends
    # when the parent sets ``stop``, which the parent does on Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with psycopg.connect(conninfo, autocommit=True,
                             application_name="bench-writer") as conn:
            query = diagnosis.app_insert_query()
            _warm_up(conn, query, key.params())
            inserts = _insert_on_schedule(conn, query, key.params(), rate, deadline_s,
                                          stop, parent_pid, pipe)
        pipe.send(("done", inserts))
    except Exception as exc:  # sent to the parent, which reports it
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        pipe.close()


class Writer:
    """Run the app's insert at ``rate`` per second in a child process.

    The schedule is fixed in advance (insert ``i`` is due at ``i / rate``),
    so after a stall the inserts that fell due meanwhile run back to back,
    as queued app requests would. The latency is the time the INSERT
    statement took, measured with ``time.perf_counter``; it excludes the
    wait for the schedule. The writer stops at ``stop()``, at ``deadline_s``
    after its start, or when the parent process is gone, whichever comes first.
    """

    def __init__(self, conninfo: str, key: WriterKey, rate: float, deadline_s: float):
        self.inserts: list[Insert] = []
        self.started_at: float | None = None  # time.monotonic() at insert 0
        self.failure: str | None = None
        self._stop = _PROCESSES.Event()
        self._receiver, sender = _PROCESSES.Pipe(duplex=False)
        self._process = _PROCESSES.Process(
            target=_writer_process, name="bench-writer", daemon=True,
            args=(conninfo, key, rate, deadline_s, self._stop, os.getpid(), sender))
        self._sender = sender

    def _receive(self, timeout_s: float) -> tuple | None:
        # None when the child sent nothing in time or exited without a message.
        try:
            if self._receiver.poll(timeout_s):
                return self._receiver.recv()
        except EOFError:
            pass
        return None

    def start(self, timeout_s: float) -> bool:
        """Start the process; return whether it began inserting within ``timeout_s``."""
        self._process.start()
        self._sender.close()
        message = self._receive(timeout_s)
        if message is None:
            self.failure = (f"the writer process sent no ready message within "
                            f"{timeout_s:g} s; see its error output above")
            self._process.terminate()
            return False
        if message[0] != "ready":
            self.failure = message[1]
            return False
        self.started_at = message[1]
        return True

    def stop(self) -> None:
        """Ask the writer to finish and collect its inserts; terminate it if it hangs."""
        self._stop.set()
        message = self._receive(STOP_TIMEOUT_S)
        if message is None:
            self.failure = self.failure or (
                f"the writer process returned no result within {STOP_TIMEOUT_S:g} s "
                f"and was terminated")
            logger.warning(self.failure)
            self._process.terminate()
        elif message[0] == "done":
            self.inserts = message[1]
        else:
            self.failure = message[1]
        self._process.join(STOP_TIMEOUT_S)

    @property
    def running(self) -> bool:
        return self._process.is_alive()


class Blocker(threading.Thread):
    """Hold ACCESS SHARE on a table in an open transaction for ``hold_s``.

    This stands for a long report or an idle-in-transaction session. Its
    lock conflicts with the ACCESS EXCLUSIVE lock that DROP CONSTRAINT
    needs, but not with the writer's inserts.
    """

    def __init__(self, conninfo: str, table: str, hold_s: float):
        super().__init__(name="bench-blocker", daemon=True)
        self.conninfo = conninfo
        self.table = table
        self.hold_s = hold_s
        self.holding = threading.Event()
        self.acquired_at: float | None = None
        self.released_at: float | None = None
        self.failure: BaseException | None = None
        self._release = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.conninfo, application_name="bench-blocker") as conn:
                with conn.transaction():
                    conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(
                        sql.Identifier(self.table))).fetchall()
                    self.acquired_at = time.monotonic()
                    self.holding.set()
                    self._release.wait(self.hold_s)
                self.released_at = time.monotonic()
        except BaseException as exc:  # reported by the scenario, not lost in the thread
            self.failure = exc
            self.holding.set()

    def release_now(self) -> None:
        """End the transaction early, for Ctrl-C and errors."""
        self._release.set()
        self.join(JOIN_TIMEOUT_S)


class LockWarnings(logging.Handler):
    """Collect the WARNING records that ``fkrunbook.locks`` logs per retry."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self):
        logging.getLogger("fkrunbook.locks").addHandler(self)
        return self

    def __exit__(self, *exc_info):
        logging.getLogger("fkrunbook.locks").removeHandler(self)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]
