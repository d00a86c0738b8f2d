-- Named blocks of `kaireon-pub grants` (kaireon_pub.ops.grants), parsed like queries.sql.
-- `{role}` and `{schema}` stand for the role and the schema of the outbox, quoted by the caller
-- (psycopg.sql.Identifier); `{role_literal}` is the role's name as a string literal.
-- The tables belong to the owner role, the one `kaireon-pub migrate` runs as; these statements are
-- run by that owner or a superuser (GRANT pg_read_all_stats: a superuser, or a role with ADMIN
-- OPTION on it). Each is idempotent: run them again after an upgrade whose migration adds a table.
-- Every object below is read from the SQL the role's commands send (queries.sql, ops_queries.sql,
-- partitions.sql, the migrations); tests/integration/test_grants.py runs those statements as it.

-- grants_runtime: the publisher tier (`run`, `reap`, the cron route, `requeue`, `replay`): its DML, no DDL
-- The tier never inserts an outbox row (applications do), so no INSERT on outbox_events: the
-- horizon's exclusion of the workers' own sessions rests on that. Inserts into the two tables it
-- writes take their ids from identity columns, which need no privilege on their sequences.
-- pg_stat_activity, pg_locks, pg_prepared_xacts and pg_notify/LISTEN need no grant; a role may
-- end its own role's sessions (pg_terminate_backend) without one, and the tier ends no other.
GRANT USAGE ON SCHEMA {schema} TO {role};
-- claim (SELECT … FOR UPDATE), marks, retries, release, reaper, requeue, delete-on-publish, purge
GRANT SELECT, UPDATE, DELETE ON {schema}.outbox_events TO {role};
-- acquire, renew, release (and FOR KEY SHARE in the claim); the 256 rows are made by migrate
GRANT SELECT, UPDATE ON {schema}.outbox_shard_leases TO {role};
-- register (INSERT … ON CONFLICT DO UPDATE), unregister, forget the dead
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.outbox_workers TO {role};
-- one row per reaper run
GRANT SELECT, INSERT ON {schema}.outbox_reaper_runs TO {role};
-- the schema version the tier checks at start
GRANT SELECT ON {schema}.kaireon_schema_migrations TO {role};
-- `replay` (db/replay.sql): its runs; the rows it replays to their own topic get their new position
-- (UPDATE of outbox_events, granted above)
GRANT SELECT, INSERT, UPDATE ON {schema}.outbox_replay_runs TO {role};

-- grants_readonly: `status`, `check`, `top` (no database) and the KEDA PostgreSQL trigger: SELECT only
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT ON {schema}.outbox_events, {schema}.outbox_shard_leases, {schema}.outbox_workers,
    {schema}.outbox_reaper_runs, {schema}.kaireon_schema_migrations, {schema}.outbox_events_json TO {role};
-- the replay runs, for an operator who looks (`replay` itself runs as the runtime role)
GRANT SELECT ON {schema}.outbox_replay_runs TO {role};
-- A partitioned outbox: `status` reads each partition's state from the partition itself, so SELECT
-- on the partitions there are, and on the tables the outbox's owner makes from now on in this
-- schema (the partitions made ahead). Nothing on a plain outbox.
DO $grants$
DECLARE
    parent regclass := to_regclass(format('%I.outbox_events', {schema_literal}));
    part regclass;
BEGIN
    IF parent IS NULL OR (SELECT relkind FROM pg_class WHERE oid = parent) <> 'p' THEN
        RETURN;
    END IF;
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = parent LOOP
        EXECUTE format('GRANT SELECT ON %s TO %I', part, {role_literal});
    END LOOP;
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %s IN SCHEMA %I GRANT SELECT ON TABLES TO %I',
                   (SELECT relowner::regrole::text FROM pg_class WHERE oid = parent), {schema_literal},
                   {role_literal});
END
$grants$;

-- grants_read_all_stats: other roles' sessions in pg_stat_activity (xact_start, state, query)
-- The claim horizon waits for every open transaction of this database that may still write the
-- outbox, at most OUTBOX_HORIZON_MAX_WAIT_MS from its start. Without this role, another role's
-- session shows no xact_start: its transaction is "unknown", timed by the worker only from when
-- it first saw it, the horizon-age metric reads 0 for it and `status`/`check` cannot say how old it
-- is (issue 25, case 1). It also shows other sessions' query texts: leave it out (--no-read-all-stats)
-- only where that is not acceptable, and know the cost.
GRANT pg_read_all_stats TO {role};
