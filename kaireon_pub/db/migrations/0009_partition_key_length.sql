-- A key of at most 1024 bytes. partition_key is a column of two btree indexes that the claim
-- writes into (outbox_events_retry_idx, 0001; outbox_events_processing_key_idx, 0004): a row whose
-- key is longer than about 2,700 bytes is accepted while pending, then its claim fails with
-- "index row size ... exceeds btree maximum" for every row of the batch, again and again, and the
-- worker that owns its shard publishes nothing. Refused here, at the INSERT, where the application
-- sees the error and nothing is lost. 1024 bytes leaves room for the other index columns.
-- partition_key_bytes (0003) is the record's key when it is not text; its text form in
-- partition_key ('\x' + hex) is then 2 + 2 x its length, so its own bound follows from this one;
-- it is named anyway, for a row written by plain SQL.
--
-- NOT VALID: adding them reads no row and fails on none; rows written before stay as they are
-- (`kaireon-pub check` names a pending one whose key is over the limit; README, "In the table, and
-- from SQL"). Also on the partitioned outbox: PostgreSQL adds a NOT VALID CHECK to a partitioned
-- table and to each of its partitions, and partitions made later inherit it.
ALTER TABLE outbox_events
    ADD CONSTRAINT outbox_events_partition_key_length
        CHECK (octet_length(partition_key) <= 1024) NOT VALID;
ALTER TABLE outbox_events
    ADD CONSTRAINT outbox_events_partition_key_bytes_length
        CHECK (octet_length(partition_key_bytes) <= 1024) NOT VALID;
