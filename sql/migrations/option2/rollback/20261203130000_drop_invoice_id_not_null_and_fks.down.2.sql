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

-- Roll back option 2, step 2 of 4: check that no existing row has a NULL
-- invoice_id. VALIDATE CONSTRAINT takes SHARE UPDATE EXCLUSIVE, so inserts,
-- updates and deletes go on during the scan.
--
-- When a row has a NULL invoice_id, the file fails with SQLSTATE 23514 and
-- rolls back, and the column stays nullable. Then either set invoice_id on
-- those rows and run this file again, or stop here and skip step 3, whose
-- SET NOT NULL would scan the table under ACCESS EXCLUSIVE and fail with
-- SQLSTATE 23502. Find the rows with
--   SELECT id FROM public.collection_attempts WHERE invoice_id IS NULL;
--
-- VALIDATE CONSTRAINT on a constraint that is already valid does nothing, so
-- the file can be run again until step 3 drops the CHECK constraints.

ALTER TABLE public.collection_attempts
    VALIDATE CONSTRAINT collection_attempts_invoice_id_not_null_check;
ALTER TABLE public.payment_promises
    VALIDATE CONSTRAINT payment_promises_invoice_id_not_null_check;
