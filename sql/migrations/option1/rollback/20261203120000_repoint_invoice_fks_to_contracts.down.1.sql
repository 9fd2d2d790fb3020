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

-- Roll back option 1, phase A: point both FKs at invoices(id) again, with
-- the original ON DELETE NO ACTION. Run the phase B rollback first.
--
-- The FKs stay NOT VALID on purpose. While option 1 was live the app stored
-- operator_contracts ids, and ids such as 2f44c1c9-9c8b-4c76-b56c-527f5242cafd
-- have no invoice, so VALIDATE CONSTRAINT would fail with SQLSTATE 23503.
-- A NOT VALID FK still checks every new row, so after this file the app's
-- inserts fail with SQLSTATE 23503 again, as during the incident.
--
-- PostgreSQL has no ADD CONSTRAINT IF NOT EXISTS, so each FK is dropped with
-- IF EXISTS and added again. A second run ends with the same definitions.

-- The option 1 FK is dropped so the invoices FK can take its name again.
-- squawk-ignore ban-drop-constraint
ALTER TABLE public.collection_attempts DROP CONSTRAINT IF EXISTS collection_attempts_invoice_id_fkey;
ALTER TABLE public.collection_attempts
    ADD CONSTRAINT collection_attempts_invoice_id_fkey
    FOREIGN KEY (invoice_id) REFERENCES public.invoices (id)
    NOT VALID;

-- The option 1 FK is dropped so the invoices FK can take its name again.
-- squawk-ignore ban-drop-constraint
ALTER TABLE public.payment_promises DROP CONSTRAINT IF EXISTS payment_promises_invoice_id_fkey;
ALTER TABLE public.payment_promises
    ADD CONSTRAINT payment_promises_invoice_id_fkey
    FOREIGN KEY (invoice_id) REFERENCES public.invoices (id)
    NOT VALID;
