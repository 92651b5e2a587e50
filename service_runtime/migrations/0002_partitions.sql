-- Settings fixed when the deployment was created (STREAM_PARTITIONS): a process started with
-- another value refuses to start (service_runtime/partitions.py).
CREATE TABLE deployment_settings (
    name        text PRIMARY KEY,
    value       text NOT NULL,
    set_at      timestamptz NOT NULL DEFAULT now()
);

-- Live consumers of this service's group: each heartbeats; the live ones share the partitions.
CREATE TABLE consumer_members (
    consumer_group  text NOT NULL,
    consumer        text NOT NULL,
    heartbeat_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, consumer)
);

-- One lease per partition of the group. `epoch` grows at every change of owner: the owner's
-- transactions check (partition, epoch, unexpired) FOR SHARE, so a takeover waits for them and
-- a consumer that lost the lease can commit nothing more for that partition (fencing).
CREATE TABLE partition_leases (
    consumer_group  text NOT NULL,
    partition       integer NOT NULL,
    owner           text NOT NULL,
    epoch           bigint NOT NULL,
    acquired_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (consumer_group, partition)
);

-- Failed deliveries of an entry, counted across owners (a new owner continues the count);
-- outages and conflicts are not counted here, only the handler's own errors.
CREATE TABLE delivery_failures (
    consumer_group  text NOT NULL,
    stream          text NOT NULL,
    entry_id        text NOT NULL,
    event_id        text,
    attempts        integer NOT NULL,
    last_error      text NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, stream, entry_id)
);
