-- The Debezium outbox tables attached to this outbox (`kaireon-pub attach --debezium-table`): one row
-- per table, written and removed by attach/detach in the transaction that creates or drops the
-- table's trigger, so the row and the trigger exist together or not at all. The table itself is
-- named by schema and name (not regclass) so that a dump restores this row before or after it.
-- The tier reads nothing here; it publishes the events the trigger writes into outbox_events.
CREATE TABLE kaireon_debezium_attachments (
    table_schema  text        NOT NULL,
    table_name    text        NOT NULL,
    -- The trigger function attach made, in table_schema: detach drops it.
    function_name text        NOT NULL,
    -- The mapping it was attached with (columns, topic template, tombstones, headers).
    options       jsonb       NOT NULL,
    attached_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (table_schema, table_name)
);
