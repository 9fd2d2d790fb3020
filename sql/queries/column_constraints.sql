-- NOT NULL flag and foreign keys of one column (%(table)s is a regclass,
-- %(column)s a column name).
SELECT a.attnotnull AS not_null,
       coalesce(json_agg(json_build_object(
           'name', con.conname,
           'referenced_table', con.confrelid::regclass::text,
           'definition', pg_get_constraintdef(con.oid),
           'validated', con.convalidated,
           'on_delete', con.confdeltype::text
       ) ORDER BY con.conname) FILTER (WHERE con.oid IS NOT NULL), '[]')
         AS foreign_keys
FROM pg_attribute a
LEFT JOIN pg_constraint con
       ON con.conrelid = a.attrelid
      AND con.contype = 'f'
      AND con.conkey = ARRAY[a.attnum]
WHERE a.attrelid = %(table)s::regclass
  AND a.attname = %(column)s
  AND NOT a.attisdropped
GROUP BY a.attnotnull;
