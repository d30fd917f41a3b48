"""Job folders for tests: the fast job texts, the builders of a folder from photos, a pixel bomb,
and a finished job folder written by hand."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from engine.provenance.audit import AuditLog, write_manifest
from engine.fsutil import atomic_write_json, tree_listing
from engine.provenance.trust import UNSIGNED_FACTS, build_statement, signed_document

# A job that runs the whole chain on the tiny demo model in a few seconds.
FAST_JOB = """\
[prepare]
size = 128
rotations = [-10, 10]
crops = [0.8]

[train]
rank = 4
max_steps = 8
checkpoint_every = 4
plateau_window = 3
probe_every = 1
probe_size = 2

[[train.phases]]
name = "COARSE"
min_steps = 3
max_steps = 4

[[train.phases]]
name = "FINE"
lr = 1e-6
alpha = 2
loss = "charbonnier"
optimizer = "adamp"
min_steps = 3
max_steps = 4

[verify]
seeds = 2
batch_size = 2
steps = 2

[[render]]
prompt = "portrait in a garden"
steps = 2
"""


FAST_TRAIN = FAST_JOB.split("[verify]")[0]  # its [prepare] and [train]: for jobs of other kinds that train


def write_png(path: Path, rgb: np.ndarray) -> Path:
    from engine.images import png_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(rgb))
    return path


def make_job(folder: Path, photos: dict[str, np.ndarray | bytes], job_toml: str = FAST_JOB) -> Path:
    """A job folder with `photos` (arrays become PNGs, bytes are written as they are) and job.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in photos.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            write_png(folder / name, content)
    (folder / "job.toml").write_text(job_toml, encoding="utf-8")
    return folder


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to prove inputs are untouched)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# A job that stops early cheaply (the fuzz tests run it `until="prepare"`): one 64 px prepared
# image per photo, no background removal.
PREPARE_JOB = """\
[prepare]
size = 64
rotations = []
crops = []
remove_background = false

[[render]]
prompt = "portrait in a garden"
"""


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data: a pixel bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def fake_finished_job(folder: Path) -> Path:
    """A finished job folder written by hand (no pipeline): inputs, one output, an audit chain,
    its manifest and signature.json, unsigned: what the audit and CLI tests tamper with."""
    folder.mkdir()
    (folder / "inputs" / "notes").mkdir(parents=True)
    (folder / "inputs" / "a.jpg").write_bytes(b"a photo, as dropped")
    (folder / "inputs" / "notes" / "n.txt").write_text("a note beside it")
    (folder / "prepared").mkdir()
    (folder / "prepared" / "a.png").write_bytes(b"\x89PNG fake but fixed")
    (folder / "report.json").write_text('{"drift": 0.1}')
    inputs = tree_listing(folder / "inputs").entries
    audit = AuditLog(folder / "audit.jsonl", "job-1")
    audit.event("job_started", inputs=inputs, note="first")
    audit.event("stage_finished", stage="prepare", drift=0.125, values=[1, 2.5, None])
    digest = write_manifest(folder, "job-1", inputs, {}, demo=False, trust=UNSIGNED_FACTS, kind="replicate")
    audit.event("job_finished", manifest_sha256=digest)
    statement = build_statement(folder, where="outbox", path=f"{folder.parent.name}/{folder.name}", job_id=folder.name,
                                subject=folder.parent.name)
    atomic_write_json(folder / "signature.json", signed_document(statement, None))
    return folder
