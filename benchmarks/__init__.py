"""`saga bench`: throughput and latency of the relay, the consumer and the whole saga (issue
"Measure it"), each beside the raw Redis and PostgreSQL limits measured in the same run."""
