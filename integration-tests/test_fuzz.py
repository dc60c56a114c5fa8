"""Property-based fuzzing of every route from the served OpenAPI document (schemathesis):
no 5xx and no dropped connection, whatever the body."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import ROOT, Server

# Small limits keep each generated request short on a CPU.
FUZZ = ("--max-input-tokens", "32", "--max-total-tokens", "48", "--max-batch-prefill-tokens", "256",
        "--max-best-of", "2", "--max-stop-sequences", "2")


def test_openapi_fuzz_has_no_server_errors():
    s = Server(*FUZZ).wait_ready()
    try:
        exe = shutil.which("schemathesis", path=str(ROOT / ".venv" / "bin"))
        report = Path(s.log_path).with_suffix(".fuzz.txt")
        proc = subprocess.run(
            [exe, "run", s.url("/api-doc/openapi.json"), "--checks", "not_a_server_error", "--max-examples", "15",
             "--seed", "1", "--request-timeout", "120", "--suppress-health-check", "all"],
            capture_output=True, text=True, timeout=1500,
        )
        report.write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert requests_still_served(s)
    finally:
        s.stop()


def requests_still_served(s: Server) -> bool:
    import requests

    r = requests.post(s.url("/generate"), json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
    return r.status_code == 200
