-- Named blocks of `kaireon-pub attach` / `detach` (kaireon_pub.ops.debezium), parsed like queries.sql.
-- Placeholders in braces ({table}, {function}, {payload_bytes} …) are filled by the caller with
-- psycopg.sql (Identifier for names, Literal for values, SQL for the column expressions it builds
-- from the table's catalogue); the others take %(name)s parameters. The tier itself sends none of
-- these: they are the attaching operator's, run as the owner of outbox_events.

-- table_columns: the columns of the table to attach, with their types
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type_name, t.typname, t.typcategory
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %(table)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum;

-- table_identity: the table's schema and name, and its kind ('r' a table, 'p' a partitioned one)
SELECT n.nspname, c.relname, c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = %(table)s::regclass;

-- outbox_schema: the schema of the outbox_events this session sees (the one attach writes into)
SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass('outbox_events');

-- attachment: the attachment of a table, if any
SELECT function_name, options FROM kaireon_debezium_attachments
WHERE table_schema = %(schema)s AND table_name = %(name)s
FOR UPDATE;

-- attachments: every attached table
SELECT table_schema, table_name, function_name, options, attached_at
FROM kaireon_debezium_attachments ORDER BY table_schema, table_name;

-- capture_function: the trigger function of one attached table: each inserted row becomes an event
-- SECURITY DEFINER: it inserts as the owner of outbox_events (the role that ran attach), so the
-- application's role needs no grant on the outbox: it can add events only by writing rows to its
-- own table, in its own transaction. The search_path is fixed (pg_catalog, then pg_temp last) and
-- every name below is schema-qualified, so no object of the caller's can stand in for ours.
-- The row's xid (outbox_events' default, pg_current_xact_id()) is the writer's transaction: the
-- claim horizon and the per-key order apply to it as to any enqueue().
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $kaireon_capture$
BEGIN
    INSERT INTO {outbox} (topic, partition_key, partition_key_bytes, payload, payload_bytes, headers,
                          binary_headers, event_type)
    VALUES (pg_catalog.replace({topic_template}, {routed_variable}, {routed_value}),
            {key_text}, {key_bytes}, {payload_jsonb}, {payload_bytes},
            pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object({headers})),
            pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object({binary_headers})),
            {event_type}::text);
    PERFORM pg_catalog.pg_notify('kaireon_outbox', '');
    RETURN NULL;
END
$kaireon_capture$;

-- revoke_function: nobody else may put the function on a table of theirs (a trigger's function is
-- checked for EXECUTE when the trigger is created, not when it fires)
REVOKE ALL ON FUNCTION {function}() FROM PUBLIC;

-- create_trigger: after each insert, in the writer's transaction (the insert-then-delete idiom included)
CREATE TRIGGER {trigger} AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {function}();

-- drop_trigger: the table as it was
DROP TRIGGER IF EXISTS {trigger} ON {table};

-- drop_function: the attachment's function, once no trigger uses it
DROP FUNCTION IF EXISTS {function}();

-- record_attachment: the bookkeeping row of an attachment (a new one, or new options)
INSERT INTO kaireon_debezium_attachments (table_schema, table_name, function_name, options)
VALUES (%(schema)s, %(name)s, %(function_name)s, %(options)s::jsonb)
ON CONFLICT (table_schema, table_name)
DO UPDATE SET function_name = EXCLUDED.function_name, options = EXCLUDED.options, attached_at = clock_timestamp();

-- forget_attachment: the bookkeeping row goes with the trigger
DELETE FROM kaireon_debezium_attachments WHERE table_schema = %(schema)s AND table_name = %(name)s;

-- trigger_present: whether the table has the attachment's trigger (a restore, or a hand-made drop)
SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = %(table)s::regclass AND tgname = %(trigger)s);
