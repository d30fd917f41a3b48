"""Readiness of inbox folders (stable for stable_seconds, or a READY marker) and the choice of
watchdog observer. The clock is passed in, so no test sleeps for stability."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from watchdog.observers.polling import PollingObserver

from daemon.watch import InboxWatcher, Readiness, Waker, folder_signature, list_inbox, observer_class

STABLE = 5.0


def _drop(inbox: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = inbox / name
    folder.mkdir(parents=True, exist_ok=True)
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return folder


def _ready(readiness: Readiness) -> list[str]:
    return [f.name for f in readiness.ready_in_arrival_order()]


def test_job_folder_is_ready_only_after_stable_seconds_without_change(tmp_path):
    _drop(tmp_path, "alice", {"photo.jpg": b"x" * 100, "job.toml": b"[[render]]\n"})
    readiness = Readiness(tmp_path, STABLE)
    readiness.scan(now=100.0)
    assert _ready(readiness) == []
    readiness.refresh(now=104.9)
    assert _ready(readiness) == []
    readiness.refresh(now=105.0)
    assert _ready(readiness) == ["alice"]
    assert readiness.folders["alice"].ready_because == "stable"


def test_a_growing_photo_restarts_the_stability_clock(tmp_path):
    folder = _drop(tmp_path, "alice", {"photo.jpg": b"x" * 100, "job.toml": b"[[render]]\n"})
    readiness = Readiness(tmp_path, STABLE)
    readiness.scan(now=100.0)
    with open(folder / "photo.jpg", "ab") as handle:
        handle.write(b"y" * 100)
    readiness.refresh(now=103.0)
    readiness.refresh(now=107.0)  # 4 s after the change
    assert _ready(readiness) == []
    readiness.refresh(now=108.0)
    assert _ready(readiness) == ["alice"]


def test_same_size_rewrite_is_a_change_too(tmp_path):
    folder = _drop(tmp_path, "alice", {"photo.jpg": b"x" * 100, "job.toml": b"[[render]]\n"})
    readiness = Readiness(tmp_path, STABLE)
    readiness.scan(now=100.0)
    stat = (folder / "photo.jpg").stat()
    os.utime(folder / "photo.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    readiness.refresh(now=104.0)
    readiness.refresh(now=108.0)
    assert _ready(readiness) == []
    readiness.refresh(now=109.0)
    assert _ready(readiness) == ["alice"]


def test_no_job_toml_never_ready(tmp_path):
    _drop(tmp_path, "alice", {"photo.jpg": b"x"})
    readiness = Readiness(tmp_path, STABLE)
    readiness.scan(now=0.0)
    readiness.refresh(now=1000.0)
    assert _ready(readiness) == []
    assert readiness.counts() == (0, 1)


def test_a_quiet_folder_without_job_toml_is_said_once_per_quiet_spell(tmp_path):
    from structlog.testing import capture_logs

    folder = _drop(tmp_path, "alice", {"photo.jpg": b"x"})
    readiness = Readiness(tmp_path, STABLE)
    with capture_logs() as logs:
        readiness.scan(now=0.0)
        readiness.refresh(now=STABLE - 1)  # could still be a copy in progress: nothing said
        assert [e for e in logs if e["event"] == "waiting_for_job_file"] == []
        readiness.refresh(now=STABLE + 1)
        readiness.refresh(now=STABLE + 100)
        said = [e for e in logs if e["event"] == "waiting_for_job_file"]
        assert len(said) == 1 and said[0]["folder"] == "alice" and "job.toml" in said[0]["note"]
        (folder / "job.toml").write_text("")
        readiness.scan(now=STABLE + 101)  # the inbox listing sees the folder's own mtime move
        readiness.refresh(now=STABLE + 101)
        readiness.refresh(now=2 * STABLE + 102)
    assert _ready(readiness) == ["alice"]
    assert len([e for e in logs if e["event"] == "waiting_for_job_file"]) == 1


def test_ready_marker_makes_a_folder_ready_at_once(tmp_path):
    _drop(tmp_path, "alice", {"photo.jpg": b"x", "job.toml": b"", "READY": b""})
    readiness = Readiness(tmp_path, STABLE)
    readiness.scan(now=0.0)
    assert _ready(readiness) == ["alice"]
    assert readiness.folders["alice"].ready_because == "marker"


def test_hidden_and_temporary_names(tmp_path):
    # A hidden folder (a copy in progress under a temporary name) is no job.
    _drop(tmp_path, ".bob.partial", {"job.toml": b"", "READY": b""})
    _drop(tmp_path, "~carol", {"job.toml": b"", "READY": b""})
    # Neither a temporary job.toml nor a temporary READY counts...
    folder = _drop(tmp_path, "alice", {".job.toml.part": b"", "~READY": b"", "READY.tmp": b""})
    (tmp_path / "loose-file.jpg").write_bytes(b"x")
    readiness = Readiness(tmp_path, STABLE)
    readiness.scan(now=0.0)
    assert list(readiness.folders) == ["alice"]
    readiness.refresh(now=100.0)
    assert _ready(readiness) == []
    # ... but a temporary file still being written is activity: the folder is not stable.
    (folder / "job.toml").write_bytes(b"[[render]]\n")
    (folder / ".photo.jpg.part").write_bytes(b"x" * 10)
    readiness.scan(now=101.0)  # the inbox listing sees the folder's own mtime move (an event would say so too)
    readiness.refresh(now=101.0)
    with open(folder / ".photo.jpg.part", "ab") as handle:
        handle.write(b"x" * 10)
    readiness.refresh(now=105.5)
    assert _ready(readiness) == []
    (folder / ".photo.jpg.part").rename(folder / "photo.jpg")
    readiness.refresh(now=106.0)
    readiness.refresh(now=111.0)
    assert _ready(readiness) == ["alice"]


def test_changes_in_subfolders_count(tmp_path):
    folder = _drop(tmp_path, "alice", {"job.toml": b"", "photos/a.jpg": b"x"})
    readiness = Readiness(tmp_path, STABLE)
    readiness.scan(now=0.0)
    (folder / "photos" / "a.jpg").write_bytes(b"xx")
    readiness.refresh(now=4.0)
    readiness.refresh(now=8.0)
    assert _ready(readiness) == []
    readiness.refresh(now=9.0)
    assert _ready(readiness) == ["alice"]


def test_symlinked_folder_is_not_a_job(tmp_path):
    real = _drop(tmp_path / "elsewhere", "alice", {"job.toml": b"", "READY": b""})
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "alice").symlink_to(real, target_is_directory=True)
    assert list_inbox(tmp_path / "inbox") == {}
    readiness = Readiness(tmp_path / "inbox", STABLE)
    readiness.touch("alice", now=0.0)
    assert readiness.folders == {}


def test_vanished_and_changed_folders(tmp_path):
    _drop(tmp_path, "alice", {"job.toml": b"", "READY": b""})
    folder = _drop(tmp_path, "bob", {"job.toml": b""})
    readiness = Readiness(tmp_path, STABLE)
    readiness.scan(now=0.0)
    readiness.refresh(now=10.0)
    assert _ready(readiness) == ["alice", "bob"]
    (tmp_path / "alice").rename(tmp_path / ".alice-claimed-elsewhere")
    assert not readiness.confirm("alice", now=11.0)
    assert "alice" not in readiness.folders
    (folder / "late.jpg").write_bytes(b"late")  # something arrived after it looked ready
    assert not readiness.confirm("bob", now=11.0)
    assert readiness.counts() == (0, 1)


def test_arrival_order(tmp_path):
    readiness = Readiness(tmp_path, 0.0)
    for name in ("c", "a"):
        _drop(tmp_path, name, {"job.toml": b""})
    os.utime(tmp_path / "a", ns=(0, 2_000_000_000))
    os.utime(tmp_path / "c", ns=(0, 1_000_000_000))
    readiness.scan(now=1.0)  # found together: the older folder first
    _drop(tmp_path, "b", {"job.toml": b""})
    readiness.touch("b", now=2.0)  # seen later: after them, whatever its name
    readiness.refresh(now=3.0)
    assert _ready(readiness) == ["c", "a", "b"]


def test_signature_of_a_missing_folder_is_none(tmp_path):
    assert folder_signature(tmp_path / "nope") is None
    assert folder_signature(tmp_path) == ()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's native observer")
def test_native_observer_is_chosen_unless_polling():
    from watchdog.observers.inotify import InotifyObserver

    assert observer_class(polling=False) is InotifyObserver
    assert observer_class(polling=True) is PollingObserver


@pytest.mark.parametrize("polling", [False, True], ids=["native", "polling"])
def test_watcher_reports_the_top_folder_name(tmp_path, polling):
    waker = Waker()
    watcher = InboxWatcher(tmp_path, waker, polling=polling, poll_seconds=0.1)
    watcher.start()
    try:
        assert watcher.kind == ("polling" if polling else "native")
        if polling:
            assert watcher.observer_name == "PollingObserver"
        elif sys.platform.startswith("linux"):
            assert watcher.observer_name == "InotifyObserver"
        (tmp_path / "alice").mkdir()
        (tmp_path / "alice" / "photo.jpg").write_bytes(b"x")
        deadline = time.monotonic() + 5
        seen: set[str] = set()
        while "alice" not in seen and time.monotonic() < deadline:
            waker.wait(0.1)
            seen |= waker.take()
        assert seen == {"alice"}
    finally:
        watcher.stop()


def test_quiet_waiting_folders_are_not_walked_on_every_tick(tmp_path, monkeypatch):
    # 200 folders that never get a job.toml, 10 minutes of 0.5 s ticks with a listing every 10 s:
    # each is walked when first seen, when the stability window ends and then on the back-off,
    # not 1,200 times as when every tick walked every waiting folder.
    import daemon.watch as watch

    for index in range(200):
        _drop(tmp_path, f"f{index:03d}", {"photo.jpg": b"x"})
    walks = []
    real = watch.folder_signature
    monkeypatch.setattr(watch, "folder_signature", lambda folder: walks.append(folder) or real(folder))
    readiness = Readiness(tmp_path, STABLE)
    now = 0.0
    while now < 600.0:
        if now % 10.0 == 0:
            readiness.scan(now)
        readiness.refresh(now)
        now += 0.5
    per_folder = len(walks) / 200
    assert 3 <= per_folder <= 2 + 600 / watch.QUIET_WALK_MAX_SECONDS + 4, per_folder
    # ...and a job.toml arriving is seen at the next listing (the folder's own mtime moved).
    (tmp_path / "f007" / "job.toml").write_bytes(b"")
    readiness.scan(now)
    readiness.refresh(now)
    readiness.refresh(now + STABLE)
    assert _ready(readiness) == ["f007"]


def test_a_photo_growing_in_place_between_walks_still_restarts_the_stability_clock(tmp_path):
    # Appending to a file moves no folder's mtime and, over a share, makes no event: the walk at
    # the end of the window finds it, and the folder waits a full window again.
    folder = _drop(tmp_path, "alice", {"photo.jpg": b"x" * 100, "job.toml": b"[[render]]\n"})
    readiness = Readiness(tmp_path, STABLE)
    readiness.scan(now=0.0)
    readiness.refresh(now=0.5)  # quiet: the next walk is when it may be ready
    mtime = (tmp_path / "alice").stat().st_mtime_ns
    with open(folder / "photo.jpg", "ab") as handle:
        handle.write(b"y" * 100)
    assert (tmp_path / "alice").stat().st_mtime_ns == mtime
    for now in (1.0, 3.0, 5.0):
        readiness.scan(now)
        readiness.refresh(now)
    assert _ready(readiness) == []
    readiness.refresh(now=9.9)
    assert _ready(readiness) == []
    readiness.refresh(now=10.0)
    assert _ready(readiness) == ["alice"]


def _without_read_override(tmp_path: Path, script: str) -> str:
    """Run `script` as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (the container's user
    cannot read what another user keeps to himself either); skip where setpriv is refused."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the read-override capabilities")
    drop = "-dac_override,-dac_read_search"
    done = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c", script],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"setpriv refused here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_folders_and_files_it_may_not_read_are_skipped_and_named_and_the_rest_go_on(tmp_path):
    inbox = tmp_path / "inbox"
    _drop(inbox, "good", {"photo.jpg": b"x", "job.toml": b"", "READY": b""})
    locked = _drop(inbox, "locked-dir", {"job.toml": b"", "READY": b"", "private/photo.jpg": b"x"})
    photo = _drop(inbox, "locked-photo", {"job.toml": b"", "READY": b"", "photo.jpg": b"x"}) / "photo.jpg"
    os.chown(locked / "private", 4321, 4321)
    os.chmod(locked / "private", 0o700)
    os.chown(photo, 4321, 4321)
    os.chmod(photo, 0o600)
    out = _without_read_override(tmp_path, f"""
import json
from pathlib import Path
from daemon.watch import Readiness
r = Readiness(Path({str(inbox)!r}), 5.0)
r.scan(0.0)
claimable = [f.name for f in r.ready_in_arrival_order() if r.confirm(f.name, 1.0)]
first = r.unreadable()
r.scan(2.0); r.refresh(100.0)
later, counts, ready = r.unreadable(), r.counts(), [f.name for f in r.ready_in_arrival_order()]
Path({str(photo)!r}).chmod(0o644)  # the lab makes it readable: no mtime moves, the back-off walk sees it
r.refresh(200.0)
print(json.dumps({{"claimable": claimable, "unreadable": first, "later": later, "counts": counts, "ready": ready,
                   "fixed": r.unreadable(), "then_claimable": r.confirm("locked-photo", 201.0)}}))
""")
    import json

    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["claimable"] == ["good"]
    unreadable = dict(seen["unreadable"])
    assert sorted(unreadable) == ["locked-dir", "locked-photo"]
    assert unreadable["locked-dir"].startswith("private: Permission denied (owner uid 4321, mode 0700)")
    assert unreadable["locked-photo"].startswith("input_unreadable: photo.jpg: Permission denied (owner uid 4321, mode 0600)")
    assert dict(seen["later"]) == unreadable  # still skipped, not retried while unchanged
    assert seen["ready"] == ["good"] and seen["counts"] == [1, 0]
    assert [name for name, _ in seen["fixed"]] == ["locked-dir"] and seen["then_claimable"]
    assert photo.read_bytes() == b"x" and (locked / "private" / "photo.jpg").read_bytes() == b"x"  # untouched
