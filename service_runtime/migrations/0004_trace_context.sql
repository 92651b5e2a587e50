-- The W3C trace context (traceparent) of the work that wrote the row: the relay carries it as
-- the stream entry's `traceparent` field, so one order's saga is one OpenTelemetry trace
-- (service_runtime/tracing.py). Null when tracing was off for that work.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text;
