-- Tables whose primary key is a single uuid column, in every schema the
-- current role can read, excluding the system schemas.
SELECT n.nspname AS schema_name,
       c.relname AS table_name,
       a.attname AS key_column
FROM pg_constraint p
JOIN pg_class c ON c.oid = p.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = p.conkey[1]
WHERE p.contype = 'p'
  AND cardinality(p.conkey) = 1
  AND a.atttypid = 'uuid'::regtype
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_%'
  AND has_table_privilege(c.oid, 'SELECT')
ORDER BY n.nspname, c.relname;
