"""Checkpoint to Tucker checkpoint, one decoder layer at a time (``tuckerize decompose``).

:func:`decompose_checkpoint` is the public call. Peak memory is one stacked projection
(``E*H*I`` float32) plus its decomposition workspace and one layer's non-expert tensors;
it does not grow with the number of layers.

One concept per module:

* :mod:`~tuckerize.compress.request`: the request (ranks, calibration, weighting, output),
  validated once; the default output path; the factors' storage.
* :mod:`~tuckerize.compress.method`: the research settings (the config's ``method:``).
* :mod:`~tuckerize.compress.source`: the source model and its output units.
* :mod:`~tuckerize.compress.output`: the output folder: claim, lock, cleanup, journal,
  resume, ``--overwrite``.
* :mod:`~tuckerize.compress.statistics`: calibration statistics, reused or collected.
* :mod:`~tuckerize.compress.allocation`: ranks allocated to a budget.
* :mod:`~tuckerize.compress.bytes_plan`: stored forms chosen for a byte budget (``--bytes``);
  :mod:`~tuckerize.compress.forms` each form's candidates and computation;
  :mod:`~tuckerize.compress.form_stage` the layer stage that writes them.
* :mod:`~tuckerize.compress.stages`: the per-layer stages and the decomposition strategy.
* :mod:`~tuckerize.compress.manifest`: the manifest and config section, pure.
* :mod:`~tuckerize.compress.run`: the run, step by step.

Resuming: after each output file is renamed into place, the journal records its sha256
together with a fingerprint of the run (source files, ranks, settings). A rerun with the
same fingerprint keeps every file whose checksum still matches; the manifest is written
last and marks the folder complete.
"""

from tuckerize.compress.method import DEFAULT_ITERS, Method, load_method
from tuckerize.compress.output import CALIBRATION_FILES, PLAN_NAME, OutputFolder
from tuckerize.compress.request import DecomposeRequest, default_out, model_stem
from tuckerize.compress.run import decompose_checkpoint, run

__all__ = [
    "decompose_checkpoint", "run", "DecomposeRequest", "Method", "load_method", "OutputFolder", "default_out",
    "model_stem", "DEFAULT_ITERS", "CALIBRATION_FILES", "PLAN_NAME",
]
