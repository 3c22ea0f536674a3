"""Rank parsing, checking and YAML rank plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuckerize.compress.method import Method, load_method
from tuckerize.errors import RankError, TuckerizeError
from tuckerize.ranks import (
    RankPlan,
    check_ranks,
    load_plan,
    parse_ranks,
    plan_from_dict,
    save_plan,
    uniform_plan,
)

PROJ = ("gate", "up", "down")
REPO = Path(__file__).resolve().parents[1]
QWEN3_30B_SHAPE = (128, 2048, 768)
QWEN3_30B_LAYERS = tuple(range(48))


# ---------------------------------------------------------------- parse_ranks


@pytest.mark.parametrize(
    "text,expected",
    [
        ("64,512,256", (64, 512, 256)),
        (" 64 , 512,256 ", (64, 512, 256)),
        ([1, 2, 3], (1, 2, 3)),
        ((8, 16, 4), (8, 16, 4)),
        (["4", "5", "6"], (4, 5, 6)),
    ],
)
def test_parse_ranks_accepts(text, expected):
    got = parse_ranks(text)
    assert got == expected
    assert all(type(v) is int for v in got)


@pytest.mark.parametrize(
    "text",
    ["64,512", "64,512,256,1", "", "a,b,c", "64;512;256", "64 512 256", "1.5,2,3", "-1,2,3", "64,,256",
     "0x10,2,3", [1.5, 2, 3], [1, 2], 64, None, {"r_E": 1}],
)
def test_parse_ranks_rejects_malformed(text):
    with pytest.raises(RankError) as exc:
        parse_ranks(text)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "64,512,256" in msg  # says what a valid value looks like


def test_parse_ranks_names_the_bad_axis():
    with pytest.raises(RankError, match=r"r_H='x'"):
        parse_ranks("4,x,4")
    with pytest.raises(RankError, match=r"r_I"):
        parse_ranks("4,4,2.5")


# ---------------------------------------------------------------- range checks


@pytest.mark.parametrize(
    "ranks,axis,name,size",
    [
        ((0, 8, 4), "r_E", "number of experts", 8),
        ((9, 8, 4), "r_E", "number of experts", 8),
        ((2, 0, 4), "r_H", "hidden size", 32),
        ((2, 33, 4), "r_H", "hidden size", 32),
        ((2, 8, 0), "r_I", "intermediate size", 16),
        ((2, 8, 17), "r_I", "intermediate size", 16),
    ],
)
def test_out_of_range_names_axis_and_size(ranks, axis, name, size):
    shape = (8, 32, 16)
    with pytest.raises(RankError) as exc:
        check_ranks(ranks, shape)
    msg = str(exc.value)
    assert f"{axis}=" in msg and f"{name} is {size}" in msg and f"1..{size}" in msg
    # Through a plan, the message also says where.
    with pytest.raises(RankError, match=rf"{axis}=.*layer 3 gate"):
        uniform_plan(",".join(map(str, ranks))).check((3, 5), shape)


def test_full_and_minimal_ranks_are_valid():
    check_ranks((8, 32, 16), (8, 32, 16))
    check_ranks((1, 1, 1), (8, 32, 16))
    uniform_plan("8,32,16").check((0, 1), (8, 32, 16))


# ---------------------------------------------------------------- YAML plans


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


PLAN_YAML = """\
description: test plan
ranks: [4, 16, 8]
projections:
  down: [4, 16, 12]
layers:
  0: [8, 32, 16]
  "2-4":
    gate: [2, 8, 4]
    up: [3, 9, 5]
  5: {down: [1, 2, 3]}
  3: [6, 20, 10]
"""


def test_yaml_plan_precedence(tmp_path):
    plan = load_plan(write(tmp_path, PLAN_YAML))
    # layer 0: whole-layer override beats the projection default.
    assert [plan.ranks_for(0, p) for p in PROJ] == [(8, 32, 16)] * 3
    # layer 1: nothing specific: default, and the per-projection default for down.
    assert [plan.ranks_for(1, p) for p in PROJ] == [(4, 16, 8), (4, 16, 8), (4, 16, 12)]
    # layers 2 and 4 (from the range): layer+projection entries, down falls back to projections.
    for layer in (2, 4):
        assert [plan.ranks_for(layer, p) for p in PROJ] == [(2, 8, 4), (3, 9, 5), (4, 16, 12)]
    # layer 3: in the range (gate, up) and a whole-layer entry (down): layer+projection wins.
    assert [plan.ranks_for(3, p) for p in PROJ] == [(2, 8, 4), (3, 9, 5), (6, 20, 10)]
    # layer 5: only down is overridden.
    assert [plan.ranks_for(5, p) for p in PROJ] == [(4, 16, 8), (4, 16, 8), (1, 2, 3)]
    assert plan.source == str(tmp_path / "plan.yaml")
    plan.check(tuple(range(6)), (8, 32, 16))


def test_plan_without_default_names_missing_entry(tmp_path):
    plan = load_plan(write(tmp_path, "layers:\n  0: [1, 2, 3]\n"))
    assert plan.ranks_for(0, "up") == (1, 2, 3)
    with pytest.raises(RankError, match="layer 1 up"):
        plan.ranks_for(1, "up")
    with pytest.raises(RankError, match="no ranks for layer 1"):
        plan.check((0, 1), (8, 32, 16))


def test_plan_check_rejects_stray_layers(tmp_path):
    plan = load_plan(write(tmp_path, "ranks: [2, 4, 4]\nlayers:\n  7: [1, 1, 1]\n"))
    with pytest.raises(RankError) as exc:
        plan.check((1, 2, 3), (8, 32, 16))
    assert "layer 7" in str(exc.value) and "1-3" in str(exc.value)
    # A stray layer+projection key is caught too; non-contiguous MoE layers are listed.
    plan = load_plan(write(tmp_path, "ranks: [2, 4, 4]\nlayers:\n  0: {gate: [1, 1, 1]}\n", "b.yaml"))
    with pytest.raises(RankError, match=r"layer 0.*1,3,5"):
        plan.check((1, 3, 5), (8, 32, 16))


def test_plan_check_validates_every_override(tmp_path):
    plan = load_plan(write(tmp_path, "ranks: [2, 4, 4]\nlayers:\n  1: {down: [2, 4, 40]}\n"))
    with pytest.raises(RankError, match=r"r_I=40 for layer 1 down.*intermediate size is 16"):
        plan.check((0, 1), (8, 32, 16))


@pytest.mark.parametrize(
    "text,match",
    [
        ("ranks: [1, 2]\n", "malformed"),
        ("ranks: [1, 2, 3]\nfoo: 1\n", "unknown key 'foo'"),
        ("ranks: [1, 2, 3]\nprojections:\n  middle: [1, 1, 1]\n", "projection 'middle'"),
        ("ranks: [1, 2, 3]\nlayers:\n  0: {gat: [1, 1, 1]}\n", "projection 'gat' in layer 0"),
        ("ranks: [1, 2, 3]\nlayers:\n  \"7-3\": [1, 1, 1]\n", "7-3"),
        ("ranks: [1, 2, 3]\nlayers:\n  first: [1, 1, 1]\n", "first"),
        ("ranks: [1, 2, 3]\nlayers:\n  0: [1, x, 1]\n", "r_H"),
        ("- 1\n- 2\n", "mapping"),
        ("ranks: [1, 2, 3\n", "not valid YAML"),
    ],
)
def test_bad_yaml_plans(tmp_path, text, match):
    with pytest.raises(RankError, match=match) as exc:
        load_plan(write(tmp_path, text))
    assert "\n" not in str(exc.value)


def test_missing_plan_file(tmp_path):
    with pytest.raises(RankError, match="does not exist"):
        load_plan(tmp_path / "nope.yaml")


def test_invalid_yaml_reports_line(tmp_path):
    # A tab used for indentation on line 3: PyYAML itself places the problem there.
    with pytest.raises(RankError, match="at line 3;"):
        load_plan(write(tmp_path, "ranks: [1, 2, 3]\nlayers:\n\t0: [1, 1, 1]\n"))


def _all_ranks(plan: RankPlan, layers=range(8)):
    return {(layer, p): plan.ranks_for(layer, p) for layer in layers for p in PROJ}


def test_save_load_round_trip(tmp_path):
    plan = load_plan(write(tmp_path, PLAN_YAML))
    out = tmp_path / "saved.yaml"
    save_plan(plan, out, header="made by a test\nsecond line")
    text = out.read_text()
    assert text.startswith("# made by a test\n# second line\n")
    again = load_plan(out)
    assert _all_ranks(again) == _all_ranks(plan)
    assert again.to_dict() == plan.to_dict()
    # and a second round trip is a fixed point
    save_plan(again, tmp_path / "again.yaml")
    assert load_plan(tmp_path / "again.yaml").to_dict() == plan.to_dict()


def test_round_trip_of_programmatic_plan(tmp_path):
    plan = RankPlan(
        default=(2, 3, 4),
        projections={"up": (1, 1, 1)},
        layers={1: (5, 6, 7)},
        layer_projections={(1, "down"): (7, 7, 7), (4, "gate"): (2, 2, 2)},
    )
    save_plan(plan, tmp_path / "p.yaml")
    assert _all_ranks(load_plan(tmp_path / "p.yaml")) == _all_ranks(plan)
    assert _all_ranks(plan_from_dict(plan.to_dict(), "dict")) == _all_ranks(plan)


def test_uniform_plan():
    for spec in ("3,4,5", (3, 4, 5)):
        plan = uniform_plan(spec)
        assert _all_ranks(plan, range(3)) == {(layer, p): (3, 4, 5) for layer in range(3) for p in PROJ}
        assert plan.to_dict() == {"ranks": [3, 4, 5]}


# ---------------------------------------------------------------- shipped configs


def test_qwen3_30b_a3b_config_validates():
    path = REPO / "configs" / "qwen3-30b-a3b.yaml"
    plan = load_plan(path)
    plan.check(QWEN3_30B_LAYERS, QWEN3_30B_SHAPE)
    for layer in QWEN3_30B_LAYERS:
        for p in PROJ:
            r = plan.ranks_for(layer, p)
            assert all(1 <= v <= d for v, d in zip(r, QWEN3_30B_SHAPE))
            # A compression config: the Tucker factors must be smaller than the dense tensor.
            E, H, I = QWEN3_30B_SHAPE
            assert E * r[0] + H * r[1] + I * r[2] + r[0] * r[1] * r[2] < E * H * I


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Each shipped config gives ranks, or (configs/method.yaml) the documented method defaults."""
    plan = load_plan(path)
    if path.name == "method.yaml":
        assert plan.empty
        assert load_method(path) == Method()  # the file documents the defaults
    else:
        assert plan.to_dict(), f"{path} defines no ranks"
        assert load_method(path) == Method()


def test_method_section(tmp_path):
    path = write(tmp_path, "ranks: [2, 3, 4]\nmethod:\n  whitening: pooled\n  damp: 0.5\n  iters: 2\n")
    assert load_plan(path).default == (2, 3, 4)
    m = load_method(path)
    assert (m.whitening, m.damp, m.iters, m.als_iters) == ("pooled", 0.5, 2, Method().als_iters)
    opts = m.whiten_options()
    assert (opts.method, opts.damp) == ("pooled", 0.5)
    assert load_method(None) == Method()


@pytest.mark.parametrize("body, match", [
    ("method:\n  damp: 0\n", "method.damp 0 must be a positive"),
    ("method:\n  alloc_damp: -1\n", "method.alloc_damp -1 must be a positive"),
    ("method:\n  whitening: both\n", "method.whitening 'both'"),
    ("method:\n  als_iters: -1\n", "method.als_iters -1"),
    ("method:\n  iters: -2\n", "method.iters -2"),
    ("method:\n  whitening: pooled\n  expert_hidden: true\n", "expert_hidden needs"),
    ("method:\n  damping: 1\n", "'damping' is unknown"),
    ("method: [1, 2]\n", "must be a mapping"),
])
def test_method_section_errors(tmp_path, body, match):
    path = write(tmp_path, body)
    with pytest.raises(TuckerizeError, match=match) as info:
        load_method(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_save_plan_is_inline_atomic_and_creates_its_folder(tmp_path):
    plan = load_plan(write(tmp_path, PLAN_YAML))
    out = tmp_path / "new" / "deeper" / "plan.yaml"
    save_plan(plan, out)
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["plan.yaml"]  # no temporary file left
    assert "ranks: [" in out.read_text()  # triples inline, as the shipped configs
