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

-- Option 1, phase A: point both invoice_id FKs at operator_contracts(id) with
-- ON DELETE CASCADE and keep the constraint names. NOT VALID skips the check
-- of existing rows, so the locks last only as long as the catalog change:
-- ACCESS EXCLUSIVE on each referencing table and on invoices (whose FK
-- triggers are dropped), SHARE ROW EXCLUSIVE on operator_contracts, as seen in
-- pg_locks on PostgreSQL 18.6. New rows are checked against
-- operator_contracts from the commit on. Phase B checks the old rows.
--
-- PostgreSQL has no ADD CONSTRAINT IF NOT EXISTS, so each FK is dropped with
-- IF EXISTS and added again. A second run ends with the same definitions, but
-- it turns a constraint that phase B validated back into NOT VALID, so run
-- phase B again after it.
--
-- NOTE: payment_promises.invoice_id has no index, so with ON DELETE CASCADE
-- every DELETE on operator_contracts scans payment_promises.

-- The old FK is dropped only to be added again in this transaction.
-- squawk-ignore ban-drop-constraint
ALTER TABLE public.collection_attempts DROP CONSTRAINT IF EXISTS collection_attempts_invoice_id_fkey;
ALTER TABLE public.collection_attempts
    ADD CONSTRAINT collection_attempts_invoice_id_fkey
    FOREIGN KEY (invoice_id) REFERENCES public.operator_contracts (id)
    ON DELETE CASCADE NOT VALID;

-- The old FK is dropped only to be added again in this transaction.
-- squawk-ignore ban-drop-constraint
ALTER TABLE public.payment_promises DROP CONSTRAINT IF EXISTS payment_promises_invoice_id_fkey;
ALTER TABLE public.payment_promises
    ADD CONSTRAINT payment_promises_invoice_id_fkey
    FOREIGN KEY (invoice_id) REFERENCES public.operator_contracts (id)
    ON DELETE CASCADE NOT VALID;
