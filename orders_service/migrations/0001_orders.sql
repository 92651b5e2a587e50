CREATE TABLE orders (
    order_id          uuid PRIMARY KEY,
    customer_id       text NOT NULL,
    status            text NOT NULL
                      CHECK (status IN ('pending', 'confirmed', 'rejected', 'cancelled')),
    reason            text,
    total_cents       bigint,
    payment_deadline  timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_by_customer ON orders (customer_id, created_at DESC);
CREATE INDEX orders_by_status ON orders (status, created_at DESC);
-- The deadline sweeper only looks at pending orders.
CREATE INDEX orders_pending_deadline ON orders (payment_deadline) WHERE status = 'pending';

CREATE TABLE order_lines (
    order_id  uuid NOT NULL REFERENCES orders (order_id),
    line_no   integer NOT NULL,
    sku       text NOT NULL,
    quantity  integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, line_no)
);

-- Status changes and the saga's events as they reach this service.
CREATE TABLE order_history (
    id        bigserial PRIMARY KEY,
    order_id  uuid NOT NULL REFERENCES orders (order_id),
    status    text,
    event     text,
    reason    text,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK ((status IS NULL) <> (event IS NULL))
);
CREATE INDEX order_history_by_order ON order_history (order_id, id);

CREATE TABLE idempotency_keys (
    key           text PRIMARY KEY,
    request_hash  text NOT NULL,
    order_id      uuid NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
