"""Hub helpers that need no hub (the downloads are tested against a fake hub in integration-tests/test_hub.py)."""

import logging
import time

from text_generation_server.weights import hub


def test_repo_ids():
    for ok in ("gpt2", "org/name", "HuggingFaceTB/SmolLM2-135M-Instruct", "a.b/c_d-1.5"):
        assert hub.is_repo_id(ok), ok
    for bad in ("", "/abs/path", "a/b/c", "org/..", "../x", "org/na me", "-org/x", "org/"):
        assert not hub.is_repo_id(bad), bad


def test_progress_logs_bytes_as_the_blobs_folder_grows(tmp_path, caplog):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "old").write_bytes(b"x" * 100)  # there before: not counted
    with caplog.at_level(logging.INFO, logger=hub.__name__):
        with hub._Progress(blobs, 2_000_000, "org/m@main", every=0.05):
            (blobs / "abc.incomplete").write_bytes(b"x" * 1_000_000)
            time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records]
    assert "downloading org/m@main: 1.0 of 2.0 MB (50%)" in lines, lines
