-- Redis is a delivery channel, the outbox the source of truth (DESIGN.md §5, issue 10).

-- Where each row went when it was marked published: its partition stream and the entry id the
-- XADD returned. Loss repair un-marks the rows whose entry Redis no longer has.
ALTER TABLE outbox ADD COLUMN published_stream text;
ALTER TABLE outbox ADD COLUMN published_entry_id text;
CREATE INDEX outbox_published_stream ON outbox (published_stream) WHERE published_at IS NOT NULL;

-- Per partition stream, the highest entry id the relay of this outbox published (the entry
-- ids of one stream only grow). Compared with Redis's last-generated-id: Redis behind it has
-- lost data (docs/architecture.md, "Redis data loss").
CREATE TABLE published_positions (
    stream          text PRIMARY KEY,
    last_entry_id   text NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- loss detection's record: how often Redis was found behind, rows published again
    losses          integer NOT NULL DEFAULT 0,
    republished     bigint NOT NULL DEFAULT 0,
    last_loss_at    timestamptz
);

-- Dead letters of this service's consumer group, kept in its own database so they survive Redis
-- losing its data. Written by the partition's owner in a fenced transaction, then XACK.
-- A re-drive is requested here (`saga dead-letters redrive`) and carried out by the owner of
-- the partition, which records its outcome: nothing is written to Redis by the CLI.
CREATE TABLE dead_letters (
    id                  bigserial PRIMARY KEY,
    consumer_group      text NOT NULL,
    partition           integer NOT NULL,
    stream              text NOT NULL,
    entry_id            text NOT NULL,
    event_id            text,
    event_type          text,
    fields              jsonb NOT NULL,
    error               text NOT NULL,
    attempts            integer NOT NULL,
    dead_lettered_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    redrive_requested_at timestamptz,
    redriven_at         timestamptz,
    redrive_outcome     text,
    redrives            integer NOT NULL DEFAULT 0,
    UNIQUE (consumer_group, stream, entry_id)
);
CREATE INDEX dead_letters_redrive ON dead_letters (consumer_group, partition)
    WHERE redrive_requested_at IS NOT NULL;
