-- Whether supabase_realtime exists and publishes the given table.
SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime')
         AS publication_exists,
       EXISTS (SELECT 1 FROM pg_publication_tables
               WHERE pubname = 'supabase_realtime'
                 AND schemaname = %(schema)s AND tablename = %(table)s)
         AS table_published;
