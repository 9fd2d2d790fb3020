"""Inspection queries and the recommendation, on the incident fixture."""

import pytest

from fkrunbook import catalog, diagnosis, inspection, migration, recommendation

KEY = "2f44c1c9-9c8b-4c76-b56c-527f5242cafd"


@pytest.fixture
def tables(conn):
    return catalog.resolve_tables(conn, ["collection_attempts", "payment_promises"])


def fk_row(frame, name):
    return frame.set_index("constraint_name").loc[name]


def test_foreign_keys_show_invoices_target(conn, tables):
    frame = inspection.list_foreign_keys(conn, tables, [catalog.resolve_table(conn, "invoices")])
    row = fk_row(frame, "collection_attempts_invoice_id_fkey")
    assert row["referenced_table"] == "invoices"
    assert row["definition"] == "FOREIGN KEY (invoice_id) REFERENCES invoices(id)"
    assert row["validated"]
    assert row["on_delete"] == "NO ACTION"
    assert not row["deferrable"]


def test_foreign_keys_include_every_fk_to_invoices(conn, tables):
    conn.execute("CREATE TABLE invoice_notes (id uuid PRIMARY KEY,"
                 " invoice_id uuid REFERENCES invoices (id))")
    frame = inspection.list_foreign_keys(conn, tables, [catalog.resolve_table(conn, "invoices")])
    assert "invoice_notes_invoice_id_fkey" in set(frame["constraint_name"])


def test_foreign_keys_report_missing_index(conn, tables):
    frame = inspection.list_foreign_keys(conn, tables, [])
    assert fk_row(frame, "collection_attempts_invoice_id_fkey")["column_indexed"]
    assert not fk_row(frame, "payment_promises_invoice_id_fkey")["column_indexed"]


def test_unindexed_warning_gives_index_statement(conn, tables):
    frame = inspection.list_foreign_keys(conn, tables, [])
    [warning] = inspection.unindexed_fk_warnings(frame)
    assert "CREATE INDEX CONCURRENTLY payment_promises_invoice_id_idx" in warning


def test_foreign_keys_same_after_option_one(conn, tables):
    migration.apply_plan(conn, migration.plan_migration(conn, migration.MigrationOptions()),
                         migration.MigrationOptions(), output_dir=None)
    frame = inspection.list_foreign_keys(conn, tables, [])
    row = fk_row(frame, "payment_promises_invoice_id_fkey")
    assert row["referenced_table"] == "operator_contracts"
    assert row["on_delete"] == "CASCADE"


def test_row_counts_are_exact(conn, tables):
    frame = inspection.count_rows(conn, tables)
    assert frame.set_index("table_name")["rows"].to_dict() == {
        "public.collection_attempts": 120, "public.payment_promises": 30}


def test_provenance_counts_both(conn, tables):
    frame = inspection.key_provenance(conn, tables[0], "invoice_id")
    counts = frame.set_index("found_in")["rows"].to_dict()
    assert counts == {"operator_contracts": 0, "both": 120, "invoices": 0,
                      "neither": 0, "null": 0}


def test_provenance_counts_every_class(conn, tables):
    migration.apply_plan(conn, migration.plan_migration(conn, migration.MigrationOptions(option=2)),
                         migration.MigrationOptions(option=2), output_dir=None)
    conn.execute(
        "INSERT INTO collection_attempts (customer_id, invoice_id, collector_id, channel, status)"
        " SELECT customer_id, x.v, gen_random_uuid(), 'sms', 'sent' FROM operator_contracts,"
        " (VALUES (%s::uuid), (md5('invoice:OC-2025-0001:1')::uuid),"
        " ('00000000-0000-4000-8000-000000000001'::uuid), (NULL::uuid)) AS x(v)"
        " WHERE contract_number = 'OC-2025-0001'", [KEY])
    frame = inspection.key_provenance(conn, tables[0], "invoice_id")
    counts = frame.set_index("found_in")["rows"].to_dict()
    assert counts == {"operator_contracts": 1, "both": 120, "invoices": 1,
                      "neither": 1, "null": 1}


def test_breaking_rows_none_on_demo(conn, tables):
    rows = inspection.find_breaking_rows(conn, tables[0], "invoice_id")
    assert rows.total == 0


def test_breaking_rows_lists_remap_target(conn, tables):
    conn.execute(
        "INSERT INTO collection_attempts (customer_id, invoice_id, collector_id, channel, status)"
        " SELECT customer_id, id, gen_random_uuid(), 'sms', 'sent' FROM invoices"
        " WHERE id = md5('invoice:OC-2025-0001:1')::uuid")
    rows = inspection.find_breaking_rows(conn, tables[0], "invoice_id")
    contract = conn.execute("SELECT id::text FROM operator_contracts"
                            " WHERE contract_number = 'OC-2025-0001'").fetchone()[0]
    assert rows.total == 1
    assert rows.remappable == 1
    assert rows.sample["remap_to"].tolist() == [contract]


def test_cascade_impact_counts_per_contract(conn, tables):
    frame = inspection.cascade_impact(conn, tables, "invoice_id", limit=100)
    assert frame["collection_attempts"].sum() == 120
    assert frame["payment_promises"].sum() == 30
    assert frame["total"].is_monotonic_decreasing


def test_recommend_option_one_on_demo(conn, tables):
    owners = diagnosis.find_key_owners(conn, [KEY])
    breaking = [inspection.find_breaking_rows(conn, t, "invoice_id") for t in tables]
    advice = recommendation.recommend([KEY], owners, breaking)
    assert advice.option == 1
    assert advice.remap_invoice_rows is False


def test_recommend_remap_when_rows_remappable():
    breaking = [inspection.BreakingRows("public.collection_attempts", 3, 3, None)]
    advice = recommendation.recommend([KEY], {KEY: ["public.operator_contracts"]}, breaking)
    assert (advice.option, advice.remap_invoice_rows) == (1, True)
    assert advice.command == ".venv/bin/fkrunbook chain --option 1 --remap-invoice-rows --confirm DATABASE"


def test_recommend_option_two_when_rows_unremappable():
    breaking = [inspection.BreakingRows("public.collection_attempts", 3, 2, None)]
    advice = recommendation.recommend([KEY], {KEY: ["public.operator_contracts"]}, breaking)
    assert advice.option == 2


def test_recommend_option_two_when_key_not_a_contract():
    advice = recommendation.recommend([KEY], {KEY: ["public.invoices"]}, [])
    assert advice.option == 2
