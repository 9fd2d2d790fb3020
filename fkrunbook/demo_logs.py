"""Generate a synthetic edge function log export for the demo database.

``recovery.load_export`` reads it in demo mode when ``log_export`` is empty.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import psycopg

from .js_literal import format_js_object
from .log_analysis import (ATTEMPT_ID_NAMESPACE, ERROR_PREFIX, FK_SQLSTATE,
                           REQUEST_PREFIX)
from .logexport import parse_timestamp

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
