"""Orders: placing and cancelling orders, and following each order's saga to its end."""
