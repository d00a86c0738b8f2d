-- The partitioned flavour of 0001 (OUTBOX_PARTITIONING=hourly|daily on a fresh database): the same
-- columns, indexes and coordination tables; outbox_events range-partitioned on created_at.
-- Differences, each forced by PostgreSQL: the primary key is (id, created_at) (a partitioned
-- table's unique indexes must hold the partition key); id takes its values from a sequence
-- rather than an identity column (PostgreSQL 15 cannot give a partitioned table's partitions an
-- identity); the partitions themselves are made by kaireon_pub.db.partitions (migrate, then
-- worker 0 or `kaireon-pub partitions`), never here. There is no default partition: it would
-- forbid DETACH PARTITION CONCURRENTLY, and a row outside every partition is refused loudly
-- (the insert fails) rather than kept somewhere retention cannot reach.

CREATE SEQUENCE outbox_events_id_seq AS bigint;
CREATE TABLE outbox_events (
    id              bigint      NOT NULL DEFAULT nextval('outbox_events_id_seq'),
    topic           text        NOT NULL CHECK (topic <> ''),
    partition_key   text,
    payload         jsonb       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    event_type      text,
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'processing', 'published', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
    last_error      text,
    -- Fencing: a claim writes a fresh token; a mark only lands while the token is still there.
    claim_token     uuid,
    claimed_by      uuid,
    claimed_until   timestamptz,
    -- A key always maps to the same shard (keyless events spread by id); 256 shards.
    shard           smallint    GENERATED ALWAYS AS
                                ((hashtextextended(coalesce(partition_key, id::text), 0) & 255)::smallint) STORED,
    -- The writing transaction: rows are claimed only once every older transaction has ended,
    -- so a row that commits late with a lower id is never skipped (the gap-safe horizon).
    xid             xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at    timestamptz,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
ALTER SEQUENCE outbox_events_id_seq OWNED BY outbox_events.id;

-- The claim walks this index from a per-shard cursor: cost proportional to the batch.
CREATE INDEX outbox_events_claim_idx ON outbox_events (shard, xid, id) WHERE status = 'pending';
-- Events waiting for a retry; tiny. Used to hold back later events of the same key.
CREATE INDEX outbox_events_retry_idx ON outbox_events (shard, partition_key, xid, id)
    WHERE status = 'pending' AND attempts > 0;
-- Claimed rows: the reaper, crash recovery and shard handover look here.
CREATE INDEX outbox_events_processing_idx ON outbox_events (updated_at) WHERE status = 'processing';
CREATE INDEX outbox_events_failed_idx ON outbox_events (updated_at) WHERE status = 'failed';
-- Retention purge and "published in the last minute".
CREATE INDEX outbox_events_published_idx ON outbox_events (published_at) WHERE status = 'published';

-- Shard leases: PostgreSQL is the coordinator between all workers of all replicas.
CREATE TABLE outbox_shard_leases (
    shard      smallint    PRIMARY KEY,
    owner      uuid,
    epoch      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO outbox_shard_leases (shard) SELECT generate_series(0, 255);

-- Live workers, for the fair share (shards / live workers).
CREATE TABLE outbox_workers (
    worker_id    uuid        PRIMARY KEY,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    slot         integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at   timestamptz NOT NULL
);

-- One row per reaper run, for `kaireon-pub status`.
CREATE TABLE outbox_reaper_runs (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ran_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    source        text        NOT NULL,
    reset_count   integer     NOT NULL,
    duration_ms   integer     NOT NULL
);
