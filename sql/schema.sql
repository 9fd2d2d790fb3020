-- Incident-state schema: collection_attempts.invoice_id and
-- payment_promises.invoice_id reference invoices(id), while the collection
-- queue hands the app operator_contracts ids. Constraint names are the ones
-- PostgreSQL generates for inline REFERENCES clauses.

CREATE TYPE collection_channel AS ENUM ('whatsapp', 'telefone', 'email', 'sms');
CREATE TYPE attempt_status AS ENUM ('sent', 'delivered', 'read', 'replied', 'failed');

CREATE TABLE customers (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL,
    phone text,
    document text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE operator_contracts (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id uuid NOT NULL REFERENCES customers (id),
    contract_number text NOT NULL UNIQUE,
    start_date date NOT NULL,
    end_date date,
    total_value numeric(12, 2) NOT NULL,
    outstanding_value numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE invoices (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id uuid NOT NULL REFERENCES customers (id),
    contract_id uuid REFERENCES operator_contracts (id),
    due_date date NOT NULL,
    amount numeric(12, 2) NOT NULL,
    status text NOT NULL DEFAULT 'open',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE collection_attempts (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id uuid NOT NULL REFERENCES customers (id),
    invoice_id uuid NOT NULL REFERENCES invoices (id),
    collector_id uuid NOT NULL,
    channel collection_channel NOT NULL,
    status attempt_status NOT NULL,
    notes text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The history screen reads one customer's attempts newest first.
CREATE INDEX collection_attempts_customer_id_created_at_idx
    ON collection_attempts (customer_id, created_at DESC);
CREATE INDEX collection_attempts_invoice_id_idx
    ON collection_attempts (invoice_id);

-- payment_promises.invoice_id has no index, as in the incident database:
-- inspect warns about it.
CREATE TABLE payment_promises (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    invoice_id uuid NOT NULL REFERENCES invoices (id),
    collector_id uuid NOT NULL,
    promised_date date NOT NULL,
    promised_amount numeric(12, 2) NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Supabase creates this publication; the app's history screen listens to it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime') THEN
        CREATE PUBLICATION supabase_realtime;
    END IF;
END
$$;
ALTER PUBLICATION supabase_realtime ADD TABLE collection_attempts;
