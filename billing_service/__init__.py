"""Billing: customer accounts, payments captured for orders, and refunds."""
