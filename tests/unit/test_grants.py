"""`kaireon-pub grants`' text (no services): tests/integration/test_grants.py applies it."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kaireon_pub.cli import cli
from kaireon_pub.ops.grants import statements


def test_grants_are_printed_for_the_named_role_and_schema_quoted():
    text = statements('Odd"Role', "readonly", schema="out box")
    assert 'TO "Odd""Role";' in text and 'ON SCHEMA "out box"' in text
    assert "'Odd\"Role'" in text  # as a literal inside the DO block
    assert "GRANT pg_read_all_stats" in text
    assert "pg_read_all_stats" not in statements("r", "runtime", read_all_stats=False)
    assert "INSERT" not in "".join(line for line in statements("r", "runtime").splitlines()
                                   if "outbox_events TO" in line)
    with pytest.raises(ValueError):
        statements("r", "owner")


def test_the_command_prints_the_statements():
    result = CliRunner().invoke(cli, ["grants", "--role", "kp_run", "--for", "runtime", "--no-read-all-stats"])
    assert result.exit_code == 0, result.output
    assert result.output == statements("kp_run", "runtime", read_all_stats=False)
    assert CliRunner().invoke(cli, ["grants", "--role", "x", "--for", "owner"]).exit_code == 2
