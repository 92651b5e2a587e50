-- Quantities and money are 64-bit end to end (contracts/limits.py): an order of 20,000 units
-- at 150,000 cents must not overflow reservations.total_cents, nor a restock `available`.
ALTER TABLE products
    ALTER COLUMN price_cents TYPE bigint,
    ALTER COLUMN available TYPE bigint;
ALTER TABLE stock_adjustments ALTER COLUMN delta TYPE bigint;
ALTER TABLE reservations ALTER COLUMN total_cents TYPE bigint;
ALTER TABLE reservation_lines
    ALTER COLUMN quantity TYPE bigint,
    ALTER COLUMN unit_price_cents TYPE bigint;

-- Stock held per sku, summed under the product's lock to bound stock on hand (MAX_STOCK).
CREATE INDEX reservation_lines_by_sku ON reservation_lines (sku);
