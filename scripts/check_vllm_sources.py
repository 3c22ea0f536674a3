"""Check every vLLM name the plugin uses against each supported release's published sources.

    python scripts/check_vllm_sources.py                  # the releases SUPPORTED_VLLM and the Makefile name
    python scripts/check_vllm_sources.py --release vllm==0.34.1 --cache ~/wheels

For each release it gets the wheel (``pip download --no-deps`` into ``--cache``, 240-340 MB
each; a wheel already there is reused), reads its Python sources from the zip without
importing anything (``tuckerize.integrations.vllm.api_check``), resolves each use the
plugin's source makes of vLLM (``tuckerize.integrations.vllm.api_uses``) and writes
``tuckerize/integrations/vllm/checked_api.json``: per release, the wheel's name and sha256,
each use with its status and the definitions it resolved to (file:line, signature), the
sha256 of every source file read, and of the model and collective files the plugin depends
on. ``tests/vllm_plugin/test_vllm_sources.py`` fails when the plugin uses a name this record
lacks or the supported range names a release it does not hold. Exit code 1 when any use
does not hold in a release (the record is written anyway, to read what broke).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuckerize.checkpoint import sha256_file  # noqa: E402
from tuckerize.integrations.vllm import SUPPORTED_VLLM  # noqa: E402
from tuckerize.integrations.vllm.api_check import SourceTree, check_release  # noqa: E402
from tuckerize.integrations.vllm.api_uses import plugin_uses  # noqa: E402

RECORD = ROOT / "tuckerize" / "integrations" / "vllm" / "checked_api.json"
#: Files whose identity across releases the record shows (what the plugin builds on).
WATCHED = [f"vllm/model_executor/models/{m}.py" for m in
           ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "qwen3_next", "deepseek_v2")] + [
    "vllm/distributed/communication_op.py", "vllm/utils/torch_utils.py",
    "vllm/model_executor/layers/fused_moe/runner/moe_runner.py", "vllm/config/compilation.py"]


def makefile_release() -> str:
    """The vLLM build CI installs (the Makefile's ``VLLM ?=`` line)."""
    match = re.search(r"^VLLM \?= *(\S+)", (ROOT / "Makefile").read_text(), re.M)
    if match is None:
        raise SystemExit("Makefile has no `VLLM ?= ...` line")
    return match.group(1)


def default_releases() -> list[str]:
    return [makefile_release()] + [f"vllm=={series}.0" for series in SUPPORTED_VLLM]


def wheel_for(spec: str, cache: Path) -> Path:
    """The release's wheel in ``cache``, downloaded there first if absent."""
    name, _, version = spec.partition("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {spec} into {cache} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.12", spec, "-d", str(cache)],
                       check=True)
        found = sorted(cache.glob(pattern))
    if not found:
        raise SystemExit(f"pip downloaded no wheel matching {pattern} into {cache}")
    return found[-1]


def check(spec: str, wheel: Path, uses: list[str]) -> dict:
    tree = SourceTree.from_wheel(wheel)
    results = check_release(tree, uses)
    defs: dict[str, dict] = {}
    for result in results.values():
        names = []
        for entry in result.pop("defs"):
            defs.setdefault(entry["name"], {k: v for k, v in entry.items() if k != "name"})
            names.append(entry["name"])
        result["defs"] = names
    for rel in WATCHED:
        tree.module(rel[:-3].replace("/", "."))
    return {"wheel": wheel.name, "sha256": sha256_file(wheel), "results": results, "definitions": defs,
            "files": dict(sorted(tree.used.items()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", action="append", help="pip requirement, e.g. vllm==0.34.0 (repeatable)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tuckerize" / "vllm-wheels")
    parser.add_argument("--out", type=Path, default=RECORD)
    args = parser.parse_args(argv)
    uses = plugin_uses()
    record = {"about": "written by scripts/check_vllm_sources.py; checked by tests/vllm_plugin/test_vllm_sources.py",
              "supported": list(SUPPORTED_VLLM), "uses": uses, "releases": {}}
    failed = []
    for spec in args.release or default_releases():
        entry = check(spec, wheel_for(spec, args.cache), uses)
        record["releases"][spec] = entry
        for use, result in entry["results"].items():
            if result["status"] not in ("ok", "unavailable"):
                failed.append(f"{spec}: {result['status']}: {use}: {result.get('note', '')}")
            elif result["status"] == "unavailable":
                print(f"{spec}: unavailable: {use}: {result['note']}", file=sys.stderr)
        print(f"{spec}: {sum(r['status'] == 'ok' for r in entry['results'].values())}/{len(uses)} uses hold "
              f"({entry['wheel']}, sha256 {entry['sha256'][:12]}...)", file=sys.stderr)
    args.out.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    print(f"written to {args.out}", file=sys.stderr)
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
