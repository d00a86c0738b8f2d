-- Payloads, keys and header values as bytes: what enqueue() is given is what the consumer reads.
--
-- New columns next to the old ones, no rewrite: an ADD COLUMN without a default (or with a constant
-- one) and a DROP NOT NULL change the catalog only, and the constraints are added NOT VALID (no
-- scan). Rows written before this migration are not moved: the claim publishes
-- coalesce(payload_bytes, convert_to(payload::text, 'UTF8')), which for them is the same bytes as
-- before (payload::text). Measured (python -m bench.migration, embedded PostgreSQL 18, shared
-- 2-core machine): 4.0 ms on an empty table, 8.3 ms on a table of 1,000,000 rows of ~300 B; no
-- step reads the rows. Its ACCESS EXCLUSIVE lock waits for the transactions that use the table
-- (a lock-mode batch, an application's open transaction) and enqueue() waits behind it.
--
-- Why not ALTER COLUMN payload TYPE bytea: that rewrites the table under an ACCESS EXCLUSIVE lock
-- (enqueue waits for it), makes every writer that still sends jsonb fail (an application on the
-- older kaireon_pub, SQL scripts, restores) and makes a worker of the older release publish the
-- bytea's hex text while a rolling deploy runs. Here the older writers and workers keep working:
-- an older writer's jsonb is published as before.
--
-- payload             jsonb, as before: written by older writers and by plain SQL; NULL for rows
--                     enqueue() writes now.
-- payload_bytes       bytea: the record's value for rows enqueue() writes now.
--                     Both NULL: a tombstone (the record's value is null).
-- partition_key_bytes bytea: the exact key when it is not UTF-8 text without NUL; partition_key
--                     then holds '\x' followed by its hex digits (its shard and its order).
-- binary_headers      jsonb: header name -> base64 of a bytes value; headers keeps the str values.
ALTER TABLE outbox_events
    ALTER COLUMN payload DROP NOT NULL,
    ADD COLUMN payload_bytes bytea,
    ADD COLUMN partition_key_bytes bytea,
    ADD COLUMN binary_headers jsonb NOT NULL DEFAULT '{}'::jsonb;

ALTER TABLE outbox_events
    ADD CONSTRAINT outbox_events_one_payload CHECK (payload IS NULL OR payload_bytes IS NULL) NOT VALID;
-- The companion of outbox_events_headers_is_object (0002) for the new header column.
ALTER TABLE outbox_events
    ADD CONSTRAINT outbox_events_binary_headers_is_object CHECK (jsonb_typeof(binary_headers) = 'object') NOT VALID;

-- Bytes as JSON when they are UTF-8 JSON text, else NULL (Avro, Protobuf, plain text).
-- IMMUTABLE although convert_from is only STABLE: its result depends on the database's encoding,
-- which is fixed when the database is made; so an expression index on it is possible.
CREATE FUNCTION outbox_json(value bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN convert_from(value, 'UTF8')::jsonb;
EXCEPTION WHEN invalid_text_representation OR character_not_in_repertoire OR untranslatable_character THEN
    RETURN NULL;
END
$$;

-- For operators: every event with the key and value its record carries, and its JSON when it has
-- one. A plain view: it costs the claim nothing (the claim reads the table).
CREATE VIEW outbox_events_json AS
SELECT e.id, e.topic, e.status, e.event_type, e.attempts, e.last_error,
       e.created_at, e.published_at, e.shard,
       coalesce(e.partition_key_bytes, convert_to(e.partition_key, 'UTF8')) AS key,
       coalesce(e.payload_bytes, convert_to(e.payload::text, 'UTF8')) AS value,
       coalesce(e.payload, outbox_json(e.payload_bytes)) AS payload_json,
       e.headers, e.binary_headers
FROM outbox_events e;
