-- Money columns are bigint already. Captured money per account, summed under the account's
-- lock to bound money on hand (MAX_BALANCE_CENTS, contracts/limits.py).
CREATE INDEX payments_captured_by_customer ON payments (customer_id) WHERE status = 'captured';
