-- Quantities are 64-bit end to end (contracts/limits.py).
ALTER TABLE order_lines ALTER COLUMN quantity TYPE bigint;
