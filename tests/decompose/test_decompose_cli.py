"""`tuckerize decompose --help` fits one screen, and every research setting it does not list
is reachable through the config's ``method:`` (configs/method.yaml lists them all)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml
from cli_helpers import assert_cli_error
from typer.main import get_command
from typer.testing import CliRunner

from tuckerize.cli import app
from tuckerize.compress.method import Method

REPO = Path(__file__).resolve().parents[2]
#: At most this many options (besides --help): one screen.
MAX_OPTIONS = 16


def test_decompose_help_fits_one_screen():
    command = get_command(app).commands["decompose"]
    options = [p for p in command.params if p.name != "help"]
    assert len(options) <= MAX_OPTIONS, [p.opts[0] for p in options]
    shown = CliRunner().invoke(app, ["decompose", "--help"], env={"COLUMNS": "100"}).output
    listed = re.findall(r"^\W*(--[a-z][a-z-]*)", shown, flags=re.M)
    assert sorted(set(listed) - {"--help"}) == sorted(p.opts[0] for p in options)
    for research in ("--refit", "--sequential", "--expert-rank", "--stats"):
        assert research not in listed
    narrow = CliRunner().invoke(app, ["decompose", "--help"], env={"COLUMNS": "80"}).output
    assert len(narrow.splitlines()) <= 50, narrow  # one 80 x 50 terminal


def test_method_yaml_lists_every_setting():
    """configs/method.yaml holds every field of Method at its default, documented."""
    text = (REPO / "configs" / "method.yaml").read_text()
    section = yaml.safe_load(text)["method"]
    defaults = {f.name: getattr(Method(), f.name) for f in dataclasses.fields(Method)}
    defaults["bytes"] = defaults["bytes"].to_dict()  # a nested section
    assert section == defaults
    for name in defaults:
        assert re.search(rf"^  {name}: .+# \w", text, flags=re.M), f"{name} has no comment in configs/method.yaml"


def test_research_settings_from_method(tmp_path):
    """refit and sequential from method: need calibration text; saved statistics hold no tokens."""
    from tuckerize.calibration.store import STATS_NAME

    stats = tmp_path / "run"
    stats.mkdir()
    (stats / STATS_NAME).write_bytes(b"")  # the refusal comes before the statistics are read
    for setting in ("refit", "sequential"):
        (tmp_path / "m.yaml").write_text(f"method:\n  {setting}: true\n")
        r = CliRunner().invoke(app, ["decompose", "--ranks", "16,64,32", "--config", str(tmp_path / "m.yaml"),
                                     "--calibration", str(stats), "--out", str(tmp_path / "o")])
        assert_cli_error(r, f"method.{setting} needs --calibration TEXT", "saved statistics")
    assert not (tmp_path / "o").exists()
