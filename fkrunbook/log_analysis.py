"""Find the collection attempts that the wrong FK lost in a log export.

The edge function logs ``Received request: {...}`` before it calls n8n, and
``Error registering attempt: {...}`` when the insert that follows fails. A
request followed by a 23503 on ``collection_attempts.invoice_id`` is a
message that went out and left no row. This module classifies every
record of the export, pairs those lines and lists the lost attempts, each
under an id derived from the log so that a re-run finds the same ids.

Phone numbers and message texts are masked as soon as a ``Received
request`` line is parsed, so the requests, lost attempts and analyses
returned here contain neither.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from . import diagnosis
from .errors import ParameterError
from .js_literal import LiteralError, parse_js_object
from .logexport import LogRecord, Unparsed, load_records, read_csv_header
from .masking import mask_message, mask_phone

logger = logging.getLogger(__name__)

REQUEST_PREFIX = "Received request:"
ERROR_PREFIX = "Error registering attempt:"
FK_SQLSTATE = "23503"
FK_TABLE = "collection_attempts"
FK_COLUMN = "invoice_id"
DEFAULT_PAIRING_WINDOW_S = 10.0

# Namespace of the uuid5 ids of recovered attempts. Changing it gives every
# attempt a new id, so a re-run would insert all of them a second time.
ATTEMPT_ID_NAMESPACE = uuid.UUID("db4f01fc-fc3b-40c1-9e62-d13e6841c7c8")

# Classes of export records. Each record gets exactly one.
REQUEST = "request"
FK_VIOLATION = "fk_violation"
OTHER_ERROR = "other_registering_error"
OTHER_FUNCTION = "other_function"
OTHER_MESSAGE = "other_message"
UNPARSED = "unparsed"
RECORD_CLASSES = (REQUEST, FK_VIOLATION, OTHER_ERROR, OTHER_FUNCTION,
                  OTHER_MESSAGE, UNPARSED)

RECORD_CLASS_MEANINGS = {
    REQUEST: "Received request line of the collection function",
    FK_VIOLATION: "Error registering attempt with 23503 on "
                  "collection_attempts.invoice_id",
    OTHER_ERROR: "Error registering attempt with another SQLSTATE or constraint",
    OTHER_FUNCTION: "line of another edge function",
    OTHER_MESSAGE: "other line of the collection function",
    UNPARSED: "record that could not be parsed (see the reasons)",
}

# Outcomes of requests and 23503 errors once paired.
LOST = "lost"
SUCCEEDED = "succeeded"
FAILED_OTHER = "failed_other"
DUPLICATE = "duplicate"
UNPAIRED_FK_VIOLATION = "fk_violation_without_request"
UNPAIRED_OTHER_ERROR = "other_error_without_request"
OUTCOMES = (LOST, SUCCEEDED, FAILED_OTHER, DUPLICATE, UNPAIRED_FK_VIOLATION,
            UNPAIRED_OTHER_ERROR)

OUTCOME_MEANINGS = {
    LOST: "request followed by a 23503, so sent with no row saved",
    SUCCEEDED: "request with no Error registering attempt after it",
    FAILED_OTHER: "request followed by another registering error (not recovered)",
    DUPLICATE: "lost attempt already listed (same attempt id)",
    UNPAIRED_FK_VIOLATION: "23503 with no matching request (not recovered)",
    UNPAIRED_OTHER_ERROR: "other registering error with no matching request",
}

EXPORT_HINT = (
    "Export the edge function's logs from the hosting dashboard again, as CSV "
    "with a comma separator or as JSON, with the columns timestamp and "
    "event_message, and give that file's path."
)


# --- classifying the lines --------------------------------------------------

@dataclass
class Request:
    """A parsed ``Received request`` line, with phone and message masked."""

    number: int
    timestamp: dt.datetime
    execution_id: str | None
    customer_id: str
    invoice_id: str
    instance_id: str | None
    phone: str | None
    message: str | None


@dataclass
class RegisteringError:
    """A parsed ``Error registering attempt`` line."""

    number: int
    timestamp: dt.datetime
    execution_id: str | None
    sqlstate: str
    key: str | None = None
    constraint: str | None = None
    table: str | None = None
    column: str | None = None

    @property
    def is_fk_violation(self) -> bool:
        """Whether this is the incident's 23503 on collection_attempts.invoice_id."""
        return (self.sqlstate == FK_SQLSTATE and self.key is not None
                and (self.table, self.column) == (FK_TABLE, FK_COLUMN))


def collection_function_ids(records: list[LogRecord]) -> set[str]:
    """Return the function ids that logged registering errors, else requests."""
    for prefix in (ERROR_PREFIX, REQUEST_PREFIX):
        ids = {r.function_id for r in records if r.function_id and prefix in r.message}
        if ids:
            return ids
    return set()


def _uuid_field(payload: dict, name: str) -> str:
    value = payload.get(name)
    if value in (None, ""):
        raise LiteralError(f"{name} is missing")
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise LiteralError(f"{name} is not a uuid") from None


def _optional_text(payload: dict, name: str) -> str | None:
    value = payload.get(name)
    return None if value is None else str(value)


def parse_request(record: LogRecord, start: int) -> Request:
    """Parse the object of a ``Received request`` line, masking phone and message."""
    payload = parse_js_object(record.message, start)
    return Request(
        record.number, record.timestamp, record.execution_id,
        customer_id=_uuid_field(payload, "customer_id"),
        invoice_id=_uuid_field(payload, "invoice_id"),
        instance_id=_optional_text(payload, "instance_id"),
        phone=mask_phone(payload.get("phone")),
        message=mask_message(payload.get("message")),
    )


def parse_registering_error(record: LogRecord, start: int) -> RegisteringError:
    """Parse the object of an ``Error registering attempt`` line.

    The key, constraint, table and column come from the object's message
    and details through ``diagnosis.parse_log``, the parser of the
    reproduce notebook.
    """
    payload = parse_js_object(record.message, start)
    error = RegisteringError(record.number, record.timestamp, record.execution_id,
                             sqlstate=str(payload.get("code") or ""))
    text = f"{payload.get('message') or ''}\n{payload.get('details') or ''}"
    found = diagnosis.parse_log(text)
    if not found:
        if error.sqlstate == FK_SQLSTATE:
            raise LiteralError("23503 without a 'Key (...)=(...) is not present' detail")
        return error
    error.key, error.constraint = found[0].key, found[0].constraint
    error.table, error.column = found[0].table, found[0].column
    if error.is_fk_violation:
        error.key = _uuid_field({"key": error.key}, "key")
    return error


def classify_record(record: LogRecord, functions: set[str]):
    """Return ``(class, parsed line or None)``, or raise ``LiteralError`` if malformed."""
    if record.function_id and functions and record.function_id not in functions:
        return OTHER_FUNCTION, None
    found = sorted((record.message.find(prefix), prefix)
                   for prefix in (REQUEST_PREFIX, ERROR_PREFIX)
                   if prefix in record.message)
    if not found:
        return OTHER_MESSAGE, None
    at, prefix = found[0]
    try:
        if prefix == REQUEST_PREFIX:
            return REQUEST, parse_request(record, at + len(prefix))
        error = parse_registering_error(record, at + len(prefix))
    except LiteralError as exc:
        raise LiteralError(f"{prefix.rstrip(':')} object: {exc}") from None
    return (FK_VIOLATION if error.is_fk_violation else OTHER_ERROR), error


# --- pairing ----------------------------------------------------------------

@dataclass
class LostAttempt:
    """A message that was sent while the FK rejected its key, so no row was saved."""

    attempt_id: str
    customer_id: str
    invoice_id: str
    sent_at: dt.datetime
    failed_at: dt.datetime
    execution_id: str | None
    record: int
    phone: str | None
    message: str | None


def attempt_id_for(execution_id: str | None, sent_at: dt.datetime, key: str) -> str:
    """Return the deterministic id of a recovered attempt.

    The uuid5 name is the execution id and key when the log has an
    execution id, else the request's UTC time to the microsecond and the
    key. Time-based ids therefore change if a second export rounds the
    timestamps differently.
    """
    if execution_id:
        name = f"execution:{execution_id}:{key}"
    else:
        name = f"sent:{sent_at.astimezone(dt.timezone.utc).isoformat()}:{key}"
    return str(uuid.uuid5(ATTEMPT_ID_NAMESPACE, name))


class _Pairing:
    """Requests indexed by execution id and by key, with the ones already paired."""

    def __init__(self, requests: list[Request]):
        self.ordered = sorted(requests, key=lambda r: (r.timestamp, r.number))
        self.by_execution: dict[str, list[Request]] = {}
        self.by_key: dict[str, list[Request]] = {}
        for request in self.ordered:
            if request.execution_id:
                self.by_execution.setdefault(request.execution_id, []).append(request)
            self.by_key.setdefault(request.invoice_id, []).append(request)
        self.taken: set[int] = set()

    def free(self, pool, error: RegisteringError, match_key: bool):
        return [r for r in pool if r.number not in self.taken
                and (not match_key or r.invoice_id == error.key)]

    def in_execution(self, error: RegisteringError, match_key: bool) -> Request | None:
        """Return the request of the error's execution, the latest not after it."""
        pool = self.free(self.by_execution.get(error.execution_id, []), error, match_key)
        earlier = [r for r in pool if r.timestamp <= error.timestamp]
        if earlier:
            return earlier[-1]
        return pool[0] if pool else None

    def in_window(self, error: RegisteringError, match_key: bool,
                  window_s: float) -> Request | None:
        """Return the latest request at most ``window_s`` before the error."""
        pool = self.by_key.get(error.key, []) if match_key else self.ordered
        for request in reversed(self.free(pool, error, match_key)):
            elapsed = (error.timestamp - request.timestamp).total_seconds()
            other_execution = (request.execution_id and error.execution_id
                               and request.execution_id != error.execution_id)
            if 0 <= elapsed <= window_s and not other_execution:
                return request
        return None


def pair_events(requests: list[Request], fk_errors: list[RegisteringError],
                other_errors: list[RegisteringError], window_s: float):
    """Pair each error with its request and return (pairs, unpaired errors).

    An error pairs with the request of its own execution. An error left
    over pairs with the latest free request at most ``window_s`` seconds
    earlier whose execution id is missing or equal. A 23503 pairs only with
    a request for the same invoice_id, and 23503s pair before other errors.
    ``pairs`` maps a request's record number to ``(error, how)``.
    """
    pairing = _Pairing(requests)
    pairs: dict[int, tuple[RegisteringError, str]] = {}
    unpaired = []
    for group, match_key in ((fk_errors, True), (other_errors, False)):
        waiting = []
        for error in sorted(group, key=lambda e: (e.timestamp, e.number)):
            request = pairing.in_execution(error, match_key) if error.execution_id else None
            if request is None:
                waiting.append(error)
                continue
            pairing.taken.add(request.number)
            pairs[request.number] = (error, "execution id")
        for error in waiting:
            request = pairing.in_window(error, match_key, window_s)
            if request is None:
                unpaired.append(error)
                continue
            pairing.taken.add(request.number)
            pairs[request.number] = (error, "time window")
    return pairs, unpaired


# --- the analysis -----------------------------------------------------------

@dataclass
class LogAnalysis:
    """Counts per class, lost attempts and rejects of one log export."""

    export_format: str
    records: int
    pairing_window_s: float
    counts: dict[str, int]
    outcomes: dict[str, int]
    paired_by: dict[str, int]
    lost: list[LostAttempt]
    unparsed: list[Unparsed]
    unpaired: list[dict]
    first_failure: dt.datetime | None
    last_failure: dt.datetime | None
    # The export's file path, set by ``read_export``.
    source: str | None = None
    # The header row of a CSV export, for the message of ``check_parsed``.
    csv_header: list[str] | None = None

    def lost_frame(self) -> pd.DataFrame:
        """Return the lost attempts, oldest first, one row each."""
        columns = ["attempt_id", "customer_id", "invoice_id", "sent_at",
                   "execution_id", "phone", "message"]
        return pd.DataFrame([{name: getattr(a, name) for name in columns}
                             for a in self.lost], columns=columns)

    def counts_frame(self) -> pd.DataFrame:
        """Return the record classes and the pairing outcomes with their counts."""
        rows = [("record", name, self.counts[name], RECORD_CLASS_MEANINGS[name])
                for name in RECORD_CLASSES]
        rows += [("outcome", name, self.outcomes[name], OUTCOME_MEANINGS[name])
                 for name in OUTCOMES]
        return pd.DataFrame(rows, columns=["kind", "name", "count", "meaning"])

    def unparsed_frame(self) -> pd.DataFrame:
        """Return the records that could not be parsed, in export order."""
        return pd.DataFrame([asdict(item) for item in self.unparsed],
                            columns=["number", "reason", "timestamp"])


def validate_window(value) -> float:
    """Return the pairing window in seconds, or raise ``ParameterError``."""
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(str(value).strip())
    except ValueError:
        raise ParameterError(
            f"pairing_window_s must be a number of seconds, got {value!r}.") from None
    if not 0 <= seconds <= 3600:
        raise ParameterError(
            f"pairing_window_s must be between 0 and 3600 seconds, got {seconds:g}.")
    return seconds


@dataclass
class _Classified:
    counts: Counter
    requests: list[Request] = field(default_factory=list)
    fk_errors: list[RegisteringError] = field(default_factory=list)
    other_errors: list[RegisteringError] = field(default_factory=list)


def _classify_all(records: list[LogRecord], unparsed: list[Unparsed]) -> _Classified:
    functions = collection_function_ids(records)
    result = _Classified(Counter({name: 0 for name in RECORD_CLASSES}))
    lists = {REQUEST: result.requests, FK_VIOLATION: result.fk_errors,
             OTHER_ERROR: result.other_errors}
    for record in records:
        try:
            kind, parsed = classify_record(record, functions)
        except LiteralError as exc:
            unparsed.append(Unparsed(record.number, str(exc), record.timestamp))
            continue
        result.counts[kind] += 1
        if kind in lists:
            lists[kind].append(parsed)
    unparsed.sort(key=lambda item: item.number)
    result.counts[UNPARSED] = len(unparsed)
    return result


def analyse_export(text: str, pairing_window_s=DEFAULT_PAIRING_WINDOW_S) -> LogAnalysis:
    """Read an export, classify every record and list the lost attempts."""
    window_s = validate_window(pairing_window_s)
    export_format, records, unparsed = load_records(text)
    total = len(records) + len(unparsed)

    classified = _classify_all(records, unparsed)
    pairs, unpaired = pair_events(classified.requests, classified.fk_errors,
                                  classified.other_errors, window_s)
    outcomes, lost = _collect_outcomes(classified.requests, pairs, unpaired)

    failures = sorted(error.timestamp for error in classified.fk_errors)
    if unparsed:
        logger.warning("%d record(s) of the log export could not be parsed, "
                       "see LogAnalysis.unparsed for the reasons", len(unparsed))
    return LogAnalysis(
        export_format, total, window_s, dict(classified.counts), outcomes,
        dict(Counter(how for _, how in pairs.values())), lost, unparsed,
        [_describe_unpaired(e, window_s) for e in unpaired if e.is_fk_violation],
        failures[0] if failures else None, failures[-1] if failures else None,
        csv_header=read_csv_header(text) if export_format == "csv" else None)


def check_parsed(analysis: LogAnalysis, source: str) -> None:
    """Raise ``ParameterError`` if the export has no record, or none that parsed.

    An export the parser could not read would otherwise count 0 lost
    attempts, which reads as "nothing was lost". ``source`` names the
    export in the message, for example ``log_export '/tmp/logs.csv'``.
    """
    if analysis.records == 0:
        raise ParameterError(
            f"No record was found in {source} (read as {analysis.export_format}), "
            f"so the lost attempts cannot be counted and nothing was inserted. "
            f"{EXPORT_HINT}")
    if analysis.counts[UNPARSED] < analysis.records:
        return
    reasons = Counter(item.reason for item in analysis.unparsed)
    listed = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common(3))
    # The header is described, not shown, because a file without one has a
    # log line there, which may contain a phone number.
    header = ""
    if analysis.csv_header is not None:
        names = {name.strip().lower() for name in analysis.csv_header}
        missing = [name for name in ("timestamp", "event_message") if name not in names]
        header = f" The CSV header has {len(analysis.csv_header)} column(s)"
        header += f" and no column named {' or '.join(missing)}." if missing else "."
        if any(";" in name for name in analysis.csv_header):
            header += " It contains semicolons, so the file looks semicolon-separated."
    raise ParameterError(
        f"No record of {source} could be parsed: all {analysis.records} "
        f"record(s) are invalid (read as {analysis.export_format}; reasons: "
        f"{listed}), so the lost attempts cannot be counted and nothing was "
        f"inserted.{header} {EXPORT_HINT}")


def _collect_outcomes(requests, pairs, unpaired) -> tuple[dict, list[LostAttempt]]:
    outcomes = Counter({name: 0 for name in OUTCOMES})
    lost: dict[str, LostAttempt] = {}
    for request in requests:
        error, _ = pairs.get(request.number, (None, None))
        if error is None:
            outcomes[SUCCEEDED] += 1
        elif not error.is_fk_violation:
            outcomes[FAILED_OTHER] += 1
        else:
            attempt = _lost_attempt(request, error)
            outcome = DUPLICATE if attempt.attempt_id in lost else LOST
            outcomes[outcome] += 1
            lost.setdefault(attempt.attempt_id, attempt)
    for error in unpaired:
        outcomes[UNPAIRED_FK_VIOLATION if error.is_fk_violation
                 else UNPAIRED_OTHER_ERROR] += 1
    ordered = sorted(lost.values(), key=lambda a: (a.sent_at, a.attempt_id))
    return dict(outcomes), ordered


def _lost_attempt(request: Request, error: RegisteringError) -> LostAttempt:
    execution_id = request.execution_id or error.execution_id
    return LostAttempt(
        attempt_id_for(execution_id, request.timestamp, request.invoice_id),
        request.customer_id, request.invoice_id, request.timestamp,
        error.timestamp, execution_id, request.number, request.phone,
        request.message)


def _describe_unpaired(error: RegisteringError, window_s: float) -> dict:
    window = f"the {window_s:g} s before it"
    where = f"execution {error.execution_id} or {window}" if error.execution_id else window
    return {"number": error.number, "timestamp": error.timestamp, "key": error.key,
            "reason": f"no Received request for this key in {where}"}


def read_export(path, pairing_window_s=DEFAULT_PAIRING_WINDOW_S) -> LogAnalysis:
    """Read the log export at ``path`` and analyse it with ``analyse_export``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ParameterError(
            f"log_export {str(path)!r} was not found (relative paths start in "
            f"{Path.cwd()}). Export the edge function's logs from the "
            f"dashboard as CSV or JSON and give the file's path."
        ) from None
    except UnicodeDecodeError as exc:
        raise ParameterError(
            f"log_export {str(path)!r} is not UTF-8 text ({exc.reason} at byte "
            f"{exc.start}); export it again as CSV or JSON."
        ) from None
    analysis = analyse_export(text, pairing_window_s)
    analysis.source = str(path)
    return analysis


def check_export_path(log_export) -> None:
    """Raise ``ParameterError`` if ``log_export`` is set but names no file."""
    if not isinstance(log_export, (str, Path)):
        raise ParameterError(
            f"log_export must be a file path or empty, got {type(log_export).__name__}.")
    if str(log_export) and not Path(log_export).is_file():
        raise ParameterError(
            f"log_export {str(log_export)!r} is not a file (relative paths start "
            f"in {Path.cwd()}). Give the path of the dashboard's CSV or JSON export.")
