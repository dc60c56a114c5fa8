"""The deployment pieces: the Dockerfile (hadolint; its runtime stages' entrypoint, environment and
health check run outside a container, as no container builder runs in CI) and the Helm chart
(rendered by helm, checked, and its container spec started as rendered: args, env, port, probes,
and a SIGTERM drain within the pod's grace period)."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import LAUNCHER, LOGS, ROOT, BackgroundStream, free_port

HELM = ROOT / ".cache" / "bin" / "helm"
CHART = ROOT / "deploy" / "tessera"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"


# ---- Dockerfile ----------------------------------------------------------------------------------

def _stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (keyword, rest), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            stages[current] = []
        elif current:
            stages[current].append((word.upper(), rest.strip()))
    return stages


def _env_of(instructions) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                env[k] = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), os.environ.get(m.group(1), "")), v)
    return env


def test_the_dockerfile_passes_hadolint():
    r = subprocess.run([str(HADOLINT), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_image_installs_with_the_recipe_make_uses():
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert list(stages)[-1] == "runtime" and "base-${VARIANT}" in (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cuda$", (ROOT / "Dockerfile").read_text(), re.M), "CUDA by default"
    for name, profile in (("python-cuda", "cuda"), ("python-cpu", "cpu")):
        runs = " ".join(rest for word, rest in stages[name] if word == "RUN")
        assert f"install-python.sh /opt/tessera {profile}" in runs, runs
    assert "scripts/install-python.sh $(VENV) dev" in (ROOT / "Makefile").read_text()
    builder = " ".join(rest for word, rest in stages["builder"] if word == "RUN")
    assert "cargo chef cook --release" in builder and "maturin build --release" in builder
    for name, python in (("base-cpu", "python-cpu"), ("base-cuda", "python-cuda")):
        assert ("COPY", f"--from={python} /opt/tessera /opt/tessera") in stages[name], name
    ins = stages["runtime"]
    assert ("ENTRYPOINT", '["text-generation-launcher"]') in ins
    assert ("VOLUME", "/data") in ins and _env_of(ins)["HF_HOME"] == "/data"
    user = [rest for word, rest in ins if word == "USER"]
    assert user and user[-1].isdigit() and user[-1] != "0", "the image must run as a numeric non-root user"
    assert any(word == "HEALTHCHECK" for word, _ in ins)


def test_the_image_entrypoint_serves_and_its_healthcheck_passes(tmp_path):
    """The runtime stage's entrypoint with the stage's environment, /data a folder here (the converted
    default model linked in, as a warm /data volume would hold it) and HOSTNAME as Docker sets it."""
    ins = _stages((ROOT / "Dockerfile").read_text())["runtime"]
    env_img = _env_of(ins)
    data = tmp_path / "data"
    data.mkdir()
    cache = Path(os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera")
    (data / "tessera").symlink_to(cache)
    env = {k: v.replace("/data", str(data)) for k, v in env_img.items() if k != "PATH"}
    port = free_port()
    env.update(PORT=str(port), HOSTNAME="127.0.0.1", SHARD_UDS_PATH=str(tmp_path / "uds"),
               PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", HOME=os.environ.get("HOME", "/root"))
    entry = json.loads(dict(ins)["ENTRYPOINT"])
    health = json.loads(dict(ins)["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert entry == ["text-generation-launcher"]
    log = LOGS / "docker-entrypoint.log"
    LOGS.mkdir(exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([str(LAUNCHER.parent / entry[0])], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        healthy = False
        for _ in range(300):
            assert proc.poll() is None, log.read_text()[-3000:]
            if subprocess.run(health, env=env, capture_output=True).returncode == 0:
                healthy = True
                break
            time.sleep(0.5)
        assert healthy, log.read_text()[-3000:]
        assert f"listening on http://127.0.0.1:{port}" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    assert subprocess.run(health, env=env, capture_output=True).returncode != 0, "the health check must fail when down"


# ---- Helm chart ----------------------------------------------------------------------------------

def _render(*sets: str) -> list[dict]:
    args = [str(HELM), "template", "t", str(CHART)]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _kind(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    return found[0] if found else None


def test_the_chart_lints():
    r = subprocess.run([str(HELM), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_chart_renders_what_a_gpu_deployment_needs():
    docs = _render("shards=2", "cache.persistence=true", "secrets.create=true", "secrets.apiKey=k",
                   "secrets.hfToken=hf_x", "model.id=org/name", "model.revision=v1", "env.MAX_BATCH_TOKENS=8192")
    dep = _kind(docs, "Deployment")
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["NUM_SHARD"]["value"] == "2" and c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert env["MODEL_ID"]["value"] == "org/name" and env["REVISION"]["value"] == "v1"
    assert env["MAX_BATCH_TOKENS"]["value"] == "8192"
    assert int(pod["spec"]["terminationGracePeriodSeconds"]) > int(env["SHUTDOWN_TIMEOUT"]["value"])
    secret = _kind(docs, "Secret")
    for key in ("API_KEY", "HF_TOKEN"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and key in secret["data"]
    assert base64.b64decode(secret["data"]["HF_TOKEN"]) == b"hf_x"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == _kind(docs, "PersistentVolumeClaim")["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"data": "/data", "shm": "/dev/shm"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["livenessProbe"]["httpGet"]["path"] == "/live"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    svc = _kind(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http" and svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_the_chart_on_cpu_asks_for_no_gpu_and_no_secret():
    docs = _render("gpu=false")
    c = _kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert not any(e["name"] in ("API_KEY", "HF_TOKEN") for e in c["env"])
    assert _kind(docs, "Secret") is None and _kind(docs, "PersistentVolumeClaim") is None


def _probe(base, spec) -> int:
    try:
        return requests.get(base + spec["httpGet"]["path"], timeout=spec.get("timeoutSeconds", 1) + 1).status_code
    except requests.ConnectionError:
        return 0


def test_the_rendered_container_starts_probes_and_drains(tmp_path):
    port = free_port()
    docs = _render(f"port={port}", "gpu=false", "shutdownTimeout=20", "secrets.create=true", "secrets.apiKey=k8s-key",
                   "env.MAX_INPUT_TOKENS=256", "env.MAX_TOTAL_TOKENS=512")
    pod = _kind(docs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    secret = {k: base64.b64decode(v).decode() for k, v in _kind(docs, "Secret")["data"].items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "API_KEY"))}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e["name"] in secret:  # secretKeyRef, optional
            env[e["name"]] = secret[e["name"]]
    # Not in the spec: where the venv is (the image's PATH) and a socket path of this test's own.
    env.update(PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", SHARD_UDS_PATH=str(tmp_path / "uds"))
    assert c["ports"][0]["containerPort"] == port
    base = f"http://127.0.0.1:{port}"
    log = LOGS / "helm-container.log"
    LOGS.mkdir(exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([str(LAUNCHER), *c["args"]], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        start = c["startupProbe"]
        assert _probe(base, start) != 200  # loading: not started yet
        deadline = time.time() + start["periodSeconds"] * start["failureThreshold"]
        while _probe(base, start) != 200:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert _probe(base, c["readinessProbe"]) == 200 and _probe(base, c["livenessProbe"]) == 200
        auth = {"Authorization": "Bearer k8s-key"}
        assert requests.get(base + "/info", headers=auth, timeout=10).status_code == 200
        assert requests.get(base + "/info", timeout=10).status_code == 401  # the secret's key is in force

        class Target:
            def url(self, path):
                return base + path

        bg = BackgroundStream(Target(), {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 80}}, auth)
        assert bg.first.wait(60)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert _probe(base, c["readinessProbe"]) == 503, "not ready while draining"
        assert _probe(base, c["livenessProbe"]) == 200, "live while draining"
        code = proc.wait(timeout=pod["terminationGracePeriodSeconds"])
        assert code == 0 and time.time() - sent < pod["terminationGracePeriodSeconds"]
        bg.thread.join(10)
        assert bg.events and bg.events[-1].get("generated_text") is not None, bg.events[-1:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
