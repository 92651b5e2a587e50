"""Embedded PostgreSQL and Redis for development and tests (see DESIGN.md §8)."""
