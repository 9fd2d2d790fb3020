-- Sessions other than %(pid)s that hold a lock on any of %(relations)s
-- (regclass[]), with how long their transaction has been open.
SELECT DISTINCT a.pid,
       a.usename AS user_name,
       a.application_name,
       a.state,
       round(extract(epoch FROM now() - a.xact_start)::numeric, 1)
         AS transaction_age_s,
       left(a.query, 80) AS query
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted
  AND l.locktype = 'relation'
  AND l.relation = ANY(%(relations)s::regclass[])
  AND l.pid <> %(pid)s
ORDER BY transaction_age_s DESC NULLS LAST, a.pid;
