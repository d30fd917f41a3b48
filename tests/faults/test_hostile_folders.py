"""Folders no job folder is, dropped into a running daemon's inbox: a tree nested deeper than
Python's recursion limit, a folder that is a mount point, names of copies in progress, an empty
photo. Each is refused once with a clear code and its files kept byte for byte; the daemon goes
on."""

from __future__ import annotations

import os
import time

from daemon.status import daemon_status, format_daemon_status
from tests.harness.lab import FAST_JOB, drop_job, photo_bytes
from tests.harness.faults import check_evidence, drops_of, tmpfs

DEPTH = 600  # levels of folders: well past what os.walk, copytree, rmtree and rglob manage by recursion


def test_deep_trees_mount_points_and_temporary_names_are_refused_once_and_kept(lab):
    lab.configure(scan_seconds=0.3)
    photo = photo_bytes()
    mounted = tmpfs(lab.inbox / "usb-stick", "8m")  # a job folder that is a mount point
    (mounted / "job.toml").write_text(FAST_JOB)
    (mounted / "photo.png").write_bytes(photo)
    (mounted / "READY").write_bytes(b"")
    dropped = {"usb-stick": drops_of(mounted)}
    daemon = lab.start()

    staging = lab.root / "staging"
    deep = drop_job(staging, "deep", photos={"photo.png": photo})
    path = str(deep / "scans")
    os.mkdir(path)
    for _ in range(DEPTH):
        path = os.path.join(path, "d")
        os.mkdir(path)
    with open(os.path.join(path, "note.txt"), "w") as handle:
        handle.write("at the bottom")
    dropped["deep"] = drops_of(deep)
    os.rename(deep, lab.inbox / "deep")
    empty = drop_job(lab.inbox, "empty", photos={"photo.png": b""})  # a copy that never wrote a byte
    dropped["empty"] = drops_of(empty)
    (lab.inbox / "frank.part").mkdir()  # a copy tool's name for a folder still on its way
    (lab.inbox / "frank.part" / "job.toml").write_text(FAST_JOB)
    (lab.inbox / "frank.part" / "READY").write_bytes(b"")
    dropped["frank.part"] = drops_of(lab.inbox / "frank.part")

    refused = daemon.wait_for("job_refused", 60, folder="usb-stick")
    assert refused["code"] == "mount_point"
    assert daemon.wait_for("job_ended", 60, folder="deep")["code"] == "too_deep"
    assert daemon.wait_for("job_ended", 60, folder="empty")["code"] == "empty_file"
    time.sleep(2.0)  # several more scans: the mount point is not refused again, the .part folder not claimed
    assert len(daemon.named("job_refused")) == 1 and not daemon.named("job_claimed", folder="frank.part")

    places = check_evidence(lab, dropped, twice={"usb-stick"})  # a mount is copied, never emptied: inbox and failed/
    assert places == {"usb-stick": ["failed", "inbox"], "deep": ["failed"], "empty": ["failed"], "frank.part": ["inbox"]}
    status = daemon_status(lab.inbox, lab.work, lab.outbox, lab.failed, stable_seconds=1.5)
    ignored = dict(status.ignored)
    assert ignored["frank.part"].startswith("temporary name") and ignored["usb-stick"].startswith("mount_point: refused once")
    assert "ignored  frank.part  (temporary name (.part/.tmp/~)" in format_daemon_status(status)
    assert daemon.terminate() == 0
