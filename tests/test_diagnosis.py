"""Parsing the incident log, re-running the app's insert, finding key owners."""

import pytest

from fkrunbook import diagnosis, migration
from fkrunbook.errors import ParameterError

KEY = "2f44c1c9-9c8b-4c76-b56c-527f5242cafd"
COLLECTOR = "1fc9c9b6-95ab-4b87-8d1c-2f7c3d1e0a01"

EDGE_LOG = """Error registering attempt: {
  code: "23503",
  details: 'Key (invoice_id)=(2f44c1c9-9c8b-4c76-b56c-527f5242cafd) is not present in table "invoices".',
  message: 'insert or update on table "collection_attempts" violates foreign key constraint "collection_attempts_invoice_id_fkey"'
}"""

SERVER_LOG = (
    'ERROR:  insert or update on table "payment_promises" violates foreign key '
    'constraint "payment_promises_invoice_id_fkey"\n'
    'DETAIL:  Key (invoice_id)=(0186d86f-d865-e372-056b-57eab3d5ae64) is not '
    'present in table "invoices".'
)


def test_parse_log_reads_edge_function_entry():
    [failing] = diagnosis.parse_log(EDGE_LOG)
    assert failing.key == KEY
    assert failing.sqlstate == "23503"
    assert failing.constraint == "collection_attempts_invoice_id_fkey"
    assert failing.table == "collection_attempts"
    assert failing.column == "invoice_id"
    assert failing.referenced_table == "invoices"


def test_parse_log_reads_server_message_format():
    [failing] = diagnosis.parse_log(SERVER_LOG)
    assert failing.table == "payment_promises"
    assert failing.constraint == "payment_promises_invoice_id_fkey"
    assert failing.key == "0186d86f-d865-e372-056b-57eab3d5ae64"


def test_parse_log_counts_repeated_key_once():
    failing = diagnosis.parse_log(EDGE_LOG + "\n" + EDGE_LOG + "\n" + SERVER_LOG)
    assert [item.key for item in failing] == [KEY, "0186d86f-d865-e372-056b-57eab3d5ae64"]
    assert failing[0].occurrences == 2


def test_parse_log_ignores_unrelated_lines():
    assert diagnosis.parse_log("INFO sent message 200 OK\nnothing else") == []


def test_keys_parameter_accepts_comma_string():
    failing = diagnosis.failing_keys_from_parameters(f"{KEY}, {KEY.upper()}", "")
    assert [item.key for item in failing] == [KEY]
    assert failing[0].occurrences == 2


def test_keys_parameter_rejects_non_uuid():
    with pytest.raises(ParameterError, match="'not-a-uuid' is not a valid uuid"):
        diagnosis.failing_keys_from_parameters(["not-a-uuid"], "")


def test_keys_parameter_rejects_empty_input():
    with pytest.raises(ParameterError, match="No failing key given"):
        diagnosis.failing_keys_from_parameters([], "no key here")


def test_keys_parameter_rejects_wrong_type():
    with pytest.raises(ParameterError, match="keys must be a list"):
        diagnosis.failing_keys_from_parameters(42, "")


def test_reproduce_shows_23503_with_diagnostics(conn):
    customer = diagnosis.customer_for_key(conn, KEY)
    result = diagnosis.reproduce_insert(conn, KEY, customer, COLLECTOR)
    assert result["outcome"] == "rejected"
    assert result["sqlstate"] == "23503"
    assert result["error_class"] == "ForeignKeyViolation"
    assert result["constraint"] == "collection_attempts_invoice_id_fkey"
    assert KEY in result["detail"]


def test_reproduce_leaves_no_row(conn):
    before = conn.execute("SELECT count(*) FROM collection_attempts").fetchone()[0]
    migration.apply_plan(conn, migration.plan_migration(
        conn, migration.MigrationOptions(option=1)), migration.MigrationOptions(option=1),
        output_dir=None)
    customer = diagnosis.customer_for_key(conn, KEY)
    result = diagnosis.reproduce_insert(conn, KEY, customer, COLLECTOR)
    after = conn.execute("SELECT count(*) FROM collection_attempts").fetchone()[0]
    assert result["outcome"] == "accepted"
    assert after == before


def test_reproduce_skips_key_without_customer(conn):
    stranger = "00000000-0000-4000-8000-000000000001"
    [result] = diagnosis.reproduce_all(conn, [diagnosis.FailingKey(stranger)], COLLECTOR)
    assert result["outcome"].startswith("skipped")


def test_reproduce_falls_back_to_read_only_check(conn):
    conn.execute("CREATE ROLE runbook_reader")
    conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO runbook_reader")
    conn.execute("SET ROLE runbook_reader")
    try:
        result = diagnosis.reproduce_insert(conn, KEY, diagnosis.customer_for_key(conn, KEY),
                                            COLLECTOR)
    finally:
        conn.execute("RESET ROLE")
        conn.execute("DROP OWNED BY runbook_reader")
        conn.execute("DROP ROLE runbook_reader")
    assert result["outcome"] == "read-only check: key not in invoices"


def test_find_key_owners_names_operator_contracts(conn):
    owners = diagnosis.find_key_owners(conn, [KEY])
    assert owners == {KEY: ["public.operator_contracts"]}


def test_find_key_owners_finds_ids_in_both_tables(conn):
    # Contract 3 is single-instalment: its invoice reuses the contract id.
    both = conn.execute("SELECT id::text FROM operator_contracts"
                        " WHERE contract_number = 'OC-2025-0003'").fetchone()[0]
    owners = diagnosis.find_key_owners(conn, [both])
    assert owners[both] == ["public.invoices", "public.operator_contracts"]


def test_root_cause_names_operator_contracts():
    failing = diagnosis.parse_log(EDGE_LOG)
    sentence = diagnosis.state_root_cause(failing, {KEY: ["public.operator_contracts"]})
    assert "operator_contracts ids into collection_attempts.invoice_id" in sentence


def test_root_cause_flags_unknown_keys():
    failing = diagnosis.parse_log(EDGE_LOG)
    sentence = diagnosis.state_root_cause(failing, {KEY: []})
    assert "exist in no table" in sentence


def test_judge_rejects_other_constraint():
    failing = diagnosis.parse_log(EDGE_LOG)
    results = [{"key": KEY, "outcome": "rejected", "sqlstate": "23503",
                "constraint": "collection_attempts_customer_id_fkey"}]
    judgement = diagnosis.judge_reproduction(failing, results)
    assert judgement["reproduced"] is False
    assert judgement["other_rejections"] == [
        {"key": KEY, "constraint": "collection_attempts_customer_id_fkey"}]


def test_judge_reports_fix_in_place():
    failing = diagnosis.parse_log(EDGE_LOG)
    results = [{"key": KEY, "outcome": "accepted", "sqlstate": None, "constraint": None}]
    judgement = diagnosis.judge_reproduction(failing, results)
    assert judgement["already_fixed"] is True
    assert judgement["reproduced"] is False
