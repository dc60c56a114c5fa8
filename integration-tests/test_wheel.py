"""The pip package: maturin builds the wheel (both Rust binaries + the shard's package), it
installs into a fresh venv, and the launcher from that venv serves the default model.

The fresh venv reuses the project venv's third-party packages (torch alone is ~3 GB with its CUDA
libraries) through a path entry, so that pip resolves the wheel's dependencies against them
without the network. Only third-party packages come from there: a path entry does not run the
project venv's .pth files, so its editable shard install stays out, and everything of Tessera's
comes from the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import requests

from conftest import LOGS, ROOT, free_port


def _run(*cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def test_the_wheel_installs_into_a_fresh_venv_and_serves(tmp_path):
    _run(ROOT / ".venv" / "bin" / "maturin", "build", "--release", "--out", tmp_path / "dist", cwd=ROOT)
    wheels = list((tmp_path / "dist").glob("tessera-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    site = _run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    with open(os.path.join(site, "_tessera_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # the project venv's: appended after the fresh one's
    _run(py, "-m", "pip", "install", "--no-index", wheels[0])  # every dependency must already be satisfied

    for exe in ("text-generation-launcher", "text-generation-router", "text-generation-server"):
        assert (venv / "bin" / exe).is_file(), exe
    assert (venv / "bin" / "text-generation-server").read_text().startswith(f"#!{py}")
    where = _run(py, "-c", "import text_generation_server.pb.generate_pb2 as m; print(m.__file__)")
    assert where.startswith(site), f"the shard package must come from the wheel: {where}"

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"  # no project venv, no target/
    port, log = free_port(), LOGS / "wheel-server.log"
    LOGS.mkdir(exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(["text-generation-launcher", "--port", str(port), "--hostname", "127.0.0.1",
                                 "--shard-uds-path", str(tmp_path / "uds"), "--max-input-tokens", "64",
                                 "--max-total-tokens", "128"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            subprocess.run(["sleep", "0.5"])
        r = requests.post(base + "/generate", json={"inputs": "The capital of France is", "parameters": {
            "max_new_tokens": 4, "details": True}}, timeout=60)
        assert r.status_code == 200 and r.json()["details"]["generated_tokens"] >= 1, r.text
        shard = subprocess.run(["pgrep", "-af", f"serve .*--uds-path={tmp_path / 'uds'}"], capture_output=True, text=True).stdout
        assert f"{py} {venv / 'bin' / 'text-generation-server'} serve" in shard, shard
    finally:
        proc.terminate()
        assert proc.wait(timeout=90) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "loading weights:" in text and "warmup" in text, text[-3000:]
