-- One customer's attempts, newest first, as the app's history screen reads
-- them, each with the promises recorded against the same invoice_id.
SELECT a.id::text,
       a.created_at,
       a.channel::text,
       a.status::text,
       a.notes,
       a.invoice_id::text,
       (SELECT string_agg(p.promised_date || ' ' || p.promised_amount || ' '
                          || p.status, '; ' ORDER BY p.promised_date)
          FROM payment_promises p
         WHERE p.invoice_id = a.invoice_id) AS promises
FROM collection_attempts a
WHERE a.customer_id = %(customer_id)s
ORDER BY a.created_at DESC, a.id
LIMIT %(limit)s;
