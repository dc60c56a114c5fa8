"""A local HTTP server that plays the Hugging Face hub for huggingface_hub's client (HF_ENDPOINT):
model info with file sizes, file downloads by revision, and the hub's error answers (repository
not found, gated, revision not found). Tests point HF_ENDPOINT at it; nothing leaves the machine."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    revisions: dict[str, dict[str, bytes]]  # revision name -> file name -> content
    gated_token: str | None = None  # gated: only this bearer token may download files
    shas: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for rev, files in self.revisions.items():
            h = hashlib.sha1(rev.encode())
            for name in sorted(files):
                h.update(name.encode() + hashlib.sha256(files[name]).digest())
            self.shas[rev] = h.hexdigest()

    def at(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        for name, sha in self.shas.items():
            if rev in (name, sha):
                return sha, self.revisions[name]
        return None


def repo_from_dir(path: Path, **revisions: Path) -> dict[str, dict[str, bytes]]:
    """{"main": files of `path`, other revisions: files of their folders}."""
    out = {"main": {p.name: p.read_bytes() for p in Path(path).iterdir() if p.is_file()}}
    for rev, d in revisions.items():
        out[rev] = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    return out


class FakeHub:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.requests: list[str] = []  # "METHOD path" of every request, in order
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def asked_for(self, suffix: str) -> bool:
        return any(r.split("?")[0].endswith(suffix) for r in self.requests)

    def _find(self, parts: list[str]) -> tuple[str, Repo, list[str]] | None:
        for n in (2, 1):
            rid = "/".join(parts[:n])
            if rid in self.repos:
                return rid, self.repos[rid], parts[n:]
        return None

    def _answer(self, h: BaseHTTPRequestHandler, body: bool):
        url = urlparse(h.path)
        self.requests.append(f"{h.command} {h.path}")
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        found = self._find(parts[2:] if api else parts)
        if found is None:
            return _error(h, 401, "RepoNotFound", "Repository Not Found")
        rid, repo, rest = found
        if api:  # /api/models/{repo}[/revision/{rev}]
            rev = rest[1] if rest[:1] == ["revision"] and len(rest) > 1 else "main"
            got = repo.at(rev)
            if got is None:
                return _error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            sha, files = got
            info = {"_id": rid, "id": rid, "modelId": rid, "sha": sha, "private": False,
                    "gated": "manual" if repo.gated_token else False, "disabled": False, "downloads": 0,
                    "likes": 0, "tags": [], "library_name": "transformers",
                    "siblings": [{"rfilename": n, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()}
                                 for n, b in sorted(files.items())]}
            return _send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if len(rest) < 3 or rest[0] != "resolve":  # /{repo}/resolve/{rev}/{file}
            return _error(h, 404, "EntryNotFound", "Entry not found")
        got = repo.at(rest[1])
        if got is None:
            return _error(h, 404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
        sha, files = got
        if repo.gated_token and h.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            return _error(h, 403, "GatedRepo", f"Access to model {rid} is restricted and you are not in the authorized list.")
        name = "/".join(rest[2:])
        if name not in files:
            return _error(h, 404, "EntryNotFound", f"{name} does not exist on {rest[1]}")
        data = files[name]
        etag = hashlib.sha256(data).hexdigest()
        return _send(h, 200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": sha,
                                    "Content-Type": "application/octet-stream"}, body)


def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str):
    _send(h, status, json.dumps({"error": message}).encode(),
          {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}, h.command != "HEAD")


def _send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict, body: bool):
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if body:
        h.wfile.write(data)
