"""Tests of the log-based recovery of lost collection attempts.

Each export is generated here, a few hundred records long, with the class
every record must get written down as it is generated, so the expected
counts never come from the parser under test. The lines are printed the
way Deno's console prints objects, by hand rather than with the package's
own formatter.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import random
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from fkrunbook import (demo_logs, js_literal, log_analysis, logexport, masking, migration,
                       recovery, report)
from fkrunbook.errors import GateError, ParameterError, PreflightError

UTC = dt.timezone.utc
BASE = dt.datetime(2026, 11, 10, 8, 0, 0, 125000, tzinfo=UTC)
SLOT = dt.timedelta(minutes=20)
COLLECTION_FUNCTION_ID = "5c0f3a8e-8a3e-4f43-9d55-0c1b1b6d8e01"
OTHER_FUNCTION_ID = "e2b7c6d4-1f0a-4c1e-b7a3-5d9f8e7c6b02"
COLLECTOR_ID = "7d3f0c52-4a8e-4d1b-9f63-1b2c3d4e5f60"

# Id of contract OC-2025-0043 in sql/seed.sql, the key of the incident log.
INCIDENT_KEY = "2f44c1c9-9c8b-4c76-b56c-527f5242cafd"
# Contracts whose number is a multiple of 3 have an invoice with their own
# id, so the incident's FK accepted their attempts and rejected the others.
LOST_CONTRACTS = [n for n in range(1, 61) if n % 3]
SAVED_CONTRACTS = list(range(3, 61, 3))

VIOLATION = ('insert or update on table "collection_attempts" violates foreign '
             'key constraint "collection_attempts_invoice_id_fkey"')


def seed_uuid(label: str) -> str:
    """Return md5(label)::uuid, the way sql/seed.sql derives its ids."""
    return str(uuid.UUID(hashlib.md5(label.encode()).hexdigest()))


def contract_id(number: int) -> str:
    return INCIDENT_KEY if number == 43 else seed_uuid(f"contract:{number}")


def contract_customer(number: int) -> str:
    return seed_uuid(f"customer:{1 + (number - 1) % 40}")


def phone_for(index: int) -> str:
    return f"55119{70000000 + index:08d}"


def message_for(index: int) -> str:
    """Return a message text with a marker that must never reach an output."""
    return f"Olá cliente, sua parcela venceu. Ref MSGTEXT{index:04d}."


# --- Deno console printing, written out by hand -----------------------------

def js_string(value: str, quote: str = '"') -> str:
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace(quote, "\\" + quote)
    return f"{quote}{escaped}{quote}"


def js_object(pairs: list[tuple[str, str]], multiline: bool) -> str:
    if multiline:
        return "{\n" + ",\n".join(f"  {key}: {value}" for key, value in pairs) + "\n}"
    return "{ " + ", ".join(f"{key}: {value}" for key, value in pairs) + " }"


def request_message(index: int, customer: str, invoice, multiline: bool,
                    omit_invoice: bool = False) -> str:
    message = message_for(index)
    # Deno switches quotes when the text contains the default one.
    style = index % 4
    if style == 1:
        quoted = js_string(f'{message} "Pix" ok', "'")
    elif style == 2:
        quoted = js_string(f"{message} it's \"due\"", "`")
    elif style == 3:
        quoted = js_string(f"{message}\nSegunda linha", '"')
    else:
        quoted = js_string(message)
    pairs = [("instance_id", js_string(f"inst-0{index % 3}")),
             ("phone", js_string(phone_for(index))), ("message", quoted),
             ("customer_id", js_string(customer))]
    if not omit_invoice:
        pairs.append(("invoice_id", js_string(invoice)))
    return "Received request: " + js_object(pairs, multiline)


def fk_error_message(key: str, multiline: bool) -> str:
    pairs = [("code", '"23503"'),
             ("details", js_string(f'Key (invoice_id)=({key}) is not present in '
                                   f'table "invoices".', "'")),
             ("hint", "null"), ("message", js_string(VIOLATION, "'"))]
    return "Error registering attempt: " + js_object(pairs, multiline)


def customer_fk_error_message(customer: str) -> str:
    pairs = [("code", '"23503"'),
             ("details", js_string(f'Key (customer_id)=({customer}) is not present '
                                   f'in table "customers".', "'")),
             ("hint", "null"),
             ("message", js_string('insert or update on table "collection_attempts" '
                                   'violates foreign key constraint '
                                   '"collection_attempts_customer_id_fkey"', "'"))]
    return "Error registering attempt: " + js_object(pairs, True)


def unique_error_message(attempt_id: str) -> str:
    pairs = [("code", '"23505"'),
             ("details", js_string(f"Key (id)=({attempt_id}) already exists.")),
             ("hint", "null"),
             ("message", js_string('duplicate key value violates unique constraint '
                                   '"collection_attempts_pkey"', "'"))]
    return "Error registering attempt: " + js_object(pairs, False)


# --- the generated export ---------------------------------------------------

@dataclass
class Row:
    """One export record and the class the parser must give it."""

    time: object
    message: str
    execution_id: str | None
    function_id: str | None
    expected: str
    reason: str | None = None


@dataclass
class ExportCase:
    rows: list[Row] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    lost: set = field(default_factory=set)
    phones: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)


class ExportBuilder:
    """Builds one export scenario by scenario, each in a slot of its own."""

    def __init__(self, with_ids: bool):
        self.with_ids = with_ids
        self.case = ExportCase()
        self.index = 0

    def execution(self, label: str) -> str | None:
        return seed_uuid(f"execution:{label}") if self.with_ids else None

    def add(self, time, message, execution_id, expected, reason=None,
            function_id=COLLECTION_FUNCTION_ID):
        self.case.rows.append(Row(time, message, execution_id,
                                  function_id if self.with_ids else None,
                                  expected, reason))

    def request(self, at, number, execution_id, multiline=None, copies=1):
        self.index += 1
        self.case.phones.append(phone_for(self.index))
        self.case.markers.append(f"MSGTEXT{self.index:04d}")
        multiline = self.index % 2 == 0 if multiline is None else multiline
        message = request_message(self.index, contract_customer(number),
                                  contract_id(number), multiline)
        for _ in range(copies):
            self.add(at, message, execution_id, log_analysis.REQUEST)

    def lost(self, slot, number, copies=1):
        # copies > 1 logs the same execution again, as an export of
        # overlapping time ranges does.
        at = BASE + slot * SLOT
        execution_id = self.execution(f"lost:{slot}")
        self.request(at, number, execution_id, multiline=False, copies=copies)
        error = fk_error_message(contract_id(number), multiline=slot % 2 == 0)
        for _ in range(copies):
            self.add(at + dt.timedelta(milliseconds=800), error, execution_id,
                     log_analysis.FK_VIOLATION)
        self.case.outcomes[log_analysis.LOST] += 1
        self.case.outcomes[log_analysis.DUPLICATE] += copies - 1
        self.case.lost.add((contract_customer(number), contract_id(number), at))

    def saved(self, slot, number, with_reply_line):
        at = BASE + slot * SLOT
        execution_id = self.execution(f"saved:{slot}")
        self.request(at, number, execution_id)
        if with_reply_line:
            self.add(at + dt.timedelta(milliseconds=1500), "n8n responded: 200 OK",
                     execution_id, log_analysis.OTHER_MESSAGE)
        self.case.outcomes[log_analysis.SUCCEEDED] += 1

    def failed_other(self, slot, number, kind):
        at = BASE + slot * SLOT
        execution_id = self.execution(f"other:{slot}")
        self.request(at, number, execution_id)
        message = (customer_fk_error_message(contract_customer(number)) if kind == "fk"
                   else unique_error_message(seed_uuid(f"attempt-id:{slot}")))
        self.add(at + dt.timedelta(milliseconds=800), message, execution_id,
                 log_analysis.OTHER_ERROR)
        self.case.outcomes[log_analysis.FAILED_OTHER] += 1

    def late_error(self, slot, number):
        # The 23503 comes 30 s after its request and in another execution,
        # so neither pairing rule may join them.
        at = BASE + slot * SLOT
        self.request(at, number, self.execution(f"late-request:{slot}"))
        self.add(at + dt.timedelta(seconds=30), fk_error_message(contract_id(number), True),
                 self.execution(f"late-error:{slot}"), log_analysis.FK_VIOLATION)
        self.case.outcomes[log_analysis.SUCCEEDED] += 1
        self.case.outcomes[log_analysis.UNPAIRED_FK_VIOLATION] += 1

    def other_function(self, slot, variant):
        at = BASE + slot * SLOT + dt.timedelta(seconds=5)
        execution_id = self.execution(f"webhook:{slot}")
        if variant == 0:
            # Another function logs the same prefix, and only its function id
            # distinguishes it.
            self.index += 1
            message = (f'Received request: {{ event: "payment.updated", '
                       f'customer_id: "{contract_customer(3)}", '
                       f'invoice_id: "{contract_id(3)}" }}')
            expected = log_analysis.OTHER_FUNCTION if self.with_ids else log_analysis.REQUEST
            if not self.with_ids:
                self.case.outcomes[log_analysis.SUCCEEDED] += 1
        else:
            message = f"Webhook received: payment status update {variant}"
            expected = (log_analysis.OTHER_FUNCTION if self.with_ids
                        else log_analysis.OTHER_MESSAGE)
        self.add(at, message, execution_id, expected, function_id=OTHER_FUNCTION_ID)

    def boot(self, slot):
        self.add(BASE + slot * SLOT + dt.timedelta(seconds=7), "booted (time: 31ms)",
                 self.execution(f"boot:{slot}"), log_analysis.OTHER_MESSAGE)

    def malformed(self, slot, variant):
        at = BASE + slot * SLOT + dt.timedelta(seconds=9)
        execution_id = self.execution(f"bad:{slot}")
        self.index += 1
        self.case.phones.append(phone_for(self.index))
        self.case.markers.append(f"MSGTEXT{self.index:04d}")
        customer, key = contract_customer(1), contract_id(1)
        full = request_message(self.index, customer, key, multiline=False)
        cases = [
            (full[:full.index("MSGTEXT") + 11], "unterminated string"),
            (request_message(self.index, customer, key, False, omit_invoice=True),
             "invoice_id is missing"),
            (full.replace(key, "INV-2025-0001"), "invoice_id is not a uuid"),
            ('Error registering attempt: { code: "23503", message: '
             + js_string(VIOLATION, "'") + " }", "23503 without"),
            ("", "missing event_message"),
            (full, "invalid timestamp"),
            (fk_error_message(key, False).replace('"23503",', '"23503"'),
             "expected ',' or '}'"),
        ]
        message, reason = cases[variant]
        time = "yesterday" if reason == "invalid timestamp" else at
        self.add(time, message, execution_id, log_analysis.UNPARSED, reason)


def build_export(with_ids: bool = True) -> ExportCase:
    """Return a mixed export of about 280 records with the class of each."""
    kinds = ([("lost", n) for n in range(60)] + [("saved", n) for n in range(70)]
             + [("other function", n) for n in range(40)]
             + [("failed other", n) for n in range(5)]
             + [("late error", n) for n in range(3)] + [("boot", n) for n in range(5)]
             + [("malformed", n) for n in range(7)] + [("duplicate", 0)])
    random.Random(7).shuffle(kinds)
    builder = ExportBuilder(with_ids)
    for slot, (kind, n) in enumerate(kinds):
        if kind == "lost":
            builder.lost(slot, LOST_CONTRACTS[n % len(LOST_CONTRACTS)])
        elif kind == "duplicate":
            builder.lost(slot, 43, copies=2)
        elif kind == "saved":
            builder.saved(slot, SAVED_CONTRACTS[n % len(SAVED_CONTRACTS)], n < 20)
        elif kind == "other function":
            builder.other_function(slot, n)
        elif kind == "failed other":
            builder.failed_other(slot, LOST_CONTRACTS[n], "fk" if n < 2 else "unique")
        elif kind == "late error":
            builder.late_error(slot, LOST_CONTRACTS[n + 10])
        elif kind == "boot":
            builder.boot(slot)
        else:
            builder.malformed(slot, n)
    return builder.case


def iso(value, offset_hours=0) -> str:
    if not isinstance(value, dt.datetime):
        return str(value)
    zone = dt.timezone(dt.timedelta(hours=offset_hours))
    text = value.astimezone(zone).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if offset_hours == 0 else text


def micros(value):
    if not isinstance(value, dt.datetime):
        return value
    return (value - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1)


def to_csv(rows: list[Row], json_metadata: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    if json_metadata:
        writer.writerow(["timestamp", "event_message", "metadata"])
    else:
        writer.writerow(["id", "timestamp", "event_message", "metadata.execution_id",
                         "metadata.function_id"])
    for number, row in enumerate(rows, start=1):
        if json_metadata:
            metadata = json.dumps([{"execution_id": row.execution_id,
                                    "function_id": row.function_id, "level": "info"}])
            writer.writerow([str(micros(row.time)), row.message, metadata])
        else:
            stamp = iso(row.time, offset_hours=-3 if number % 5 == 0 else 0)
            writer.writerow([f"row-{number}", stamp, row.message,
                             row.execution_id or "", row.function_id or ""])
    # One field more than the header has.
    if json_metadata:
        writer.writerow([str(micros(BASE)), "booted", "[]", "surplus"])
    else:
        writer.writerow(["row-extra", iso(BASE), "booted", "", "", "surplus"])
    return out.getvalue()


def to_json_array(rows: list[Row]) -> str:
    items = [{"id": f"row-{number}", "timestamp": micros(row.time),
              "event_message": row.message,
              "metadata": [{"execution_id": row.execution_id,
                            "function_id": row.function_id, "level": "log"}]}
             for number, row in enumerate(rows, start=1)]
    items.append("not an object")
    return json.dumps(items, ensure_ascii=False, indent=1)


def to_json_lines(rows: list[Row], with_ids: bool = True) -> str:
    lines = []
    for number, row in enumerate(rows, start=1):
        stamp = iso(row.time, offset_hours=-3) if number % 2 else micros(row.time)
        item = {"timestamp": stamp, "event_message": row.message}
        if with_ids:
            item["metadata"] = {"execution_id": row.execution_id,
                                "function_id": row.function_id}
        lines.append(json.dumps(item, ensure_ascii=False))
    lines.append('{"timestamp": 1794300000000000, "event_message": ')
    return "\n".join(lines) + "\n"


FORMATS = {
    "csv flat": (lambda rows: to_csv(rows, json_metadata=False), "csv",
                 "more fields than the header"),
    "csv json metadata": (lambda rows: to_csv(rows, json_metadata=True), "csv",
                          "more fields than the header"),
    "json array": (to_json_array, "json array", "not a JSON object"),
    "json lines newest first": (to_json_lines, "json lines", "invalid JSON"),
}


def ordered_rows(case: ExportCase, name: str) -> list[Row]:
    return list(reversed(case.rows)) if "newest first" in name else case.rows


def expected_counts(rows: list[Row]) -> dict[str, int]:
    counts = Counter({name: 0 for name in log_analysis.RECORD_CLASSES})
    counts.update(row.expected for row in rows)
    counts[log_analysis.UNPARSED] += 1  # the format's own malformed record
    return dict(counts)


def expected_outcomes(case: ExportCase) -> dict[str, int]:
    outcomes = Counter({name: 0 for name in log_analysis.OUTCOMES})
    outcomes.update(case.outcomes)
    return dict(outcomes)


@pytest.fixture(scope="module")
def export_case() -> ExportCase:
    return build_export(with_ids=True)


@pytest.fixture(scope="module")
def analysis(export_case):
    return log_analysis.analyse_export(to_json_lines(export_case.rows))


# --- reading and classifying -------------------------------------------------

def test_generated_export_size(export_case):
    assert 250 <= len(export_case.rows) <= 400


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_export_counts_per_class(export_case, name):
    serialise, export_format, _ = FORMATS[name]
    rows = ordered_rows(export_case, name)
    analysis = log_analysis.analyse_export(serialise(rows))
    assert analysis.export_format == export_format
    assert analysis.records == len(rows) + 1
    assert analysis.counts == expected_counts(rows)
    assert sum(analysis.counts.values()) == analysis.records
    assert analysis.outcomes == expected_outcomes(export_case)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_export_unparsed_reasons(export_case, name):
    serialise, _, format_reason = FORMATS[name]
    rows = ordered_rows(export_case, name)
    analysis = log_analysis.analyse_export(serialise(rows))
    reasons = {item.number: item.reason for item in analysis.unparsed}
    expected = {number: row.reason for number, row in enumerate(rows, start=1)
                if row.expected == log_analysis.UNPARSED}
    assert len(reasons) == len(expected) + 1
    for number, reason in expected.items():
        assert reason in reasons[number], (number, reasons[number])
    assert format_reason in reasons[len(rows) + 1]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_export_lost_attempts(export_case, name):
    serialise, _, _ = FORMATS[name]
    analysis = log_analysis.analyse_export(serialise(ordered_rows(export_case, name)))
    found = {(a.customer_id, a.invoice_id, a.sent_at) for a in analysis.lost}
    assert found == export_case.lost
    assert analysis.paired_by == {"execution id": len(export_case.lost)
                                  + export_case.outcomes[log_analysis.DUPLICATE]
                                  + export_case.outcomes[log_analysis.FAILED_OTHER]}


def test_export_formats_give_same_ids(export_case):
    ids = set()
    for name, (serialise, _, _) in FORMATS.items():
        analysis = log_analysis.analyse_export(serialise(ordered_rows(export_case, name)))
        ids.add(tuple(a.attempt_id for a in analysis.lost))
    assert len(ids) == 1


def test_export_first_and_last_failure(export_case, analysis):
    failures = sorted(row.time for row in export_case.rows
                      if row.expected == log_analysis.FK_VIOLATION)
    assert analysis.first_failure == failures[0]
    assert analysis.last_failure == failures[-1]


def test_unpaired_fk_violations_listed(export_case, analysis):
    assert len(analysis.unpaired) == export_case.outcomes[log_analysis.UNPAIRED_FK_VIOLATION]
    for item in analysis.unpaired:
        assert "no Received request" in item["reason"]


def test_pairing_by_window_without_ids():
    case = build_export(with_ids=False)
    analysis = log_analysis.analyse_export(to_json_lines(case.rows, with_ids=False))
    assert analysis.counts == expected_counts(case.rows)
    assert analysis.outcomes == expected_outcomes(case)
    assert {(a.customer_id, a.invoice_id, a.sent_at) for a in analysis.lost} == case.lost
    assert set(analysis.paired_by) == {"time window"}


def test_pairing_window_parameter():
    case = build_export(with_ids=False)
    text = to_json_lines(case.rows, with_ids=False)
    analysis = log_analysis.analyse_export(text, pairing_window_s=0.5)
    assert analysis.outcomes[log_analysis.LOST] == 0
    assert analysis.outcomes[log_analysis.UNPAIRED_FK_VIOLATION] == sum(
        row.expected == log_analysis.FK_VIOLATION for row in case.rows)


def test_pairing_uses_execution_before_window():
    key, customer = contract_id(1), contract_customer(1)
    at = BASE
    rows = [
        {"timestamp": micros(at), "event_message": request_message(1, customer, key, False),
         "metadata": [{"execution_id": "exec-a"}]},
        {"timestamp": micros(at + dt.timedelta(seconds=1)),
         "event_message": request_message(2, customer, key, False),
         "metadata": [{"execution_id": "exec-b"}]},
        {"timestamp": micros(at + dt.timedelta(seconds=2)),
         "event_message": fk_error_message(key, True),
         "metadata": [{"execution_id": "exec-a"}]},
    ]
    analysis = log_analysis.analyse_export(json.dumps(rows))
    assert [a.execution_id for a in analysis.lost] == ["exec-a"]
    assert analysis.lost[0].sent_at == at


def test_pairing_window_matches_key():
    first, second = contract_id(1), contract_id(2)
    rows = [
        {"timestamp": micros(BASE),
         "event_message": request_message(1, contract_customer(1), first, False)},
        {"timestamp": micros(BASE + dt.timedelta(seconds=2)),
         "event_message": request_message(2, contract_customer(2), second, False)},
        {"timestamp": micros(BASE + dt.timedelta(seconds=3)),
         "event_message": fk_error_message(first, False)},
    ]
    analysis = log_analysis.analyse_export(json.dumps(rows))
    assert [a.invoice_id for a in analysis.lost] == [first]
    assert analysis.outcomes[log_analysis.SUCCEEDED] == 1


def test_export_json_object_with_result():
    row = {"timestamp": micros(BASE), "event_message": "booted (time: 30ms)"}
    analysis = log_analysis.analyse_export(
        json.dumps({"result": [row], "error": None}, indent=2))
    assert analysis.export_format == "json object"
    assert analysis.counts[log_analysis.OTHER_MESSAGE] == 1


def test_export_invalid_json_array_raises():
    with pytest.raises(ParameterError, match="not valid JSON"):
        log_analysis.analyse_export('[{"timestamp": 1, ')


def test_read_export_missing_file(tmp_path):
    with pytest.raises(ParameterError, match="was not found"):
        log_analysis.read_export(tmp_path / "missing.csv")


def test_read_export_from_file(tmp_path, export_case):
    path = tmp_path / "logs.csv"
    path.write_text("\ufeff" + to_csv(export_case.rows, json_metadata=False),
                    encoding="utf-8")
    analysis = log_analysis.read_export(path)
    assert analysis.outcomes[log_analysis.LOST] == len(export_case.lost)


@pytest.mark.parametrize("value", ["ten", -1, 7200, True])
def test_pairing_window_rejects(value):
    with pytest.raises(ParameterError, match="pairing_window_s"):
        log_analysis.validate_window(value)


# --- timestamps and literals -------------------------------------------------

@pytest.mark.parametrize("value", [
    1794297600125000, "1794297600125000", 1794297600125, 1794297600.125,
    1794297600125000000, "2026-11-10T08:00:00.125Z", "2026-11-10T05:00:00.125-03:00",
    "2026-11-10 08:00:00.125+00", "2026-11-10T08:00:00.125",
])
def test_timestamp_normalised_to_utc(value):
    parsed = logexport.parse_timestamp(value)
    assert parsed == BASE
    assert parsed.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("value", ["yesterday", None, "", True])
def test_timestamp_rejects(value):
    with pytest.raises(ValueError):
        logexport.parse_timestamp(value)


def test_js_object_quotes_and_escapes():
    text = ("Received request: {\n  a: 'it\\'s \"x\"',\n  b: \"tab\\tnl\\n\",\n"
            "  c: `both ' and \"`,\n  'quoted key': null,\n  d: 42,\n  e: -1.5,\n"
            "  f: true,\n  g: undefined,\n  h: { nested: [1, 'two', null] },\n"
            "  i: [Object],\n  j: 'ab' +\n    'cd',\n  k: \"\\u00e1\\x41\\u{1F600}\",\n}")
    parsed = js_literal.parse_js_object(text, len("Received request:"))
    assert parsed["a"] == "it's \"x\""
    assert parsed["b"] == "tab\tnl\n"
    assert parsed["c"] == "both ' and \""
    assert parsed["quoted key"] is None
    assert parsed["d"] == 42
    assert parsed["e"] == -1.5
    assert parsed["f"] is True
    assert parsed["g"] is None
    assert parsed["h"] == {"nested": [1, "two", None]}
    assert parsed["i"] == "[Object]"
    assert parsed["j"] == "abcd"
    assert parsed["k"] == "áA\U0001F600"


@pytest.mark.parametrize("text, reason", [
    ("{ a: 'open", "unterminated string"),
    ("{ a 1 }", "expected ':'"),
    ("{ a: 1 b: 2 }", "expected ',' or '}'"),
    ("no object here", "expected '{'"),
    ("{ a: }", "expected a value"),
])
def test_js_object_errors(text, reason):
    with pytest.raises(js_literal.LiteralError, match=reason):
        js_literal.parse_js_object(text)


def test_js_object_error_hides_text():
    secret = "5511912345678"
    with pytest.raises(js_literal.LiteralError) as raised:
        js_literal.parse_js_object(f'{{ phone: "{secret}')
    assert secret not in str(raised.value)


# --- masking -----------------------------------------------------------------

def test_mask_phone_keeps_ends():
    assert masking.mask_phone("5511999990000") == "5511*****0000"
    assert masking.mask_phone("12345") == "***45"
    assert masking.mask_phone(None) is None


def test_mask_message_gives_length():
    assert masking.mask_message("x" * 142) == "[142 chars]"


def test_mask_name_initials():
    assert masking.mask_name("Marina Duarte") == "M. D."
    assert masking.mask_name(None) == "(unknown)"


def assert_masked(text: str, case: ExportCase) -> None:
    leaked_phones = [phone for phone in case.phones if phone in text]
    leaked_markers = [marker for marker in case.markers if marker in text]
    assert leaked_phones == []
    assert leaked_markers == []
    assert "Olá cliente" not in text


def test_analysis_outputs_masked(export_case, analysis):
    assert_masked(repr(analysis), export_case)
    assert_masked(analysis.lost_frame().to_string(), export_case)
    assert_masked(analysis.unparsed_frame().to_string(), export_case)
    assert_masked(analysis.counts_frame().to_string(), export_case)
    assert_masked(recovery.describe_export("export", analysis), export_case)
    assert set(analysis.lost_frame()["phone"].str[4:9]) == {"*****"}


# --- counts and chart ----------------------------------------------------------

def test_daily_counts_match_export(export_case, analysis):
    expected = Counter(sent_at.date().isoformat() for _, _, sent_at in export_case.lost)
    frame = recovery.daily_counts(analysis.lost)
    assert dict(zip(frame["day"], frame["lost_attempts"])) == dict(expected)
    assert len(frame) >= 2


def test_customer_counts_match_export(export_case, analysis):
    expected = Counter(customer for customer, _, _ in export_case.lost)
    frame = recovery.customer_counts(analysis.lost, {})
    assert dict(zip(frame["customer_id"], frame["lost_attempts"])) == dict(expected)
    assert list(frame["lost_attempts"]) == sorted(frame["lost_attempts"], reverse=True)


def test_customer_counts_show_names_on_request(analysis):
    names = {attempt.customer_id: "Marina Duarte" for attempt in analysis.lost}
    masked = recovery.customer_counts(analysis.lost, names)
    shown = recovery.customer_counts(analysis.lost, names, show_names=True)
    assert set(masked["customer"]) == {"M. D."}
    assert set(shown["customer"]) == {"Marina Duarte"}


def test_chart_returns_closed_figure(analysis):
    before = plt.get_fignums()
    figure = recovery.plot_lost_attempts(analysis.lost)
    assert isinstance(figure, Figure)
    assert plt.get_fignums() == before
    assert sum(patch.get_height() for patch in figure.axes[0].patches) == len(analysis.lost)


def test_chart_without_lost_attempts():
    figure = recovery.plot_lost_attempts([])
    assert isinstance(figure, Figure)


# --- the database ------------------------------------------------------------

def apply_option(conn, option: int) -> None:
    options = migration.MigrationOptions(option=option)
    migration.apply_plan(conn, migration.plan_migration(conn, options), options,
                         output_dir=None)


def recovered_rows(conn, analysis) -> list[tuple]:
    return conn.execute(
        "SELECT id::text, customer_id::text, invoice_id::text, collector_id::text,"
        " channel::text, status::text, notes, created_at FROM collection_attempts"
        " WHERE id = ANY(%s::uuid[]) ORDER BY created_at, id",
        [[a.attempt_id for a in analysis.lost]]).fetchall()


def attempt_count(conn) -> int:
    return conn.execute("SELECT count(*) FROM collection_attempts").fetchone()[0]


@pytest.mark.parametrize("option", [1, 2])
def test_recover_after_fix(conn, analysis, option):
    apply_option(conn, option)
    before = attempt_count(conn)
    outcome = recovery.recover(conn, analysis, COLLECTOR_ID, dry_run=False,
                               confirm=conn.info.dbname)
    assert outcome.mode == "apply"
    assert outcome.blocked is None
    assert outcome.inserted == len(analysis.lost)
    assert attempt_count(conn) == before + len(analysis.lost)
    rows = recovered_rows(conn, analysis)
    expected = sorted(analysis.lost, key=lambda a: (a.sent_at, a.attempt_id))
    assert [row[0] for row in rows] == [a.attempt_id for a in expected]
    assert [(row[1], row[2], row[7]) for row in rows] == [
        (a.customer_id, a.invoice_id, a.sent_at) for a in expected]
    assert {row[3] for row in rows} == {COLLECTOR_ID}
    assert {row[4] for row in rows} == {"whatsapp"}
    assert {row[5] for row in rows} == {"sent"}
    assert all(row[6].startswith(recovery.RECOVERED_NOTE_PREFIX) for row in rows)


def test_recover_rerun_inserts_nothing(conn, analysis):
    apply_option(conn, 1)
    recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname)
    before = attempt_count(conn)
    again = recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname)
    assert again.inserted == 0
    assert again.already_present == len(analysis.lost)
    assert attempt_count(conn) == before
    assert set(again.statuses.values()) == {"already present"}


def test_recover_rerun_from_other_format(conn, export_case, analysis):
    apply_option(conn, 2)
    recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname)
    other = log_analysis.analyse_export(to_csv(export_case.rows, json_metadata=False))
    again = recovery.recover(conn, other, COLLECTOR_ID, False, conn.info.dbname)
    assert again.inserted == 0


def test_recover_refused_while_fk_rejects(conn, analysis):
    before = attempt_count(conn)
    with pytest.raises(PreflightError) as raised:
        recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname)
    message = str(raised.value)
    assert "collection_attempts_invoice_id_fkey" in message
    assert "03-migrate.ipynb" in message
    assert "option=1" in message
    assert "option=2" in message
    assert attempt_count(conn) == before


def test_recover_dry_run_reports_block(conn, analysis):
    before = attempt_count(conn)
    outcome = recovery.recover(conn, analysis, COLLECTOR_ID, True, "")
    assert outcome.mode == "dry run"
    assert "03-migrate.ipynb" in outcome.blocked
    assert not outcome.key_checks["accepted"].any()
    assert set(outcome.key_checks["constraint"]) == {"collection_attempts_invoice_id_fkey"}
    assert attempt_count(conn) == before


def test_recover_record_keeps_block_unraised(conn, analysis):
    outcome = recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname,
                               raise_when_blocked=False)
    assert outcome.inserted == 0
    with pytest.raises(PreflightError):
        recovery.require_unblocked(outcome)


def test_recover_dry_run_changes_nothing(conn, analysis):
    apply_option(conn, 1)
    before = attempt_count(conn)
    outcome = recovery.recover(conn, analysis, COLLECTOR_ID, True, "")
    assert outcome.to_insert == len(analysis.lost)
    assert outcome.inserted == 0
    assert attempt_count(conn) == before


def test_recover_gate_needs_database_name(conn, analysis):
    apply_option(conn, 1)
    with pytest.raises(GateError, match="confirm"):
        recovery.recover(conn, analysis, COLLECTOR_ID, False, "production")
    assert recovered_rows(conn, analysis) == []


def test_recover_unknown_customer_blocks(conn):
    apply_option(conn, 2)
    stranger = str(uuid.uuid5(uuid.NAMESPACE_URL, "not-a-customer"))
    rows = [
        {"timestamp": micros(BASE), "metadata": [{"execution_id": "exec-z"}],
         "event_message": request_message(1, stranger, contract_id(1), False)},
        {"timestamp": micros(BASE) + 500_000, "metadata": [{"execution_id": "exec-z"}],
         "event_message": fk_error_message(contract_id(1), False)},
    ]
    analysis = log_analysis.analyse_export(json.dumps(rows))
    with pytest.raises(PreflightError, match="collection_attempts_customer_id_fkey"):
        recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname)


def test_recover_non_contract_key_after_option1(conn):
    apply_option(conn, 1)
    # An invoice with an id of its own (contract 1 is not a multiple of 3).
    invoice_key = seed_uuid("invoice:OC-2025-0001:1")
    rows = [
        {"timestamp": micros(BASE), "metadata": [{"execution_id": "exec-y"}],
         "event_message": request_message(1, contract_customer(1), invoice_key, False)},
        {"timestamp": micros(BASE) + 500_000, "metadata": [{"execution_id": "exec-y"}],
         "event_message": fk_error_message(invoice_key, False)},
    ]
    analysis = log_analysis.analyse_export(json.dumps(rows))
    with pytest.raises(PreflightError) as raised:
        recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname)
    assert "already references operator_contracts" in str(raised.value)
    assert "option=2" in str(raised.value)


def test_recovered_rows_masked(conn, export_case, analysis):
    apply_option(conn, 1)
    outcome = recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname)
    names = recovery.customer_names(conn, [a.customer_id for a in analysis.lost])
    record = report.to_json(recovery.result_record("export", analysis, outcome, names))
    notes = "\n".join(row[6] for row in recovered_rows(conn, analysis))
    assert_masked(record, export_case)
    assert_masked(notes, export_case)
    assert_masked(recovery.describe_outcome(outcome), export_case)
    assert_masked(outcome.key_checks.to_string(), export_case)


def test_fk_state_describes_option(conn):
    assert "no fix" in recovery.describe_fk_state(recovery.current_fk_state(conn))
    apply_option(conn, 2)
    assert "Option 2" in recovery.describe_fk_state(recovery.current_fk_state(conn))


def test_demo_export_has_incident_key(conn):
    text = demo_logs.demo_export(conn)
    analysis = log_analysis.analyse_export(text)
    owner = conn.execute("SELECT customer_id::text FROM operator_contracts WHERE id = %s",
                         [INCIDENT_KEY]).fetchone()[0]
    incident = [a for a in analysis.lost if a.invoice_id == INCIDENT_KEY]
    assert len(incident) == 2
    assert {a.customer_id for a in incident} == {owner}
    assert text == demo_logs.demo_export(conn)
    assert analysis.counts[log_analysis.UNPARSED] == 1


def test_load_export_needs_path_outside_demo(conn):
    with pytest.raises(ParameterError, match="log_export is empty"):
        recovery.load_export("", conn, is_demo=False)


def test_collector_required_outside_demo():
    with pytest.raises(ParameterError, match="collector_id is empty"):
        recovery.resolve_collector("", is_demo=False)
    assert recovery.resolve_collector("", is_demo=True) == demo_logs.DEMO_COLLECTOR_ID
    assert re.fullmatch(r"[0-9a-f-]{36}", recovery.resolve_collector(COLLECTOR_ID, False))


# --- exports that cannot show lost attempts -----------------------------------

def to_semicolon_csv(rows: list[Row]) -> str:
    """Return the export as a spreadsheet in a comma-decimal locale saves it."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";")
    writer.writerow(["timestamp", "event_message", "metadata"])
    for row in rows:
        writer.writerow([iso(row.time), row.message, json.dumps({"function_id": row.function_id})])
    return out.getvalue()


UNREADABLE_EXPORTS = {
    "empty file": (lambda rows: "", "No record was found"),
    "csv header only": (lambda rows: "timestamp,event_message\n", "No record was found"),
    "empty json array": (lambda rows: "[]", "No record was found"),
    "semicolon csv": (to_semicolon_csv, "semicolon-separated"),
    "garbage": (lambda rows: "\x7fELF\x02\x01\nnot, a, log\n" * 5, "could be parsed"),
}


def write_export(tmp_path, export_case, name: str):
    serialise, _ = UNREADABLE_EXPORTS[name]
    path = tmp_path / "logs.csv"
    path.write_text(serialise(export_case.rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(UNREADABLE_EXPORTS))
def test_recover_rejects_unreadable_export(conn, tmp_path, export_case, name):
    apply_option(conn, 1)
    path = write_export(tmp_path, export_case, name)
    analysis = log_analysis.read_export(path)
    before = attempt_count(conn)
    with pytest.raises(ParameterError) as raised:
        recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname)
    message = str(raised.value)
    assert UNREADABLE_EXPORTS[name][1] in message
    assert str(path) in message
    assert "comma separator or as JSON" in message
    assert "timestamp and event_message" in message
    assert attempt_count(conn) == before


@pytest.mark.parametrize("name", sorted(UNREADABLE_EXPORTS))
def test_load_export_rejects_unreadable_export(conn, tmp_path, export_case, name):
    path = write_export(tmp_path, export_case, name)
    with pytest.raises(ParameterError, match=UNREADABLE_EXPORTS[name][1]):
        recovery.load_export(str(path), conn, is_demo=False)


def test_unreadable_export_counts_records(conn, tmp_path, export_case):
    path = write_export(tmp_path, export_case, "semicolon csv")
    with pytest.raises(ParameterError) as raised:
        recovery.load_export(str(path), conn, is_demo=False)
    message = str(raised.value)
    # Quoted multi-line messages split into more CSV rows than the export
    # has records, so only the shape of the count is checked.
    assert re.search(r"all [1-9]\d* record\(s\) are invalid", message)
    assert "missing event_message" in message
    assert "1 column(s) and no column named timestamp or event_message" in message
    assert_masked(message, export_case)


def export_without_requests(export_case) -> str:
    rows = [row for row in export_case.rows
            if row.expected in (log_analysis.FK_VIOLATION, log_analysis.OTHER_MESSAGE)]
    return to_json_lines(rows)


def test_export_without_requests_warns(conn, export_case):
    apply_option(conn, 1)
    analysis = log_analysis.analyse_export(export_without_requests(export_case))
    fk_lines = analysis.counts[log_analysis.FK_VIOLATION]
    warnings = recovery.export_warnings(analysis)
    outcome = recovery.recover(conn, analysis, COLLECTOR_ID, False, conn.info.dbname)
    record = recovery.result_record("logs.json", analysis, outcome, {})
    assert fk_lines > 0
    assert len(warnings) == 1
    assert 'no "Received request" line' in warnings[0]
    assert f"Its {fk_lines} 23503 line(s) have no request" in warnings[0]
    assert record["warnings"] == warnings
    assert "no Received request line" in recovery.describe_conclusion(analysis, outcome)


def test_export_with_requests_has_no_warning(analysis):
    assert recovery.export_warnings(analysis) == []


def test_describe_export_names_file(tmp_path, export_case):
    path = tmp_path / "logs.csv"
    path.write_text(to_csv(export_case.rows, json_metadata=False), encoding="utf-8")
    analysis = log_analysis.read_export(path)
    text = recovery.describe_export(str(path), analysis)
    assert text.startswith(f"Read **{analysis.records}** record(s) from `{path}` (csv)")


def test_describe_export_names_demo_export(conn):
    source, analysis = recovery.load_export("", conn, is_demo=True)
    text = recovery.describe_export(source, analysis)
    assert "record(s) from the synthetic demo export (" in text
