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

-- Option 1, phase B: check the rows written before phase A against
-- operator_contracts. VALIDATE CONSTRAINT takes SHARE UPDATE EXCLUSIVE on the
-- referencing table and ROW SHARE on operator_contracts, so inserts, updates
-- and deletes go on during the scan. Both validations run in this file's
-- transaction, so the lock on collection_attempts is held until
-- payment_promises is checked too. The locks block other DDL, VACUUM and
-- autovacuum on those tables until the commit.
--
-- When a row holds an id that is not in operator_contracts, the file fails
-- with SQLSTATE 23503 and rolls back. The constraint stays NOT VALID and still
-- checks every new row. This query lists such rows (use payment_promises for
-- the second table):
--   SELECT a.id, a.invoice_id FROM public.collection_attempts a
--   WHERE NOT EXISTS (SELECT 1 FROM public.operator_contracts c WHERE c.id = a.invoice_id);
--
-- VALIDATE CONSTRAINT on a constraint that is already valid does nothing, so
-- the file can be run again.

ALTER TABLE public.collection_attempts
    VALIDATE CONSTRAINT collection_attempts_invoice_id_fkey;
ALTER TABLE public.payment_promises
    VALIDATE CONSTRAINT payment_promises_invoice_id_fkey;
