"""Calibration: from a text to the statistics that weight the decomposition.

One module per concern (each says what it owns):

``tokens``   text -> calibration windows ``[samples, seqlen]`` (the text itself is read by
             :mod:`tuckerize.text`, shared with ``eval``)
``stats``    what is accumulated per MoE layer (:class:`LayerStats`, float64) and why
``collect``  running the model layer by layer to fill them (:func:`collect_statistics`)
             and the per-expert accumulation of ``method.refit`` (:class:`RefitCollector`)
``store``    the statistics on disk and what they depend on (:class:`CalibrationStats`,
             :class:`CalibrationSettings`, the streaming safetensors writer)
``weights``  statistics -> weights of the decomposition (:class:`WhitenOptions`,
             :func:`mode_weights`, :func:`expert_weights`)

Floors (tests/test_layering.py): ``stats`` and ``store`` are formats, below the runtime (the
runtime's layout rule reads the routed-token counts of the file: :func:`store.expert_load`);
``tokens``, ``weights`` and ``collect`` sit above the runtime. The layer-by-layer runner is :mod:`tuckerize.runtime.layerwise`; the maths the statistics
feed is in :mod:`tuckerize.decompose` (``whiten``, ``expert_weighted``, ``refit``).
Import the submodules (this package imports nothing, so ``import tuckerize.calibration``
stays cheap).
"""
