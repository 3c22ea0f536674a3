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


#: Manifest and journal fields that differ between identical runs.
TIMINGS = {"seconds", "wall_seconds", "collect_seconds"}


def strip_timings(data):
    """``data`` (parsed JSON) without the :data:`TIMINGS` fields, at any depth."""
    if isinstance(data, dict):
        return {k: strip_timings(v) for k, v in data.items() if k not in TIMINGS}
    if isinstance(data, list):
        return [strip_timings(v) for v in data]
    return data


def output_contents(folder):
    """name -> sha256 of every file of a decompose output; the manifest as JSON without
    timings and ``out`` (two identical runs give equal dicts)."""
    import hashlib
    import json

    out = {}
    for p in sorted(folder.iterdir()):
        if p.name == "tuckerize_manifest.json":
            m = json.loads(p.read_text())
            m.pop("out")
            out[p.name] = json.dumps(strip_timings(m), sort_keys=True)
        else:
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
