-- `kaireon-pub replay` (issue 27): one row per replay run, its resume cursor and its counts.
-- A plain table in both flavours (it is not the outbox: nothing partitions it, nothing purges it).
CREATE TABLE outbox_replay_runs (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Who: the database role of the session that started it, and the operator it names
    -- (--by, else $USER) with the host it ran on.
    db_user       text        NOT NULL DEFAULT session_user,
    operator      text,
    host          text,
    -- What: the selection as given (keys, ids, window, topics), its window's end fixed at the start.
    selection     jsonb       NOT NULL CHECK (jsonb_typeof(selection) = 'object'),
    to_topic      text,                   -- NULL: each event to its own topic
    rate          double precision,       -- events/s cap; NULL: no cap
    -- The resume cursor: the last event, in (xid, id) order, acknowledged with all before it.
    cursor_xid    xid8,
    cursor_id     bigint,
    selected      bigint      NOT NULL DEFAULT 0,  -- events the selection held at the start
    published     bigint      NOT NULL DEFAULT 0,  -- records acknowledged (over every resume)
    skipped       bigint      NOT NULL DEFAULT 0,  -- rows that could not become a record
    state         text        NOT NULL DEFAULT 'running'
                              CHECK (state IN ('running', 'interrupted', 'failed', 'finished')),
    last_error    text,
    -- The process running it now (host:pid) and until when its claim holds without a renewal.
    holder        text,
    held_until    timestamptz,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at   timestamptz
);
