"""Shared assertion for the CLI's error contract: exit code 1, one line on stderr that
starts with ``error: `` and names the problem, nothing on stdout, no traceback."""

from __future__ import annotations


def assert_cli_error(result, *fragments: str) -> str:
    """``result``: a typer ``CliRunner`` result. Returns the error line."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
