"""Recover the collection attempts that the wrong FK lost, from the function logs.

The edge function logs ``Received request: {...}`` before it calls n8n, and
``Error registering attempt: {...}`` when the insert that follows fails. A
request followed by a 23503 on ``collection_attempts.invoice_id`` is a
message that went out and left no row. This module reads the hosting
dashboard's log export, pairs those lines, and inserts the missing rows as
the app would, under ids derived from the log so that a re-run adds nothing.

Accepted export shapes, detected by content:

- CSV with a header row. The execution id is read from a column named
  ``execution_id``, ``metadata.execution_id`` or ``metadata.0.execution_id``,
  or from a ``metadata`` column holding JSON; ``function_id`` likewise.
- A JSON array of objects, or an object whose ``result`` or ``data`` key
  contains that array (the shape of the logs API).
- JSON lines, one object per line.

Each row needs ``event_message`` and ``timestamp``: ISO 8601, or epoch
seconds, milliseconds, microseconds or nanoseconds distinguished by
magnitude (Supabase writes microseconds). ``metadata`` may be one object or a
list of objects, as Supabase's function logs have it. An ISO timestamp
without an offset is taken as UTC.

Phone numbers and message texts are masked as soon as a line is parsed, so
no value returned or written by this module contains them.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import re
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import psycopg
from psycopg import errors, sql

from . import catalog, diagnosis, migration, parameters
from .errors import ParameterError, PreflightError

logger = logging.getLogger(__name__)

REQUEST_PREFIX = "Received request:"
ERROR_PREFIX = "Error registering attempt:"
FK_SQLSTATE = "23503"
FK_TABLE = "collection_attempts"
FK_COLUMN = "invoice_id"
DEFAULT_PAIRING_WINDOW_S = 10.0
RECOVERED_NOTE_PREFIX = "Recovered from edge function logs"

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


# --- masking --------------------------------------------------------------

def mask_phone(phone) -> str | None:
    """Return ``phone`` with all but its first and last four characters starred.

    Numbers of eight characters or fewer keep only their last two.
    """
    if phone is None:
        return None
    text = str(phone)
    if len(text) > 8:
        return text[:4] + "*" * (len(text) - 8) + text[-4:]
    if len(text) > 2:
        return "*" * (len(text) - 2) + text[-2:]
    return "*" * len(text)


def mask_message(message) -> str | None:
    """Return the length of a message text in place of the text."""
    if message is None:
        return None
    return f"[{len(str(message))} chars]"


def mask_name(name) -> str:
    """Return a customer name as its initials, such as ``M. D.``."""
    if not name:
        return "(unknown)"
    return " ".join(f"{part[0].upper()}." for part in str(name).split())


# --- JavaScript object literals ---------------------------------------------

class LiteralError(ValueError):
    """A console-printed object could not be parsed; the message gives the offset."""


_IDENTIFIER = re.compile(r"[A-Za-z_$][\w$]*")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?n?")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f",
                   "v": "\v", "0": "\0"}
_KEYWORDS = {"null": None, "undefined": None, "true": True, "false": False}
_QUOTES = "'\"`"
# Deno prints nested values past its depth limit as [Object], [Array] and the like.
_DEPTH_MARKER = re.compile(r"\s*([A-Za-z][\w :$.*-]*)\]")


class _LiteralParser:
    """Recursive-descent parser for objects as Deno's console prints them.

    Keys may be bare identifiers or quoted. Strings use ', " or `, and
    values may be null, undefined, booleans, numbers, arrays and nested
    objects. Deno's ``[Object]`` and ``[Array]`` depth markers become plain
    strings. Error messages give offsets only, never the text, because it
    may contain a phone number.
    """

    def __init__(self, text: str, position: int = 0):
        self.text = text
        self.position = position

    def fail(self, what: str):
        raise LiteralError(f"{what} at offset {self.position}")

    def skip_space(self) -> None:
        while self.position < len(self.text) and self.text[self.position].isspace():
            self.position += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.position] if self.position < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            self.fail(f"expected {char!r}")
        self.position += 1

    def value(self):
        char = self.peek()
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        if char and char in _QUOTES:
            return self.concatenated_string()
        number = _NUMBER.match(self.text, self.position)
        if number:
            self.position = number.end()
            literal = number.group().rstrip("n")
            return float(literal) if any(c in literal for c in ".eE") else int(literal)
        word = _IDENTIFIER.match(self.text, self.position)
        if word and word.group() in _KEYWORDS:
            self.position = word.end()
            return _KEYWORDS[word.group()]
        self.fail("expected a value" if char else "unexpected end of text")

    def object(self) -> dict:
        self.expect("{")
        result = {}
        while self.peek() != "}":
            key = self.key()
            self.expect(":")
            result[key] = self.value()
            if self.peek() == ",":
                self.position += 1
            elif self.peek() != "}":
                self.fail("expected ',' or '}'")
        self.position += 1
        return result

    def key(self) -> str:
        char = self.peek()
        if char and char in _QUOTES:
            return self.string()
        match = _IDENTIFIER.match(self.text, self.position) or \
            _NUMBER.match(self.text, self.position)
        if not match:
            self.fail("expected a property name")
        self.position = match.end()
        return match.group()

    def array(self) -> list | str:
        self.expect("[")
        marker = _DEPTH_MARKER.match(self.text, self.position)
        if marker and marker.group(1).strip() not in _KEYWORDS:
            self.position = marker.end()
            return f"[{marker.group(1)}]"
        items = []
        while self.peek() != "]":
            items.append(self.value())
            if self.peek() == ",":
                self.position += 1
            elif self.peek() != "]":
                self.fail("expected ',' or ']'")
        self.position += 1
        return items

    def concatenated_string(self) -> str:
        # Older inspectors split long strings as 'abc' +\n 'def'.
        parts = [self.string()]
        while self.peek() == "+":
            self.position += 1
            if not self.peek() or self.peek() not in _QUOTES:
                self.fail("expected a string after '+'")
            parts.append(self.string())
        return "".join(parts)

    def string(self) -> str:
        self.skip_space()
        quote = self.text[self.position]
        start = self.position
        self.position += 1
        chars = []
        while self.position < len(self.text):
            char = self.text[self.position]
            if char == quote:
                self.position += 1
                return "".join(chars)
            if char == "\\":
                chars.append(self.escape())
                continue
            chars.append(char)
            self.position += 1
        self.position = start
        self.fail("unterminated string")

    def escape(self) -> str:
        code = self.text[self.position + 1:self.position + 2]
        self.position += 2
        if code in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[code]
        if code in ("x", "u"):
            width = 2 if code == "x" else 4
            if code == "u" and self.text.startswith("{", self.position):
                end = self.text.find("}", self.position)
                if end < 0:
                    self.fail("invalid escape sequence")
                digits, self.position = self.text[self.position + 1:end], end + 1
            else:
                digits = self.text[self.position:self.position + width]
                self.position += width
            try:
                return chr(int(digits, 16))
            except ValueError:
                self.fail("invalid escape sequence")
        return code


def parse_js_object(text: str, start: int = 0) -> dict:
    """Parse the console-printed object that starts at or after ``start``.

    Raises ``LiteralError`` when no object follows or it is malformed.
    Text after the closing brace is ignored.
    """
    parser = _LiteralParser(text, start)
    if parser.peek() != "{":
        parser.fail("expected '{'")
    return parser.object()


# --- reading the export -----------------------------------------------------

@dataclass
class LogRecord:
    """One row of the export, with its message not yet read."""

    number: int
    timestamp: dt.datetime
    message: str = field(repr=False)
    execution_id: str | None
    function_id: str | None


@dataclass
class Unparsed:
    """A record that could not be read, with the reason but not its text."""

    number: int
    reason: str
    timestamp: dt.datetime | None = None


def parse_timestamp(value) -> dt.datetime:
    """Return an export timestamp as an aware UTC datetime.

    Numbers are epoch seconds, milliseconds, microseconds or nanoseconds,
    distinguished by magnitude. Raises ``ValueError`` for anything else.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError("timestamp is missing")
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value):
        value = float(value) if "." in value else int(value)
    if isinstance(value, (int, float)):
        return _from_epoch(value)
    text = str(value).strip()
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("timestamp is neither ISO 8601 nor an epoch number") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.astimezone(dt.timezone.utc)


def _from_epoch(number: int | float) -> dt.datetime:
    magnitude = abs(number)
    if magnitude >= 1e17:
        microseconds = int(number) // 1000
    elif magnitude >= 1e14:
        microseconds = int(number)
    elif magnitude >= 1e11:
        microseconds = int(round(number * 1000))
    else:
        microseconds = int(round(number * 1_000_000))
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return epoch + dt.timedelta(microseconds=microseconds)


def detect_format(text: str) -> str:
    """Return ``"json array"``, ``"json object"``, ``"json lines"`` or ``"csv"``."""
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("["):
        return "json array"
    if stripped.startswith("{"):
        first_line = stripped.split("\n", 1)[0]
        try:
            json.loads(first_line)
        except json.JSONDecodeError:
            return "json object"
        return "json lines"
    return "csv"


def _rows_from_json(text: str, export_format: str):
    try:
        document = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as exc:
        raise ParameterError(
            f"The log export looks like {export_format} but is not valid JSON "
            f"({exc.msg} at line {exc.lineno}, column {exc.colno}); export it "
            f"again from the dashboard."
        ) from None
    if isinstance(document, dict):
        document = next((document[key] for key in ("result", "data")
                         if isinstance(document.get(key), list)), [document])
    for number, row in enumerate(document, start=1):
        yield number, row, None


def _rows_from_json_lines(text: str):
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield number, None, f"invalid JSON ({exc.msg} at column {exc.colno})"


def _rows_from_csv(text: str):
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    try:
        for number, row in enumerate(reader, start=1):
            if None in row:
                yield number, None, (f"row has more fields than the header's "
                                     f"{len(reader.fieldnames)}")
            else:
                yield number, row, None
    except csv.Error as exc:
        yield reader.line_num, None, f"invalid CSV ({exc})"


def _metadata_items(row: dict) -> list[dict]:
    metadata = row.get("metadata")
    if isinstance(metadata, str) and metadata.strip()[:1] in ("{", "["):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            metadata = None
    if isinstance(metadata, dict):
        return [metadata]
    if isinstance(metadata, list):
        return [item for item in metadata if isinstance(item, dict)]
    return []


def lookup_metadata(row: dict, name: str) -> str | None:
    """Return ``name`` from a row's columns or its ``metadata``, or None.

    Matches a column ``name``, a flattened ``metadata.name`` or
    ``metadata.0.name`` / ``metadata[0].name``, then the ``metadata``
    object or list itself.
    """
    for key, value in row.items():
        if not isinstance(key, str):
            continue
        flat = re.sub(r"\[\d+\]|\.\d+(?=\.)", "", key.strip().lower())
        if flat in (name, f"metadata.{name}") and value not in (None, ""):
            return str(value)
    for item in _metadata_items(row):
        if item.get(name) not in (None, ""):
            return str(item[name])
    return None


def _record_from_row(number: int, row) -> LogRecord | Unparsed:
    if not isinstance(row, dict):
        return Unparsed(number, "row is not a JSON object")
    message = row.get("event_message")
    if not isinstance(message, str) or not message.strip():
        return Unparsed(number, "missing event_message")
    try:
        timestamp = parse_timestamp(row.get("timestamp"))
    except ValueError as exc:
        return Unparsed(number, f"invalid timestamp: {exc}")
    return LogRecord(number, timestamp, message, lookup_metadata(row, "execution_id"),
                     lookup_metadata(row, "function_id"))


def load_records(text: str) -> tuple[str, list[LogRecord], list[Unparsed]]:
    """Split an export into records and return its format, the records and the rejects."""
    if not isinstance(text, str):
        raise ParameterError(f"the log export must be text, got {type(text).__name__}.")
    export_format = detect_format(text)
    if export_format == "json lines":
        rows = _rows_from_json_lines(text)
    elif export_format == "csv":
        rows = _rows_from_csv(text)
    else:
        rows = _rows_from_json(text, export_format)
    records, unparsed = [], []
    for number, row, problem in rows:
        item = Unparsed(number, problem) if problem else _record_from_row(number, row)
        (unparsed if isinstance(item, Unparsed) else records).append(item)
    return export_format, records, unparsed


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
        failures[0] if failures else None, failures[-1] if failures else None)


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
    return analyse_export(text, pairing_window_s)


def check_export_path(log_export) -> None:
    """Raise ``ParameterError`` if ``log_export`` is set but names no file."""
    if not isinstance(log_export, (str, Path)):
        raise ParameterError(
            f"log_export must be a file path or empty, got {type(log_export).__name__}.")
    if str(log_export) and not Path(log_export).is_file():
        raise ParameterError(
            f"log_export {str(log_export)!r} is not a file (relative paths start "
            f"in {Path.cwd()}). Give the path of the dashboard's CSV or JSON export.")


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
    to apply first. An apply run then raises ``PreflightError``, unless
    ``raise_when_blocked`` is false. The notebook passes false so that it
    can record the outcome before ``require_unblocked`` raises.
    """
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
    return (f"Read **{analysis.records}** record(s) from the {source} "
            f"({analysis.export_format}): **{analysis.outcomes[LOST]}** lost "
            f"attempt(s), {analysis.outcomes[SUCCEEDED]} request(s) with no "
            f"error after them, {analysis.counts[UNPARSED]} record(s) not "
            f"parsed. Errors paired with their request: {paired or 'none'}.")


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


# --- the demo export --------------------------------------------------------

DEMO_COLLECTOR_ID = "1fc9c9b6-95ab-4b87-8d1c-2f7c3d1e0a01"
DEMO_FUNCTION_ID = "c6d1e1a2-6f1f-5a55-9d0b-3c1f5e0b7a10"
DEMO_OTHER_FUNCTION_ID = "0b6f0a54-2f8e-5c2e-8d4a-7d3a5c9e1b20"

# (UTC time, contract number or None, kind of line). Contracts whose number
# is a multiple of 3 have an invoice with their own id, so the old FK
# accepted them and the others failed. OC-2025-0043 has the incident's key.
_DEMO_TIMELINE = (
    ("2026-11-10T13:02:11.204Z", "OC-2025-0003", "saved"),
    ("2026-11-10T13:15:40.512Z", "OC-2025-0043", "lost"),
    ("2026-11-10T14:20:05.090Z", "OC-2025-0001", "lost"),
    ("2026-11-10T14:20:30.000Z", None, "other function"),
    ("2026-11-10T15:45:00.731Z", "OC-2025-0006", "saved"),
    ("2026-11-10T16:10:12.318Z", "OC-2025-0002", "lost"),
    ("2026-11-11T09:05:00.017Z", None, "boot"),
    ("2026-11-11T09:05:01.442Z", "OC-2025-0043", "lost"),
    ("2026-11-11T09:30:00.905Z", "OC-2025-0004", "lost"),
    ("2026-11-11T10:00:00.300Z", "OC-2025-0007", "truncated"),
    ("2026-11-11T10:12:45.660Z", "OC-2025-0009", "saved"),
    ("2026-11-11T11:40:20.128Z", "OC-2025-0005", "lost"),
)


def _js_string(value: str) -> str:
    if '"' in value and "'" not in value:
        return f"'{value}'"
    return json.dumps(value, ensure_ascii=False)


def format_js_object(payload: dict, multiline: bool = False) -> str:
    """Return ``payload`` printed the way Deno's console prints an object."""
    items = [f"{key}: {'null' if value is None else _js_string(str(value))}"
             for key, value in payload.items()]
    if multiline:
        return "{\n" + ",\n".join(f"  {item}" for item in items) + "\n}"
    return "{ " + ", ".join(items) + " }"


def demo_export(conn: psycopg.Connection) -> str:
    """Return a small synthetic log export (JSON lines) for the demo database.

    The same database always gives the same text: five contracts failed
    (OC-2025-0043, with the incident's key, twice), three were saved, and
    one line of another function, one boot line and one truncated request
    show how other records are counted.
    """
    numbers = sorted({number for _, number, _ in _DEMO_TIMELINE if number})
    rows = conn.execute(
        "SELECT c.contract_number, c.id::text, c.customer_id::text, cu.name, cu.phone"
        " FROM operator_contracts c JOIN customers cu ON cu.id = c.customer_id"
        " WHERE c.contract_number = ANY(%s)", [numbers]).fetchall()
    contracts = {row[0]: row[1:] for row in rows}
    lines = []
    for index, (iso_time, number, kind) in enumerate(_DEMO_TIMELINE, start=1):
        lines += _demo_records(index, parse_timestamp(iso_time), kind,
                               contracts.get(number))
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def _demo_records(index: int, sent_at: dt.datetime, kind: str, contract) -> list[dict]:
    execution_id = str(uuid.uuid5(ATTEMPT_ID_NAMESPACE, f"demo-execution:{index}"))

    def record(offset_ms: int, message: str, function_id=DEMO_FUNCTION_ID) -> dict:
        moment = sent_at + dt.timedelta(milliseconds=offset_ms)
        micros = int((moment - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc))
                     / dt.timedelta(microseconds=1))
        return {"timestamp": micros, "event_message": message,
                "metadata": [{"execution_id": execution_id, "function_id": function_id,
                              "level": "info", "event_type": "Log"}]}

    if kind == "other function":
        return [record(0, "Webhook received: payment status update",
                       DEMO_OTHER_FUNCTION_ID)]
    if kind == "boot":
        return [record(0, "booted (time: 27ms)")]
    contract_id, customer_id, name, phone = contract
    request = format_js_object({
        "instance_id": "inst-01", "phone": phone,
        "message": f"Olá {name.split()[0]}, consta um valor em aberto no seu "
                   f"contrato. Responda esta mensagem para negociar.",
        "customer_id": customer_id, "invoice_id": contract_id})
    if kind == "truncated":
        return [record(0, f"{REQUEST_PREFIX} {request[:60]}")]
    lines = [record(0, f"{REQUEST_PREFIX} {request}")]
    if kind == "lost":
        lines.append(record(840, ERROR_PREFIX + " " + format_js_object({
            "code": FK_SQLSTATE,
            "details": f'Key (invoice_id)=({contract_id}) is not present in '
                       f'table "invoices".',
            "hint": None,
            "message": 'insert or update on table "collection_attempts" violates '
                       'foreign key constraint "collection_attempts_invoice_id_fkey"',
        }, multiline=True)))
    return lines


def load_export(log_export, conn: psycopg.Connection, is_demo: bool,
                pairing_window_s=DEFAULT_PAIRING_WINDOW_S) -> tuple[str, LogAnalysis]:
    """Return (source, analysis) of ``log_export``, or of the demo export if empty."""
    if log_export not in (None, ""):
        return str(log_export), read_export(log_export, pairing_window_s)
    if not is_demo:
        raise ParameterError(
            "log_export is empty. Give the path of the edge function's log "
            "export (CSV or JSON from the dashboard), because only demo mode "
            "generates a synthetic export.")
    return "synthetic demo export", analyse_export(demo_export(conn), pairing_window_s)
