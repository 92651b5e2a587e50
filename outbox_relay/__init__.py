"""The outbox relay: committed outbox rows -> Redis Streams, one active relay per outbox."""
