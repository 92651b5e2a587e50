CREATE TABLE products (
    sku          text PRIMARY KEY,
    name         text NOT NULL,
    price_cents  integer NOT NULL CHECK (price_cents >= 0),
    available    integer NOT NULL CHECK (available >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Every change of stock that is not a reservation or a release, for the audit:
-- per sku, the sum of these = available + held by reservations.
CREATE TABLE stock_adjustments (
    id           bigserial PRIMARY KEY,
    sku          text NOT NULL REFERENCES products (sku),
    delta        integer NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('set', 'restock')),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per order that inventory has decided on. A row that exists means "decided":
-- a duplicate or late OrderPlaced never reserves twice, and a cancellation that arrives
-- first leaves a 'released' row with no lines so a later OrderPlaced reserves nothing.
CREATE TABLE reservations (
    order_id     uuid PRIMARY KEY,
    customer_id  text,
    status       text NOT NULL CHECK (status IN ('held', 'released', 'failed')),
    reason       text,
    total_cents  integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    released_at  timestamptz
);

CREATE TABLE reservation_lines (
    order_id          uuid NOT NULL REFERENCES reservations (order_id),
    sku               text NOT NULL REFERENCES products (sku),
    quantity          integer NOT NULL CHECK (quantity > 0),
    unit_price_cents  integer NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, sku)
);
