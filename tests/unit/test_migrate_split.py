"""How a `-- kaireon:no-transaction` migration is cut into statements, and how the marker is read."""

from kaireon_pub.db.migrate import Migration, split_statements


def test_semicolons_inside_quotes_comments_and_dollar_quotes_do_not_split():
    sql = """-- kaireon:no-transaction
-- a comment; still a comment
CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON t (x);
/* block; comment */ COMMENT ON TABLE t IS 'it''s; fine';
CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $body$;
SELECT "odd;name" FROM t;
DO $$ BEGIN PERFORM 1; END $$
"""
    assert split_statements(sql) == [
        "-- kaireon:no-transaction\n-- a comment; still a comment\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON t (x)",
        "/* block; comment */ COMMENT ON TABLE t IS 'it''s; fine'",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $body$",
        'SELECT "odd;name" FROM t',
        "DO $$ BEGIN PERFORM 1; END $$",
    ]


def test_only_comments_and_blanks_make_no_statement():
    assert split_statements("-- nothing\n;\n  ;/* here */\n") == []


def test_the_marker_must_be_the_first_line():
    assert not Migration(2, "x", "-- kaireon:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (x);").transactional
    assert Migration(2, "x", "\n-- kaireon:no-transaction\nSELECT 1;").transactional
    assert Migration(2, "x", "SELECT 1; -- kaireon:no-transaction").transactional
