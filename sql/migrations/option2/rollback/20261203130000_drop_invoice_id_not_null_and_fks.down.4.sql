SET LOCAL lock_timeout = '100ms';
SET LOCAL statement_timeout = '30min';
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

-- Roll back option 2, step 4 of 4: check the existing rows against invoices.
-- VALIDATE CONSTRAINT takes SHARE UPDATE EXCLUSIVE on the referencing table
-- and ROW SHARE on invoices, so inserts, updates and deletes go on during the
-- scan.
--
-- While option 2 was live the app could store operator_contracts ids that
-- have no invoice. Then this file fails with SQLSTATE 23503 and rolls back,
-- and the FKs stay NOT VALID, which still checks every new row. Skipping this
-- step leaves the same state. Find the rows with
--   SELECT a.id, a.invoice_id FROM public.collection_attempts a
--   WHERE NOT EXISTS (SELECT 1 FROM public.invoices i WHERE i.id = a.invoice_id);
--
-- VALIDATE CONSTRAINT on a constraint that is already valid does nothing, so
-- the file can be run again.

ALTER TABLE public.collection_attempts
    VALIDATE CONSTRAINT collection_attempts_invoice_id_fkey;
ALTER TABLE public.payment_promises
    VALIDATE CONSTRAINT payment_promises_invoice_id_fkey;
