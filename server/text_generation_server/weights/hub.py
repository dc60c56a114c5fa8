"""Hub model ids: `org/name` (at `--revision`) downloaded through huggingface_hub into its cache
(HF_HOME / HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT as huggingface_hub reads them).

Only what serving needs is fetched: config.json, the tokenizer files and the safetensors weights
(those the index names, when there is one). Everything that can be refused is refused before any
weights are downloaded: a missing repository or revision, gated access, a repository without
safetensors or tokenizer.json, an architecture this server does not run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from text_generation_server.weights.loader import INDEX, indexed_files

log = logging.getLogger(__name__)

# A hub repository id: `name` or `org/name` (letters, digits, `-`, `_`, `.`).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")


class HubError(Exception):
    """The model cannot be served from the hub; the message says why and what to do."""


def is_repo_id(model_id: str) -> bool:
    return bool(_REPO_ID.match(model_id)) and ".." not in model_id


def download(repo_id: str, revision: str | None) -> Path:
    """The local snapshot directory of `repo_id` at `revision`, downloading what is missing."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # ours are log lines (see _Progress)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import constants

    where = f"{repo_id}@{revision or 'main'}"
    if constants.HF_HUB_OFFLINE:
        return _from_cache(repo_id, revision, where)
    from huggingface_hub import HfApi, errors

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except errors.RevisionNotFoundError as e:
        raise HubError(f"{where}: the repository has no revision {revision!r}") from e
    except errors.GatedRepoError as e:  # before RepositoryNotFoundError: it is one
        raise HubError(_gated(where)) from e
    except errors.RepositoryNotFoundError as e:
        raise HubError(f"{where}: no such model repository on {constants.ENDPOINT} (or it is private: "
                       f"set HF_TOKEN to a token that can read it)") from e
    except errors.HfHubHTTPError as e:
        raise HubError(f"{where}: the hub answered {e}") from e
    except Exception as e:  # the HTTP client's own: connection refused, DNS, timeouts
        raise HubError(f"{where}: cannot reach {constants.ENDPOINT}: {type(e).__name__}: {e} "
                       f"(HF_HUB_OFFLINE=1 serves from the cache)") from e
    sizes = {s.rfilename: (s.size or 0) for s in info.siblings or []}
    weights = sorted(f for f in sizes if f.endswith(".safetensors") and "/" not in f)
    if not weights:
        bins = sorted(f for f in sizes if f.endswith((".bin", ".pt", ".pth", ".gguf")))
        raise HubError(f"{where}: no safetensors weights in the repository (found {bins or sorted(sizes)[:10]}); "
                       f"Tessera loads *.safetensors only")
    if "tokenizer.json" not in sizes:
        raise HubError(f"{where}: no tokenizer.json in the repository; Tessera needs the fast tokenizer file")
    # config.json at the revision as named (which records the branch -> commit ref that offline
    # mode reads), the rest at the commit it came from.
    config = _Fetch(repo_id, revision, where).one("config.json", sizes)
    fetch = _Fetch(repo_id, config.parent.name, where)
    _check_config(config, where)
    for name in _TOKENIZER:
        if name in sizes:
            fetch.one(name, sizes)
    if INDEX in sizes:
        index = json.loads(fetch.one(INDEX, sizes).read_text())
        weights = indexed_files(index)
        missing = [w for w in weights if w not in sizes]
        if missing:
            raise HubError(f"{where}: {INDEX} names files the repository lacks: {missing}")
    total = sum(sizes[w] for w in weights)
    log.info("downloading %s: %d safetensors files, %.1f MB", where, len(weights), total / 1e6)
    t0 = time.perf_counter()
    with _Progress(config.parent.parent.parent / "blobs", total, where):
        for w in weights:
            fetch.one(w, sizes)
    log.info("downloaded %s into %s in %.1fs", where, config.parent, time.perf_counter() - t0)
    return config.parent


def _gated(where: str) -> str:
    return (f"{where}: the repository is gated: accept its terms on the hub, then set HF_TOKEN to a token "
            f"of that account")


class _Fetch:
    """hf_hub_download of one file at the pinned commit, its errors made plain."""

    def __init__(self, repo_id: str, commit: str | None, where: str):
        self.repo_id, self.commit, self.where = repo_id, commit, where

    def one(self, name: str, sizes: dict[str, int]) -> Path:
        from huggingface_hub import errors, hf_hub_download

        try:
            return Path(hf_hub_download(self.repo_id, name, revision=self.commit))
        except errors.GatedRepoError as e:
            raise HubError(_gated(self.where)) from e
        except errors.HfHubHTTPError as e:
            raise HubError(f"{self.where}: downloading {name} ({sizes.get(name, 0) / 1e6:.1f} MB) failed: {e}") from e
        except Exception as e:  # the HTTP client's own: connection lost, timeouts
            raise HubError(f"{self.where}: downloading {name} failed: {type(e).__name__}: {e}") from e


def _check_config(config: Path, where: str) -> None:
    """Refuses an architecture or config this server cannot run, before the weights come."""
    from text_generation_server.models import REGISTRY
    from text_generation_server.models.config import ConfigError, ModelConfig

    try:
        cfg = ModelConfig.from_dir(config.parent)
    except ConfigError as e:
        raise HubError(f"{where}: {e}") from e
    if cfg.architecture not in REGISTRY:
        raise HubError(f"{where}: architecture {cfg.architecture!r} is not supported "
                       f"(supported: {', '.join(sorted(REGISTRY))})")


def _from_cache(repo_id: str, revision: str | None, where: str) -> Path:
    from huggingface_hub import constants, errors, hf_hub_download

    try:
        config = Path(hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=True))
    except (errors.LocalEntryNotFoundError, errors.EntryNotFoundError, OSError) as e:
        raise HubError(f"{where}: HF_HUB_OFFLINE is set and the model is not in the cache {constants.HF_HUB_CACHE} "
                       f"(download it once with the hub reachable)") from e
    snap = config.parent
    _check_config(config, where)
    index = snap / INDEX
    weights = (indexed_files(json.loads(index.read_text())) if index.is_file()
               else [p.name for p in snap.glob("*.safetensors")])
    missing = [w for w in ["tokenizer.json", *weights] if not (snap / w).is_file()] or ([] if weights else ["*.safetensors"])
    if missing:
        raise HubError(f"{where}: HF_HUB_OFFLINE is set and the cached snapshot {snap} lacks {missing}")
    log.info("serving %s from the cache (offline): %s", where, snap)
    return snap


class _Progress:
    """Logs the bytes downloaded so far every few seconds (the blobs folder grows as files come)."""

    def __init__(self, blobs: Path, total: int, where: str, every: float = 5.0):
        self.blobs, self.total, self.where, self.every = blobs, total, where, every
        self.done = threading.Event()

    def _size(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.blobs.iterdir() if p.is_file())
        except OSError:
            return 0

    def _run(self) -> None:
        while not self.done.wait(self.every):
            got = max(self._size() - self.start, 0)
            pct = 100 * got / self.total if self.total else 0
            log.info("downloading %s: %.1f of %.1f MB (%.0f%%)", self.where, got / 1e6, self.total / 1e6, pct)

    def __enter__(self):
        self.start = self._size()  # before any file comes, not when the thread first runs
        self.thread = threading.Thread(target=self._run, name="download-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
