"""Parse the failing log, re-run the app's insert, and find each key's owner."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import asdict, dataclass, field

import psycopg
from psycopg import errors, sql

from .errors import ParameterError
from .paths import read_sql

logger = logging.getLogger(__name__)

_SQLSTATE = re.compile(r"""\bcode\b["']?\s*[:=]?\s*["']?(?P<sqlstate>[0-9A-Z]{5})\b""")
_VIOLATION = re.compile(
    r'(?:insert or update|update or delete) on table "(?P<table>[^"]+)" '
    r'violates foreign key constraint "(?P<constraint>[^"]+)"'
)
_DETAIL = re.compile(
    r'Key \((?P<column>[^)]+)\)=\((?P<key>[^)]*)\) is (?:not present|still referenced)'
    r' (?:in|from) table "(?P<referenced>[^"]+)"'
)

# The app's insert after a WhatsApp send, as the edge function issues it.
APP_CHANNEL = "whatsapp"
APP_STATUS = "sent"
APP_NOTES = "Runbook check: WhatsApp collection message"


@dataclass
class FailingKey:
    """One 23503 taken from the log or from the ``keys`` parameter."""

    key: str
    sqlstate: str = "23503"
    constraint: str = "collection_attempts_invoice_id_fkey"
    table: str = "collection_attempts"
    column: str = "invoice_id"
    referenced_table: str = "invoices"
    occurrences: int = 1


@dataclass
class _Record:
    fields: dict = field(default_factory=dict)


def parse_log(text: str) -> list[FailingKey]:
    """Return the failing keys found in pasted log text, in order of appearance.

    Recognises the edge function's ``Error registering attempt`` object and
    PostgreSQL's own message and detail lines; several entries may be
    pasted. A key seen more than once is listed once with its count.
    """
    if not isinstance(text, str):
        raise ParameterError(
            f"log_text must be text, got {type(text).__name__}; paste the "
            f"log lines between triple quotes."
        )
    events = []
    for name, pattern in (("sqlstate", _SQLSTATE), ("violation", _VIOLATION),
                          ("detail", _DETAIL)):
        for match in pattern.finditer(text):
            events.append((match.start(), name, match.groupdict()))
    events.sort(key=lambda event: event[0])

    records: list[_Record] = []
    current = _Record()
    for _, name, groups in events:
        if name in current.fields:
            records.append(current)
            current = _Record()
        current.fields[name] = groups
    records.append(current)

    found: dict[tuple, FailingKey] = {}
    for record in records:
        detail = record.fields.get("detail")
        if detail is None:
            continue
        violation = record.fields.get("violation", {})
        sqlstate = record.fields.get("sqlstate", {}).get("sqlstate", "23503")
        failing = FailingKey(
            key=detail["key"].strip(),
            sqlstate=sqlstate,
            constraint=violation.get("constraint", "collection_attempts_invoice_id_fkey"),
            table=violation.get("table", "collection_attempts"),
            column=detail["column"].strip(),
            referenced_table=detail["referenced"],
        )
        identity = (failing.key, failing.constraint)
        if identity in found:
            found[identity].occurrences += 1
        else:
            found[identity] = failing
    return list(found.values())


def failing_keys_from_parameters(keys, log_text: str) -> list[FailingKey]:
    """Combine the ``keys`` and ``log_text`` parameters into validated keys.

    ``keys`` is a list of uuids or one comma- or space-separated string.
    Raises ``ParameterError`` when neither gives a key or a key is not a uuid.
    """
    if keys is None:
        keys = []
    if isinstance(keys, str):
        keys = [part for part in re.split(r"[\s,]+", keys) if part]
    if not isinstance(keys, (list, tuple)):
        raise ParameterError(
            f"keys must be a list of uuids or a comma-separated string, got "
            f"{type(keys).__name__} {keys!r}."
        )
    failing = [FailingKey(key=str(key).strip()) for key in keys]
    failing += parse_log(log_text or "")
    if not failing:
        raise ParameterError(
            "No failing key given: keys is empty and log_text contains no "
            "'Key (invoice_id)=(...) is not present in table' line. Paste the "
            "'Error registering attempt' log entry into log_text or list the "
            "uuids in keys."
        )
    merged: dict[str, FailingKey] = {}
    for item in failing:
        try:
            item.key = str(uuid.UUID(item.key))
        except ValueError:
            raise ParameterError(
                f"Key {item.key!r} is not a valid uuid; the invoice_id "
                f"columns are of type uuid. Copy the value between the "
                f"parentheses of 'Key (invoice_id)=(...)'."
            ) from None
        if item.key in merged:
            merged[item.key].occurrences += item.occurrences
        else:
            merged[item.key] = item
    return list(merged.values())


def uuid_key_tables(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """Return (schema, table, key column) for every table with a uuid primary key."""
    return conn.execute(read_sql("queries/uuid_primary_keys.sql")).fetchall()


def find_key_owners(conn: psycopg.Connection, keys: list[str]) -> dict[str, list[str]]:
    """Return, for each key, the tables whose uuid primary key contains it."""
    owners: dict[str, list[str]] = {key: [] for key in keys}
    for schema, table, column in uuid_key_tables(conn):
        query = sql.SQL("SELECT {col}::text FROM {tbl} WHERE {col} = ANY(%s::uuid[])").format(
            col=sql.Identifier(column), tbl=sql.Identifier(schema, table))
        for (key,) in conn.execute(query, [keys]).fetchall():
            owners[key].append(f"{schema}.{table}")
    return owners


def customer_for_key(conn: psycopg.Connection, key: str) -> str | None:
    """Return the customer of the contract or invoice ``key``, if either exists."""
    row = conn.execute(
        "SELECT customer_id::text FROM operator_contracts WHERE id = %(key)s"
        " UNION ALL"
        " SELECT customer_id::text FROM invoices WHERE id = %(key)s LIMIT 1",
        {"key": key},
    ).fetchone()
    return row[0] if row else None


def app_insert_query() -> sql.Composed:
    """Return the INSERT the app runs after a send, with placeholders."""
    return sql.SQL(
        "INSERT INTO collection_attempts"
        " (customer_id, invoice_id, collector_id, channel, status, notes)"
        " VALUES (%(customer_id)s, %(invoice_id)s, %(collector_id)s,"
        " {channel}, {status}, %(notes)s)"
        " RETURNING id::text, created_at"
    ).format(channel=sql.Literal(APP_CHANNEL), status=sql.Literal(APP_STATUS))


def _diagnostics(exc: psycopg.Error) -> dict:
    diag = exc.diag
    return {
        "sqlstate": exc.sqlstate,
        "error_class": type(exc).__name__,
        "message": diag.message_primary,
        "detail": diag.message_detail,
        "constraint": diag.constraint_name,
        "schema": diag.schema_name,
        "table": diag.table_name,
    }


def reproduce_insert(conn: psycopg.Connection, key: str, customer_id: str,
                     collector_id: str) -> dict:
    """Run the app's insert for ``key`` in a transaction that is always rolled back.

    Returns the outcome: ``rejected`` with psycopg's diagnostics, ``accepted``
    when the insert would succeed, or ``read-only check`` when the role may
    not insert and only the key's presence in the referenced table was read.
    """
    params = {"customer_id": customer_id, "invoice_id": key,
              "collector_id": collector_id, "notes": APP_NOTES}
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL lock_timeout = '2s'")
            conn.execute("SET LOCAL statement_timeout = '10s'")
            conn.execute(app_insert_query(), params)
    except errors.ForeignKeyViolation as exc:
        return {"key": key, "outcome": "rejected", **_diagnostics(exc)}
    except errors.InsufficientPrivilege as exc:
        logger.warning("insert not permitted for %s (%s); using a read-only check",
                       conn.info.user, exc.sqlstate)
        return read_only_check(conn, key, reason=str(exc.diag.message_primary))
    return {"key": key, "outcome": "accepted", "sqlstate": None,
            "error_class": None, "message": "insert succeeded and was rolled back",
            "detail": None, "constraint": None, "schema": None, "table": None}


def reproduce_all(conn: psycopg.Connection, failing: list[FailingKey],
                  collector_id: str, customer_id: str = "") -> list[dict]:
    """Re-run the app's insert for every failing key; see ``reproduce_insert``.

    The customer is ``customer_id`` when given, else the customer of the
    key's contract or invoice. A key with neither is reported, not inserted.
    """
    results = []
    for item in failing:
        customer = customer_id or customer_for_key(conn, item.key)
        if customer is None:
            results.append({
                "key": item.key, "outcome": "skipped: no customer found",
                "sqlstate": None, "error_class": None,
                "message": "the key is in neither operator_contracts nor "
                           "invoices; set customer_id to re-run the insert",
                "detail": None, "constraint": None, "schema": None, "table": None})
            continue
        results.append(reproduce_insert(conn, item.key, customer, collector_id))
    return results


def read_only_check(conn: psycopg.Connection, key: str, reason: str) -> dict:
    """Check whether ``key`` is in ``invoices`` without writing anything."""
    present = conn.execute("SELECT EXISTS (SELECT 1 FROM invoices WHERE id = %s)",
                           [key]).fetchone()[0]
    outcome = "read-only check: key in invoices" if present else \
        "read-only check: key not in invoices"
    return {"key": key, "outcome": outcome, "sqlstate": None,
            "error_class": None, "message": f"insert not permitted ({reason})",
            "detail": None, "constraint": None, "schema": None, "table": None}


def judge_reproduction(failing: list[FailingKey], results: list[dict]) -> dict:
    """Return whether the re-run insert failed as the log reports, key by key.

    ``reproduced`` needs a 23503 on the log's own constraint for every key,
    so a 23503 on another FK (a wrong customer_id, say) does not count.
    ``already_fixed`` means every insert was accepted: the fix is in place.
    """
    expected = {item.key: item.constraint for item in failing}
    matching = [r for r in results if r["sqlstate"] == "23503"
                and r["constraint"] == expected.get(r["key"])]
    other = [r for r in results if r["outcome"] == "rejected" and r not in matching]
    return {
        "reproduced": bool(results) and len(matching) == len(results),
        "already_fixed": bool(results) and all(r["outcome"] == "accepted" for r in results),
        "other_rejections": [{"key": r["key"], "constraint": r["constraint"]} for r in other],
    }


def describe_reproduction(judgement: dict) -> str:
    """Return one sentence on the outcome of the re-run inserts."""
    if judgement["reproduced"]:
        return "**23503 reproduced for every key** on the constraint the log names."
    if judgement["already_fixed"]:
        return ("**Not reproduced: the insert is accepted for every key**, so a fix "
                "is already in place on this database. Go on with verify.")
    lines = ["**Not reproduced for every key.**"]
    for item in judgement["other_rejections"]:
        lines.append(f"Key {item['key']} was rejected by {item['constraint']}, not by "
                     f"the constraint in the log: check customer_id and collector_id.")
    return " ".join(lines)


def state_root_cause(failing: list[FailingKey], owners: dict[str, list[str]]) -> str:
    """Return the root cause in one sentence, from the keys and their owners."""
    contract_keys = [k.key for k in failing
                     if "public.operator_contracts" in owners.get(k.key, [])
                     and "public.invoices" not in owners.get(k.key, [])]
    if failing and len(contract_keys) == len(failing):
        first = failing[0]
        return (
            f"The app writes operator_contracts ids into {first.table}."
            f"{first.column}, but {first.constraint} only accepts ids from "
            f"{first.referenced_table}: all {len(failing)} failing key(s) "
            f"exist in public.operator_contracts and none in public.invoices."
        )
    missing = [k.key for k in failing if not owners.get(k.key)]
    if missing:
        return (
            f"{len(missing)} of {len(failing)} failing key(s) exist in no table "
            f"with a uuid primary key (first: {missing[0]}); the app sends ids "
            f"that are not in operator_contracts either, so re-pointing the FK "
            f"would not fix them."
        )
    return (
        f"The failing keys are spread over several tables "
        f"({sorted({t for k in failing for t in owners.get(k.key, [])})}); "
        f"check which source the app's collection queue reads before choosing "
        f"a fix."
    )


def as_records(failing: list[FailingKey]) -> list[dict]:
    """Return the keys as plain dicts, for tables and summary.json."""
    return [asdict(item) for item in failing]
