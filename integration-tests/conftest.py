"""Starts the real launcher (-> real shard + router) on the real default model and talks HTTP."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "target" / "release" / "text-generation-launcher"
LOGS = ROOT / "integration-tests" / "logs"
_count = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One launcher process and everything it starts."""

    def __init__(self, *args: str, uds: str | None = None, new_session: bool = False, env: dict | None = None):
        """`uds`: the shard socket prefix (default: one of its own); `new_session`: the launcher
        leads a process group of its own, as in a terminal, so that tests can signal the group;
        `env`: extra environment variables."""
        LOGS.mkdir(exist_ok=True)
        n = next(_count)
        self.port = free_port()
        self.uds = uds or f"/tmp/tessera-it-{os.getpid()}-{n}"
        self.log_path = LOGS / f"server-{n}.log"
        env = {**os.environ, **(env or {})}
        env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(LAUNCHER), "--port", str(self.port), "--hostname", "127.0.0.1", "--shard-uds-path", self.uds, *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=new_session,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> "Server":
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode}; see {self.log_path}:\n{self.tail()}")
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    def url(self, path: str) -> str:
        return self.base + path

    def shard_pid(self) -> int:
        out = subprocess.run(["pgrep", "-f", f"text-generation-server serve .*--uds-path={self.uds}"],
                             capture_output=True, text=True).stdout.split()
        assert out, "shard process not found"
        return int(out[0])

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class BackgroundStream:
    """Reads a /generate_stream response on a thread; `first` is set at the first event."""

    def __init__(self, server: Server, body: dict, headers: dict | None = None):
        self.events: list[dict] = []
        self.first = threading.Event()

        def read():
            with requests.post(server.url("/generate_stream"), json=body, headers=headers, stream=True, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith(b"data:"):
                        self.events.append(json.loads(line[5:]))
                        self.first.set()

        self.thread = threading.Thread(target=read)
        self.thread.start()


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_lora(model_dir: Path, out: Path, *, r: int = 8, alpha: float = 16, targets=ALL_PROJECTIONS, std: float = 0.02,
                seed: int = 0, rslora: bool = False) -> Path:
    """A peft adapter on the model with random non-zero B (std `std`, from `seed`), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora))
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def model_dir() -> Path:
    exe = shutil.which("text-generation-server", path=str(ROOT / ".venv" / "bin"))
    out = subprocess.run([exe, "prepare-model"], capture_output=True, text=True, check=True).stdout
    return Path(out.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def server():
    s = Server().wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def chat(tokenizer):
    def render(question: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)

    return render
