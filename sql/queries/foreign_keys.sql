-- Foreign keys defined on, or pointing at, the given tables (regclass[]).
-- contype = 'f' keeps this the same on PostgreSQL 15 and 18, although 18
-- also lists NOT NULL constraints in pg_constraint.
SELECT con.conname AS constraint_name,
       con.conrelid::regclass::text AS table_name,
       (SELECT string_agg(a.attname, ', ' ORDER BY k.ord)
          FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum)
         AS columns,
       con.confrelid::regclass::text AS referenced_table,
       pg_get_constraintdef(con.oid) AS definition,
       con.convalidated AS validated,
       CASE con.confdeltype
           WHEN 'a' THEN 'NO ACTION' WHEN 'r' THEN 'RESTRICT'
           WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL'
           WHEN 'd' THEN 'SET DEFAULT' END AS on_delete,
       con.condeferrable AS deferrable,
       con.condeferred AS initially_deferred,
       EXISTS (
           SELECT 1 FROM pg_index i
           WHERE i.indrelid = con.conrelid
             AND i.indisvalid
             AND (i.indkey::int2[])[0:cardinality(con.conkey) - 1]
                 = con.conkey::int2[]
       ) AS column_indexed
FROM pg_constraint con
WHERE con.contype = 'f'
  AND (con.conrelid = ANY(%(tables)s::regclass[])
       OR con.confrelid = ANY(%(referenced)s::regclass[]))
ORDER BY con.conrelid::regclass::text, con.conname;
