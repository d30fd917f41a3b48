"""File-system helpers: what a killed atomic write leaves behind, and what a resume sweeps away."""

from __future__ import annotations

import os
import tempfile

from engine.fsutil import atomic_write_bytes, remove_partial_writes


def test_remove_partial_writes_takes_only_what_atomic_writes_leave(tmp_path):
    (tmp_path / "report").mkdir()
    # The very names atomic_write_bytes's mkstemp gives, as a SIGKILL before the rename leaves them.
    for folder, name in ((tmp_path, "state.json"), (tmp_path / "report", "original_0.png")):
        fd, _ = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
    kept = ["notes.tmp", ".state.json.tmp", "report/.original_0.png.toolong99.tmp", "report/drift.png"]
    for rel in kept:
        (tmp_path / rel).write_bytes(b"x")
    atomic_write_bytes(tmp_path / "state.json", b"{}")  # a completed atomic write leaves nothing behind

    removed = remove_partial_writes(tmp_path)

    assert len(removed) == 2
    assert removed[0].startswith(".state.json.") and removed[1].startswith("report/.original_0.png.")
    remaining = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert remaining == sorted(kept + ["state.json"])
