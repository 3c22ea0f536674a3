"""Constants and helpers shared by the calibration tests (tests/calibration/)."""

from __future__ import annotations

import torch

from tuckerize.calibration.weights import WhitenOptions
from tuckerize.demo import demo_path

DEMO = demo_path()
SAMPLES, SEQLEN = 8, 64
UNIFORM = (16, 100, 50)  # demo (E, H, I) = (16, 128, 64); about 75% of the expert parameters
POOLED = WhitenOptions(method="pooled")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def cli(*args: str):
    """``tuckerize decompose ARGS`` run in this process (typer's runner; stdout and stderr apart)."""
    from typer.testing import CliRunner

    from tuckerize.cli import app

    return CliRunner().invoke(app, ["decompose", *args])
