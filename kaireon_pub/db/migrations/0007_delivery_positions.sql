-- Where each event landed, and whether a failed one was dead-lettered (issue 27).
-- Nullable columns with no default: adding them rewrites nothing, on a plain or a partitioned
-- outbox alike (the parent's ALTER reaches every partition).
-- published_partition / published_offset: the broker's delivery report for the record, written by
-- the mark that publishes the row. NULL for rows published before this migration, and for a
-- delivery librdkafka reported without an offset (a retry the broker recognised as a duplicate:
-- the record is stored, its offset unknown to the client).
ALTER TABLE outbox_events
    ADD COLUMN published_partition integer,
    ADD COLUMN published_offset    bigint,
    -- OUTBOX_DEAD_LETTER_TOPIC: when the failed row's dead-letter record was acknowledged.
    ADD COLUMN dead_lettered_at    timestamptz;
