"""Links and odd files inside a dropped folder: a photo or job.toml that links to /etc/passwd or
to another folder, a linked subfolder, loops, dangling links, named pipes, a job.toml that is
a folder. A link that leaves the job folder refuses the job (naming the link); nothing outside
the folder is ever read; a pipe never blocks; the failed/ copy holds the links as links.

The daemon's side of the same cases is in test_daemon_hostile.py."""

from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import JobError
from engine.images import png_bytes
from engine.job import JOB_FILE
from tests.harness.jobs import PREPARE_JOB
from tests.harness.strategies import JOB_CODES, check_error, check_failed_copy, load_or_refuse, tree_snapshot

LINKS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TINY_PNG = png_bytes(np.zeros((4, 4, 3), dtype=np.uint8))
GOOD_JOB = '[[render]]\nprompt = "x"\n'


@contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of hanging the run) if the code under test blocks, e.g. on a named pipe."""
    def fail(*_):
        raise AssertionError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# What an entry of the job folder can be. Targets "out:..." are outside the folder (absolute
# paths into another temporary folder, or /etc/passwd), "in:..." inside it.
ENTRY_KINDS = ["photo", "link_in_file", "link_in_dir", "link_out_file", "link_out_png", "link_out_dir", "link_passwd",
               "dangling_in", "dangling_out", "loop", "chain_out", "fifo", "subfolder_photo", "subfolder_link_out"]
entry_names = st.sampled_from(["a.png", "b.jpg", "c.webp", "notes.txt", "sub", "x.png", "photo.PNG"])
folders = st.fixed_dictionaries({
    "job": st.sampled_from(["file", "file", "link_out", "link_in", "link_passwd", "fifo", "folder", "missing"]),
    "entries": st.dictionaries(entry_names, st.sampled_from(ENTRY_KINDS), max_size=4),
})


def build(folder: Path, outside: Path, spec: dict) -> set[str]:
    """Make the folder; return the names of the links that leave it (the expected refusals)."""
    folder.mkdir()
    (outside / "job.toml").write_text(GOOD_JOB)
    (outside / "face.png").write_bytes(TINY_PNG)
    (outside / "dir").mkdir(exist_ok=True)
    (outside / "dir" / "a.png").write_bytes(TINY_PNG)
    (folder / "inside").mkdir()
    (folder / "inside" / "real.png").write_bytes(TINY_PNG)
    leaving: set[str] = set()
    job = folder / JOB_FILE
    if spec["job"] == "file":
        job.write_text(GOOD_JOB)
    elif spec["job"] == "link_out":
        job.symlink_to(outside / "job.toml")
    elif spec["job"] == "link_passwd":
        job.symlink_to("/etc/passwd")
    elif spec["job"] == "link_in":
        (folder / "inside" / "job.txt").write_text(GOOD_JOB)
        job.symlink_to("inside/job.txt")
    elif spec["job"] == "fifo":
        os.mkfifo(job)
    elif spec["job"] == "folder":
        job.mkdir()
    if spec["job"] in ("link_out", "link_passwd"):
        leaving.add(JOB_FILE)
    for name, kind in spec["entries"].items():
        path = folder / name
        if kind == "photo":
            path.write_bytes(TINY_PNG)
        elif kind == "link_in_file":
            path.symlink_to("inside/real.png")
        elif kind == "link_in_dir":
            path.symlink_to("inside")
        elif kind == "link_out_file":
            path.symlink_to(outside / "face.png")
        elif kind == "link_out_png":
            path.symlink_to(outside / "dir" / "a.png")
        elif kind == "link_out_dir":
            path.symlink_to(outside / "dir")
        elif kind == "link_passwd":
            path.symlink_to("/etc/passwd")
        elif kind == "dangling_in":
            path.symlink_to("inside/nothing.png")
        elif kind == "dangling_out":
            path.symlink_to(outside / "nothing.png")
        elif kind == "loop":
            path.symlink_to(name)
        elif kind == "chain_out":  # a link to a link inside, which leaves
            (folder / "inside" / f"hop-{name}").symlink_to(outside / "face.png")
            path.symlink_to(f"inside/hop-{name}")
            leaving.add(f"inside/hop-{name}")
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "subfolder_photo":
            path.mkdir()
            (path / "a.png").write_bytes(TINY_PNG)
        elif kind == "subfolder_link_out":
            path.mkdir()
            (path / "a.png").symlink_to(outside / "face.png")
            leaving.add(f"{name}/a.png")
        if kind in ("link_out_file", "link_out_png", "link_out_dir", "link_passwd", "dangling_out", "loop", "chain_out"):
            leaving.add(name)
    return leaving


@LINKS
@given(spec=folders)
def test_links_leaving_the_folder_refuse_the_job(spec):
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as other:
        folder, outside = Path(root) / "alice", Path(other)
        leaving = build(folder, outside, spec)
        before, outside_before = tree_snapshot(folder), tree_snapshot(outside)
        with no_hang():
            result = load_or_refuse(folder)
        assert tree_snapshot(folder) == before and tree_snapshot(outside) == outside_before
    if leaving:
        assert isinstance(result, JobError), f"links {sorted(leaving)} leave the folder, yet the job was loaded"
        named = {p.where for p in result.problems}
        assert leaving <= named, f"not named: {sorted(leaving - named)}"
        check_error(result, JOB_CODES, tuple(sorted(leaving)))
    elif spec["job"] in ("fifo", "folder", "missing"):
        assert isinstance(result, JobError)
        check_error(result, JOB_CODES, (JOB_FILE,))
    if not isinstance(result, JobError):
        for photo in result.photos:  # every photo resolves inside the folder (checked by load_or_refuse too)
            assert photo.resolve().is_relative_to(folder.resolve())


def _folder_with(tmp_path: Path, outside: Path, job: str = PREPARE_JOB) -> Path:
    source = tmp_path / "inbox" / "alice"
    source.mkdir(parents=True)
    (source / JOB_FILE).write_text(job, encoding="utf-8")
    return source


@pytest.mark.parametrize("case", ["photo_to_face_elsewhere", "photo_to_passwd", "job_to_job_elsewhere", "linked_subfolder",
                                  "unused_link_to_passwd", "pipe_beside_a_bad_job"])
def test_engine_refuses_and_keeps_the_links_as_links(tmp_path, fuzz_engine, face_rgb, case):
    outside = tmp_path / "elsewhere"
    (outside / "photos").mkdir(parents=True)
    (outside / "photos" / "face.png").write_bytes(png_bytes(face_rgb))  # a good photo: only the link is wrong
    (outside / "job.toml").write_text(PREPARE_JOB, encoding="utf-8")
    source = _folder_with(tmp_path, outside)
    named = {"photo_to_face_elsewhere": "a.png", "photo_to_passwd": "a.png", "job_to_job_elsewhere": JOB_FILE,
             "linked_subfolder": "photos", "unused_link_to_passwd": "notes.txt", "pipe_beside_a_bad_job": "a.png"}[case]
    if case == "photo_to_face_elsewhere":
        (source / "a.png").symlink_to(outside / "photos" / "face.png")
    elif case == "photo_to_passwd":
        (source / "a.png").symlink_to("/etc/passwd")
    elif case == "job_to_job_elsewhere":
        (source / JOB_FILE).unlink()
        (source / JOB_FILE).symlink_to(outside / "job.toml")
        (source / "a.png").write_bytes(png_bytes(face_rgb))
    elif case == "linked_subfolder":
        (source / "photos").symlink_to(outside / "photos")
        (source / JOB_FILE).write_text(PREPARE_JOB.replace("[prepare]", '[subject]\nphotos = ["photos/face.png"]\n\n[prepare]'))
    elif case == "unused_link_to_passwd":
        (source / "a.png").write_bytes(png_bytes(face_rgb))
        (source / "notes.txt").symlink_to("/etc/passwd")
    elif case == "pipe_beside_a_bad_job":
        os.mkfifo(source / "queue.png")  # not a photo: skipped; left out of the failed/ copy
        (source / "a.png").write_bytes(b"not an image")
    before, outside_before = tree_snapshot(source), tree_snapshot(outside)
    with no_hang():
        result = fuzz_engine.run_job(source, tmp_path / "outbox", until="prepare")
    assert tree_snapshot(source) == before and tree_snapshot(outside) == outside_before
    codes = {"unreadable_image"} if case == "pipe_beside_a_bad_job" else JOB_CODES
    error = check_failed_copy(result, before, codes, (named,))
    if case != "pipe_beside_a_bad_job":
        assert "outside the job folder" in error["message"] or any("outside the job folder" in p["reason"] for p in error["problems"])
    audit = (result.output_dir / "audit.jsonl").read_text(encoding="utf-8")
    assert "root:x:0:0" not in audit and "root:x:0:0" not in str(error), "the content of /etc/passwd was read"


def test_links_that_stay_inside_are_fine(tmp_path, fuzz_engine, face_rgb):
    source = _folder_with(tmp_path, tmp_path, PREPARE_JOB.replace("[prepare]", '[subject]\nphotos = ["current.png"]\n\n[prepare]'))
    (source / "originals").mkdir()
    (source / "originals" / "face.png").write_bytes(png_bytes(face_rgb))
    (source / "current.png").symlink_to("originals/face.png")
    with no_hang():
        result = fuzz_engine.run_job(source, tmp_path / "outbox", until="prepare")
    assert result.outcome == "partial", result.error
