-- Synthetic incident data: invented names, numbers and documents only.
-- Every id is md5(label)::uuid, so each load produces the same rows.
--
-- Contracts whose number is a multiple of 3 are single-instalment contracts
-- whose only invoice was imported with the contract's own id. Attempts
-- recorded against them passed the wrong FK, which is why the bug showed
-- only for some sends. Contract 43 carries the key from the incident log
-- (2f44c1c9-9c8b-4c76-b56c-527f5242cafd) and has no such invoice; its
-- customer also has contract 3, so their history is not empty.

INSERT INTO customers (id, name, phone, document, created_at)
SELECT md5('customer:' || i)::uuid,
       (ARRAY['Marina', 'Tiago', 'Lucia', 'Rafael', 'Helena', 'Bruno',
              'Carla', 'Davi', 'Elisa', 'Fabio'])[1 + (i - 1) % 10]
       || ' ' ||
       (ARRAY['Duarte', 'Moreira', 'Teixeira', 'Campos'])[1 + (i - 1) / 10],
       '55119' || lpad((90000000 + i * 7919)::text, 8, '0'),
       lpad((i * 104729)::text, 11, '0'),
       timestamptz '2025-01-06 12:00:00+00' + i * interval '1 day'
FROM generate_series(1, 40) AS i;

INSERT INTO operator_contracts
    (id, customer_id, contract_number, start_date, end_date, total_value,
     outstanding_value, created_at)
SELECT CASE WHEN i = 43 THEN '2f44c1c9-9c8b-4c76-b56c-527f5242cafd'::uuid
            ELSE md5('contract:' || i)::uuid END,
       md5('customer:' || (1 + (i - 1) % 40))::uuid,
       'OC-2025-' || lpad(i::text, 4, '0'),
       date '2025-02-01' + i * 3,
       date '2026-02-01' + i * 3,
       1200.00 + i * 150,
       300.00 + i * 40,
       timestamptz '2025-02-01 12:00:00+00' + i * interval '3 days'
FROM generate_series(1, 60) AS i;

-- One invoice per single-instalment contract, with the contract's id.
INSERT INTO invoices (id, customer_id, contract_id, due_date, amount, status, created_at)
SELECT c.id, c.customer_id, c.id, c.start_date + 30, c.total_value, 'overdue',
       c.created_at
FROM operator_contracts c
WHERE substr(c.contract_number, 9)::int % 3 = 0;

-- Three monthly invoices for every other contract, with ids of their own.
INSERT INTO invoices (id, customer_id, contract_id, due_date, amount, status, created_at)
SELECT md5('invoice:' || c.contract_number || ':' || n)::uuid,
       c.customer_id, c.id, c.start_date + 30 * n,
       round(c.total_value / 3, 2),
       CASE WHEN n = 1 THEN 'paid' ELSE 'overdue' END,
       c.created_at + n * interval '30 days'
FROM operator_contracts c
CROSS JOIN generate_series(1, 3) AS n
WHERE substr(c.contract_number, 9)::int % 3 <> 0;

-- Attempts that were saved: all against single-instalment contracts.
INSERT INTO collection_attempts
    (id, customer_id, invoice_id, collector_id, channel, status, notes, created_at)
SELECT md5('attempt:' || k)::uuid,
       c.customer_id,
       c.id,
       md5('collector:' || (1 + k % 3))::uuid,
       (ARRAY['whatsapp', 'telefone', 'email', 'sms'])[1 + (k / 7) % 4]::collection_channel,
       (ARRAY['sent', 'delivered', 'read', 'replied'])[1 + (k / 3) % 4]::attempt_status,
       'Synthetic attempt ' || k,
       timestamptz '2026-11-02 09:00:00+00' + k * interval '97 minutes'
FROM generate_series(1, 120) AS k
JOIN operator_contracts c
  ON c.contract_number = 'OC-2025-' || lpad((3 * (1 + k % 20))::text, 4, '0');

INSERT INTO payment_promises
    (id, invoice_id, collector_id, promised_date, promised_amount, status, created_at)
SELECT md5('promise:' || k)::uuid,
       md5('contract:' || (3 * (1 + k % 20)))::uuid,
       md5('collector:' || (1 + k % 3))::uuid,
       date '2026-12-01' + k,
       150.00 + k * 10,
       (ARRAY['pending', 'kept', 'broken'])[1 + k % 3],
       timestamptz '2026-11-03 10:00:00+00' + k * interval '5 hours'
FROM generate_series(1, 30) AS k;
