SET LOCAL lock_timeout = '100ms';
SET LOCAL statement_timeout = '5s';
-- SET LOCAL ends with the transaction that Supabase wraps around this file, so
-- these timeouts do not leak into later migrations on the same connection.
-- Outside a transaction block SET LOCAL only warns and has no effect, so this
-- check stops the file before any DDL can wait for a lock without a limit.
DO $$
BEGIN
    IF current_setting('lock_timeout') <> '100ms' THEN
        RAISE EXCEPTION 'lock_timeout is %, not 100ms, so this file runs outside a '
            'transaction block, where SET LOCAL has no effect. Run it as a '
            'Supabase migration or with psql --single-transaction.',
            current_setting('lock_timeout');
    END IF;
END
$$;

-- Option 2: make invoice_id nullable and drop its FK on both tables, so the
-- app can store an operator_contracts id, or NULL, that matches no invoice.
-- Nothing here scans a table. Each statement takes ACCESS EXCLUSIVE on its
-- table, and dropping an FK also takes ACCESS EXCLUSIVE on invoices, whose FK
-- triggers go with it (seen in pg_locks on PostgreSQL 18.6). The locks last
-- only as long as the catalog change.
--
-- DROP NOT NULL on a nullable column and DROP CONSTRAINT IF EXISTS on a
-- missing constraint do nothing, so the file can be run again.

-- Option 2 allows NULL on purpose, so every reader of invoice_id must handle it.
-- squawk-ignore ban-drop-not-null
ALTER TABLE public.collection_attempts ALTER COLUMN invoice_id DROP NOT NULL;
-- Option 2 removes this FK on purpose because invoice_id no longer names an invoice.
-- squawk-ignore ban-drop-constraint
ALTER TABLE public.collection_attempts DROP CONSTRAINT IF EXISTS collection_attempts_invoice_id_fkey;

-- Option 2 allows NULL on purpose, so every reader of invoice_id must handle it.
-- squawk-ignore ban-drop-not-null
ALTER TABLE public.payment_promises ALTER COLUMN invoice_id DROP NOT NULL;
-- Option 2 removes this FK on purpose because invoice_id no longer names an invoice.
-- squawk-ignore ban-drop-constraint
ALTER TABLE public.payment_promises DROP CONSTRAINT IF EXISTS payment_promises_invoice_id_fkey;
