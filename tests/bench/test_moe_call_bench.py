"""bench/moe_call.py's timing: each call's own time, the state set before it left out."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def moe_call():
    sys.path.insert(0, str(BENCH))  # the bench imports its sibling runtime.py, as `python bench/moe_call.py` does
    try:
        spec = importlib.util.spec_from_file_location("bench_moe_call", BENCH / "moe_call.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_per_call_times_the_call_not_the_state(moe_call):
    """A 3 ms call measures about 3 ms in every state: the idle gap (2 ms) and the cache flush
    come before the clock starts; the flush writes its buffer each time."""
    flush = torch.zeros(1024)
    for state in moe_call.STATES:
        sec = moe_call.per_call(lambda: time.sleep(0.003), state, 5, flush)
        assert 0.003 <= sec < 0.0045, (state, sec)
    assert float(flush[0]) == 5.0  # the cold state's five flushes

