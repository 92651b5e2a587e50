"""Inventory: products, stock levels and per-order reservations."""
