"""tuckerize.text: one reader of calibration and evaluation texts, one meaning per name,
binary files refused (decompose --calibration and eval --text, one line naming the file)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_cli_error

from tuckerize.errors import CalibrationError, InputError
from tuckerize.text import DEMO_SHORTHAND, NAMED_FILES, is_binary, read_text

DEMO = NAMED_FILES["demo-calibration"].parent


def test_named_texts_have_one_meaning_for_both_uses():
    for name, path in NAMED_FILES.items():
        expected = path.read_text(encoding="utf-8")
        for use in ("calibration", "eval"):
            assert read_text(name, use) == (expected, name)
    # `demo` is the demo text that fits the use, recorded under its full name; the two are disjoint
    cal, held = read_text("demo", "calibration"), read_text("demo", "eval")
    assert cal.label == DEMO_SHORTHAND["calibration"] == "demo-calibration" and held.label == "demo-heldout"
    assert cal.text == (DEMO / "calibration.txt").read_text() and held.text == (DEMO / "model" / "heldout.txt").read_text()
    assert held.text[:2000] not in cal.text
    # the demo models' own held-out texts are the same bytes as `demo-heldout`
    assert (DEMO / "mixtral" / "heldout.txt").read_bytes() == NAMED_FILES["demo-heldout"].read_bytes()


def test_files_folders_and_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "sub" / "a.md").write_text("first é")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    assert read_text(tmp_path / "d") == ("second\n\nfirst é", str(tmp_path / "d"))  # sorted by path: d/b, d/sub/a
    j = tmp_path / "t.jsonl"
    j.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_text(j, "eval") == ("one\n\ntwo", str(j))
    j.write_text('{"text": "one"}\n[1, 2]\n')
    with pytest.raises(InputError, match="line 2 is not a JSON object"):
        read_text(j, "eval")
    with pytest.raises(CalibrationError, match="--calibration .*nowhere.txt does not exist"):
        read_text(tmp_path / "nowhere.txt")
    with pytest.raises(InputError, match="--text .*holds no"):
        read_text(_empty(tmp_path), "eval")
    # undecodable bytes after the sniffed head are replaced, not fatal
    late = tmp_path / "late.txt"
    late.write_bytes(b"a" * 10000 + b"\xff" + b"b")
    assert read_text(late).text == "a" * 10000 + "\ufffd" + "b"


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_is_binary():
    assert not is_binary("plain text, é, 日本".encode())
    assert not is_binary("é".encode()[:1])  # a character cut by the sniff window
    assert is_binary(b"text\x00more") and is_binary(b"\xff\xfe\x00\x00") and is_binary(b"PK\x03\x04\xa0\xff")


@pytest.fixture
def binary_files(tmp_path):
    zipped = tmp_path / "corpus.txt"  # a text name, binary content (a zip header)
    zipped.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("fine")
    (folder / "b.txt").write_bytes(b"\x00" * 64)
    return {"zip": (zipped, zipped), "latin1": (latin, latin), "folder": (folder, folder / "b.txt")}


@pytest.mark.parametrize("case", ["zip", "latin1", "folder"])
def test_binary_text_refused_by_both_commands(binary_files, tmp_path, case):
    from typer.testing import CliRunner

    from tuckerize.cli import app

    given, named = binary_files[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(app, ["decompose", "--ratio", "0.5", "--calibration", str(given), "--out", str(tmp_path / "o")])
    assert_cli_error(r, f"--calibration {named} is a binary file")
    (tmp_path / "tucker").mkdir()
    r = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "tucker"), "--baseline", "demo", "--text", str(given)])
    assert_cli_error(r, f"--text {named} is a binary file")
    (tmp_path / "tucker").rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
