"""Hub model ids (`--model-id org/name`, `--revision`, `--huggingface-hub-cache`, HF_TOKEN,
HF_HUB_OFFLINE) through the real launcher and huggingface_hub's real client, against a local
server that plays the hub (fake_hub.py) serving tiny random-weight models made here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import requests
import torch

from conftest import LAUNCHER, ROOT, Server, free_port
from fake_hub import FakeHub, Repo, repo_from_dir


def _tiny(path, model_dir, seed: int, layers: int = 2, arch: str | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, path / f)
    if arch:
        c = json.loads((path / "config.json").read_text())
        c["architectures"] = [arch]
        (path / "config.json").write_text(json.dumps(c))
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("hub")
    main = _tiny(root / "main", model_dir, seed=0)
    v2 = _tiny(root / "v2", model_dir, seed=1, layers=3)
    gpt2 = _tiny(root / "gpt2", model_dir, seed=0, arch="GPT2LMHeadModel")
    files = repo_from_dir(main)["main"]
    no_st = {k: v for k, v in files.items() if not k.endswith(".safetensors")} | {"pytorch_model.bin": b"\0" * 64}
    no_tok = {k: v for k, v in files.items() if k != "tokenizer.json"}
    fake = FakeHub({
        "org/tiny": Repo(repo_from_dir(main, v2=v2)),
        "org/gated": Repo(repo_from_dir(main), gated_token="hf_secret"),
        "org/gpt2": Repo(repo_from_dir(gpt2)),
        "org/bin-only": Repo({"main": no_st}),
        "org/no-tokenizer": Repo({"main": no_tok}),
    })
    fake.dirs = {"main": main, "v2": v2}
    yield fake
    fake.close()


def _env(hub, home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no token or cache of the machine's
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(home), **extra})
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"
    return env


def _launch(hub, home, *args, **env):
    """The launcher with a hub model that must fail before serving: its exit code and stderr."""
    r = subprocess.run([str(LAUNCHER), "--port", str(free_port()), "--shard-uds-path", f"/tmp/tessera-hub-{os.getpid()}",
                        *args], capture_output=True, text=True, timeout=300, env=_env(hub, home, **env))
    return r.returncode, r.stderr


def _prepare(hub, home, *args, **env):
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "text-generation-server"), "prepare-model", *args],
                       capture_output=True, text=True, timeout=300, env=_env(hub, home, **env))
    return r.returncode, r.stdout.strip(), r.stderr


def _greedy(model_dir, ids, n):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_a_hub_model_id_is_downloaded_into_the_hub_cache_and_served(hub, tmp_path):
    cache = tmp_path / "hub-cache"
    s = Server("--model-id", "org/tiny", "--huggingface-hub-cache", str(cache), "--max-input-tokens", "64",
               "--max-total-tokens", "128", env=_env(hub, tmp_path / "home"))
    try:
        s.wait_ready()
        prompt = "The capital of France is"
        r = requests.post(s.url("/generate"), json={"inputs": prompt, "parameters": {
            "max_new_tokens": 8, "details": True, "decoder_input_details": True}}, timeout=60)
        assert r.status_code == 200, r.text
        d = r.json()["details"]
        ids = [t["id"] for t in d["prefill"]]
        got = [t["id"] for t in d["tokens"]]
        assert got == _greedy(hub.dirs["main"], ids, len(got)), "the downloaded model differs from the one on the hub"
        assert requests.get(s.url("/v1/models"), timeout=10).json()["data"][0]["id"] == "org/tiny"
    finally:
        assert s.stop() == 0
    log = s.log_path.read_text()
    assert "downloading org/tiny@main: 1 safetensors files" in log and "downloaded org/tiny@main" in log, log[-3000:]
    snapshots = list((cache / "models--org--tiny" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "model.safetensors").is_file()
    assert not (tmp_path / "home" / "hub").exists(), "--huggingface-hub-cache must replace HF_HOME/hub"
    # Offline, from the cache: the hub is not asked again.
    before = len(hub.requests)
    code, out, err = _prepare(hub, tmp_path / "home", "org/tiny", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert code == 0 and out == str(snapshots[0]), err
    assert len(hub.requests) == before and "from the cache (offline)" in err


def test_revision_selects_the_branch(hub, tmp_path):
    code, out, err = _prepare(hub, tmp_path, "org/tiny", "--revision", "v2")
    assert code == 0, err
    assert json.loads(open(os.path.join(out, "config.json")).read())["num_hidden_layers"] == 3
    assert any("/api/models/org/tiny/revision/v2" in r for r in hub.requests)
    # The launcher passes --revision on.
    code, err = _launch(hub, tmp_path, "--model-id", "org/tiny", "--revision", "no-such-branch")
    assert code == 1 and "org/tiny@no-such-branch: the repository has no revision 'no-such-branch'" in err, err


@pytest.mark.parametrize("model, env, message", [
    ("org/nothing", {}, "org/nothing@main: no such model repository on"),
    ("org/gated", {}, "org/gated@main: the repository is gated: accept its terms on the hub, then set HF_TOKEN"),
    ("org/gated", {"HF_TOKEN": "hf_wrong"}, "the repository is gated"),
    ("org/bin-only", {}, "no safetensors weights in the repository (found ['pytorch_model.bin']); Tessera loads *.safetensors only"),
    ("org/no-tokenizer", {}, "no tokenizer.json in the repository"),
    ("org/gpt2", {}, "architecture 'GPT2LMHeadModel' is not supported (supported: Gemma2ForCausalLM, Gemma3ForCausalLM"),
    ("org/tiny", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set and the model is not in the cache"),
    ("org/tiny", {"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach http://127.0.0.1:9"),
    ("not a repo!", {}, "is neither a local directory nor a hub repository id"),
])
def test_hub_errors_stop_the_launcher_with_a_clear_message(hub, tmp_path, model, env, message):
    code, err = _launch(hub, tmp_path, "--model-id", model, **env)
    assert code == 1 and message in err, err
    assert "Traceback" not in err


def test_checks_come_before_any_weights_are_downloaded(hub, tmp_path):
    code, _, err = _prepare(hub, tmp_path, "org/gpt2")
    assert code == 1 and "not supported" in err
    assert hub.asked_for("org/gpt2/resolve/main/config.json")
    assert not any("org/gpt2" in r and r.split("?")[0].endswith(".safetensors") for r in hub.requests)


def test_a_gated_repository_downloads_with_hf_token(hub, tmp_path):
    code, out, err = _prepare(hub, tmp_path, "org/gated", HF_TOKEN="hf_secret")
    assert code == 0, err
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_revision_of_a_local_directory_is_refused(hub, tmp_path):
    code, err = _launch(hub, tmp_path, "--model-id", str(hub.dirs["main"]), "--revision", "v2")
    assert code == 1 and "--revision v2 applies to hub model ids" in err, err
