-- Idempotency keys are scoped to the customer (issue 13): two customers may use the same key
-- without seeing each other's order or getting a 422 for the other's body.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS customer_id text;
UPDATE idempotency_keys k SET customer_id = o.customer_id
    FROM orders o WHERE o.order_id = k.order_id AND k.customer_id IS NULL;
UPDATE idempotency_keys SET customer_id = '' WHERE customer_id IS NULL;
ALTER TABLE idempotency_keys ALTER COLUMN customer_id SET NOT NULL;
ALTER TABLE idempotency_keys DROP CONSTRAINT IF EXISTS idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (customer_id, key);
