CREATE TABLE accounts (
    customer_id    text PRIMARY KEY,
    balance_cents  bigint NOT NULL CHECK (balance_cents >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Money that enters or leaves outside payments, for the audit:
-- per account, the sum of these = balance + captures - refunds.
CREATE TABLE account_adjustments (
    id            bigserial PRIMARY KEY,
    customer_id   text NOT NULL REFERENCES accounts (customer_id),
    delta_cents   bigint NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('set', 'deposit')),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Billing's one decision per order: captured (later maybe refunded) or declined.
CREATE TABLE payments (
    order_id      uuid PRIMARY KEY,
    payment_id    uuid UNIQUE,
    customer_id   text NOT NULL,
    amount_cents  bigint NOT NULL CHECK (amount_cents >= 0),
    status        text NOT NULL CHECK (status IN ('captured', 'refunded', 'declined')),
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    refunded_at   timestamptz
);

CREATE TABLE refunds (
    refund_id     uuid PRIMARY KEY,
    payment_id    uuid NOT NULL UNIQUE REFERENCES payments (payment_id),
    amount_cents  bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Cancellations seen before any capture: a StockReserved arriving later is never charged.
CREATE TABLE cancelled_orders (
    order_id      uuid PRIMARY KEY,
    reason        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
