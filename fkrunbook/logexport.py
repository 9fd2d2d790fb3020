"""Read a hosting dashboard's export of the edge function logs into records.

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

A ``LogRecord`` keeps its message text, which may contain a phone number,
and leaves it out of its repr. ``log_analysis`` parses that text and masks
the phone number and message.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from dataclasses import dataclass, field

from .errors import ParameterError


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


def read_csv_header(text: str) -> list[str]:
    """Return the header row of a CSV export, or an empty list if it has none."""
    try:
        return next(csv.reader(io.StringIO(text.lstrip("\ufeff"), newline="")), [])
    except csv.Error:
        return []


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
