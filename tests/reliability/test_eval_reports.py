"""``eval``'s settings and report files: ``--seqlen`` clamped to the model's positions with a
note, ``--json``/``--plot`` paths checked before any work, the table printed before files are
written (so a failing write loses nothing), report files written atomically, strict JSON
(no bare Infinity/NaN: null), and a Ctrl-C message that promises no resume."""

from __future__ import annotations

import json
import math

import pytest

from reliab_helpers import *  # noqa: F401,F403
from reliab_helpers import in_process

FAST = ["--max-windows", "1", "--layer-tokens", "8"]




def _args(tiny, *extra):
    return ["eval", "--model", tiny["tucker"], "--text", tiny["text"], *FAST, *extra]


def test_seqlen_longer_than_positions_is_clamped_with_a_note(tiny, cli, tmp_path):
    from transformers import AutoConfig

    max_pos = AutoConfig.from_pretrained(str(tiny["src"])).max_position_embeddings
    out = tmp_path / "r.json"
    result = cli(*_args(tiny, "--seqlen", max_pos + 72, "--json", out))
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert (report["settings"]["seqlen"], report["settings"]["seqlen_requested"]) == (max_pos, max_pos + 72)
    assert report["text"]["tokens_scored"] == max_pos - 1
    [note] = report["notes"]
    assert f"--seqlen {max_pos + 72}" in note and f"max_position_embeddings {max_pos}" in note
    stderr = " ".join(result.stderr.split())
    assert note in stderr and stderr.index(note) < stderr.index("original vs Tucker")


@pytest.mark.parametrize("flag, bad, fragment", [
    ("--json", "missing-dir/r.json", "does not exist"),
    ("--plot", "missing-dir/r.png", "does not exist"),
    ("--json", ".", "is a folder"),
])
def test_bad_report_path_is_found_before_the_work(tiny, cli, cache, tmp_path, flag, bad, fragment, monkeypatch):
    import tuckerize.evaluate as ev

    called = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: called.append(1))
    path = tmp_path / bad
    in_process(cli(*_args(tiny, "--seqlen", 32, flag, path)), flag, fragment)
    assert called == [] and not cache.exists()


def test_table_printed_before_a_failing_write(tiny, cli, tmp_path, monkeypatch):
    """The disk fills up while the report is written: the table is already on the screen, the
    error is one line after it, and no partial file is left."""
    import tuckerize.checkpoint as ck

    real = ck.atomic_write

    def full_disk(path):
        import contextlib
        import errno
        import os

        @contextlib.contextmanager
        def cm():
            with real(path) as tmp:
                tmp.write_text("{partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                yield tmp  # pragma: no cover
        return cm()

    monkeypatch.setattr(ck, "atomic_write", full_disk)
    out = tmp_path / "r.json"
    result = cli(*_args(tiny, "--seqlen", 32, "--json", out))
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any("original vs Tucker" in line for line in lines), result.stderr + result.stdout
    assert lines[-1].startswith("error: cannot write") and str(out) in lines[-1] and "no space left" in lines[-1].lower()
    assert "Traceback" not in result.stderr
    assert list(tmp_path.glob("*r.json*")) == []


def test_report_files_atomic_and_json_strict(tiny, cli, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    out.write_text("old report")
    result = cli(*_args(tiny, "--seqlen", 32, "--json", out, "--plot", png))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("r.", ".r."))) == ["r.json", "r.png"]

    def refuse(token):
        raise AssertionError(f"bare {token} in JSON")

    report = json.loads(out.read_text(), parse_constant=refuse)
    assert report["tucker_result"]["perplexity"] > 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_values_become_null():
    from tuckerize.cli.ui import to_json

    report = {"tucker_result": {"perplexity": math.inf, "mean_nll": 1000.0}, "perplexity_ratio": math.nan,
              "layers": [1.5, -math.inf], "n": 3, "s": "inf"}

    def refuse(token):
        raise AssertionError(f"bare {token} in JSON")

    assert json.loads(to_json(report), parse_constant=refuse) == {
        "tucker_result": {"perplexity": None, "mean_nll": 1000.0}, "perplexity_ratio": None,
        "layers": [1.5, None], "n": 3, "s": "inf"}


def test_overflowing_perplexity_is_inf_not_an_error():
    from tuckerize.evaluate.report import safe_exp

    assert safe_exp(1.0) == pytest.approx(math.e) and safe_exp(1000.0) == math.inf


def test_ctrl_c_promises_no_resume(tiny, cli, monkeypatch):
    import tuckerize.evaluate as ev

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", interrupted)
    result = cli(*_args(tiny, "--seqlen", 32))
    assert result.exit_code == 130
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "does not resume" in line and "no report was written" in line
    assert "to resume" not in line
