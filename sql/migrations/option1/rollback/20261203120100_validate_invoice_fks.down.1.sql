SET LOCAL lock_timeout = '100ms';
SET LOCAL statement_timeout = '5s';
-- SET LOCAL ends with the transaction that Supabase wraps around this file, so
-- these timeouts do not leak into later migrations on the same connection.
-- This file runs no DDL, so it has no check that the settings took effect.

-- Roll back option 1, phase B: nothing to undo. VALIDATE CONSTRAINT only
-- records that the existing rows satisfy the FK. PostgreSQL has no statement
-- that marks a constraint NOT VALID again, and a valid FK checks new rows
-- exactly as a NOT VALID one does. To restore the invoices FKs, run the
-- phase A rollback next.
