"""The comparison bench behind ``bench/compare.py``: Tucker against what users pick instead.

Modules: :mod:`protocol` (models, text splits, constants), :mod:`scoring` (the product's
evaluation on the selection / report splits; the calibration statistics the structural
baselines need), :mod:`dense` (the dense source checkpoint; pruning, merging, per-expert SVD),
:mod:`quantisers` (round-to-nearest and the byte count of every scalar-quantised form),
:mod:`external` (GPTQ / AWQ by llmcompressor and HQQ, each run in its own virtual environment),
:mod:`tucker` (the tuckerize rows: the one function that builds the product's request for a
byte budget), :mod:`issue11` (the equal-budget table of issue 11), :mod:`frontier` (the bytes
frontier of issue 23 and its "equal or fewer bytes" test) and :mod:`report` (tables and plots
from saved result files).
"""
