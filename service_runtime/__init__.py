"""Plumbing shared by every service: config, database, outbox, stream consumer, HTTP base."""
