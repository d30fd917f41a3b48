"""File names from the wild: unicode, spaces, leading dots, control characters, names in an old
(non-UTF-8) encoding, names near the 255-byte limit; for photos and for the subject folder.

`load_job` gives the job with exactly that photo, or an `invalid_job` naming the file or key.
A few names go on through the engine to `prepare` on a real face."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import JobError
from engine.fsutil import canonical_json, utf8_safe
from engine.images import png_bytes
from engine.job import JOB_FILE
from engine.schema import to_plain
from tests.harness.jobs import PREPARE_JOB
from tests.harness.strategies import EXTENSIONS, JOB_CODES, check_error, check_failed_copy, load_or_refuse, tree_snapshot
from tests.harness.toml_writer import toml_string

NAMES = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TINY_PNG = png_bytes(np.zeros((4, 4, 3), dtype=np.uint8))
RENDER = '[[render]]\nprompt = "x"\n'
NAME_MAX = 255  # bytes, ext4/xfs/btrfs/tmpfs

# ---- names -------------------------------------------------------------------------------

extensions = st.sampled_from([".png", ".PNG", ".jpg", ".Jpeg", ".webp", ".gif", ".tmp", ".png.part", ".png ", ""])
name_chars = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))
stems = st.one_of(
    st.text(name_chars, min_size=1, max_size=30),
    st.sampled_from([" ", "  a b  ", ".", ".hidden", "~lock", "-dash", "é", "e\u0301", "😀", "名前", "a\tb", "a\nb", "\u202eevil",
                     "a.b.c", "CON", "..", "$(rm)", "*?[", "'\"", "\\"]),
)
# Right at the limit: a repeated character (1-4 UTF-8 bytes) filling 252-255 bytes with the extension.
long_names = st.builds(
    lambda char, slack, ext: char * ((NAME_MAX - len(ext.encode()) - slack) // len(char.encode())) + ext,
    st.sampled_from(["x", "é", "字", "😀", " "]), st.integers(0, 3), st.sampled_from([".png", ".jpg", ".webp"]),
)
# Bytes that are not UTF-8 (a Windows-1252 or Shift-JIS share): Python keeps them as surrogates.
old_encoding_names = st.builds(
    lambda raw, ext: os.fsdecode(raw.replace(b"/", b"_").replace(b"\x00", b"_") + ext),
    st.binary(min_size=1, max_size=20) | st.sampled_from([b"caf\xe9", b"\x82\xa0", b"\xff\xfe"]), st.sampled_from([b".png", b".jpg"]),
)


def _creatable(name: str) -> bool:
    return name not in (".", "..") and 0 < len(os.fsencode(name)) <= NAME_MAX


photo_names = st.one_of(st.builds(str.__add__, stems, extensions), long_names, old_encoding_names).filter(_creatable)


def _looks_accepted(name: str) -> bool:
    """The documented rule, spelled independently: an image extension, not a hidden or partial name."""
    lower = name.lower()
    hidden = name.startswith((".", "~")) or lower.endswith((".tmp", ".part", ".partial", ".crdownload"))
    return any(lower.endswith(ext) and len(lower) > len(ext) for ext in EXTENSIONS) and not hidden


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _job_folder(root: str, folder_name: str, job_toml: str, photos: dict[str, bytes]) -> Path:
    folder = Path(root) / folder_name
    folder.mkdir()
    (folder / JOB_FILE).write_text(job_toml, encoding="utf-8")
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    return folder


# ---- load_job ----------------------------------------------------------------------------


@NAMES
@given(name=photo_names)
def test_any_photo_name_is_found_or_named(name):
    """No subject.photos: every image in the folder is the job's photo."""
    with tempfile.TemporaryDirectory() as root:
        folder = _job_folder(root, "alice", RENDER, {name: TINY_PNG})
        before = tree_snapshot(folder)
        result = load_or_refuse(folder)
        assert tree_snapshot(folder) == before
    if not _looks_accepted(name):
        assert isinstance(result, JobError), f"{name!r} was taken as a photo"
        check_error(result, JOB_CODES, ("no photo found",))
    elif not _is_utf8(name):
        assert isinstance(result, JobError), f"{name!r} is not UTF-8 and was taken as a photo"
        check_error(result, JOB_CODES, (utf8_safe(name),))
        assert "not UTF-8" in result.message
    else:
        assert not isinstance(result, JobError), result
        assert result.spec.subject.photos == (name,) and result.photos == (folder / name,)
        canonical_json(to_plain(result.spec)).encode("utf-8")


@NAMES
@given(name=photo_names.filter(_is_utf8))
def test_any_listed_photo_name_is_found_or_named(name):
    """subject.photos = [name]: a listed photo may be hidden, but must be an image type."""
    job = f"[subject]\nphotos = [{toml_string(name)}]\n{RENDER}"
    with tempfile.TemporaryDirectory() as root:
        folder = _job_folder(root, "alice", job, {name: TINY_PNG})
        result = load_or_refuse(folder)
    accepted = any(name.lower().endswith(ext) and len(name) > len(ext) for ext in EXTENSIONS)
    if accepted:
        assert not isinstance(result, JobError), result
        assert result.spec.subject.photos == (name,)
    else:
        assert isinstance(result, JobError)
        check_error(result, JOB_CODES, ("subject.photos[0]",))


folder_names = st.one_of(stems, long_names, old_encoding_names, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True)).filter(_creatable)


@NAMES
@given(name=folder_names, named_in_job=st.booleans())
def test_any_subject_folder_name_is_a_subject_or_named(name, named_in_job):
    """The subject defaults to the folder's name, which must then be a safe name; with
    subject.name set, any folder name in UTF-8 will do."""
    job = ('[subject]\nname = "alice"\n' if named_in_job else "") + RENDER
    with tempfile.TemporaryDirectory() as root:
        folder = _job_folder(root, name, job, {"a.png": TINY_PNG})
        result = load_or_refuse(folder)
    safe = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None and len(name) <= 64
    if not _is_utf8(name):
        assert isinstance(result, JobError)
        check_error(result, JOB_CODES, (utf8_safe(name),))
    elif named_in_job:
        assert not isinstance(result, JobError), result
        assert result.subject == "alice"
    elif safe:
        assert not isinstance(result, JobError), result
        assert result.subject == name
    else:
        assert isinstance(result, JobError)
        check_error(result, JOB_CODES, ("subject.name",))


# ---- through the engine, to prepare on a real face ---------------------------------------

ENGINE_CASES = [
    # (folder name, job.toml, photo name, expected: "prepared" or the name the refusal must quote)
    ("alice", PREPARE_JOB, "é photo ünïcödé.png", "prepared"),
    ("alice", PREPARE_JOB, " leading and trailing spaces .jpg", "prepared"),
    ("alice", PREPARE_JOB, "😀" * 62 + ".png", "prepared"),  # 252 bytes
    ("alice", PREPARE_JOB, "x" * (NAME_MAX - 5) + ".webp", "prepared"),  # 255 bytes
    ("alice", PREPARE_JOB.replace("[prepare]", '[subject]\nphotos = [".hidden.png"]\n\n[prepare]'), ".hidden.png", "prepared"),
    ("alice", PREPARE_JOB, os.fsdecode(b"caf\xe9.png"), utf8_safe(os.fsdecode(b"caf\xe9.png"))),
    ("Ünïcödé folder", PREPARE_JOB.replace("[prepare]", '[subject]\nname = "alice"\n\n[prepare]'), "a.png", "prepared"),
    (".dot folder " + "é" * 120, PREPARE_JOB.replace("[prepare]", '[subject]\nname = "alice"\n\n[prepare]'), "a.png", "prepared"),
    ("z" * NAME_MAX, PREPARE_JOB, "a.png", "subject.name"),
    (os.fsdecode(b"dossier \xe9t\xe9"), PREPARE_JOB.replace("[prepare]", '[subject]\nname = "alice"\n\n[prepare]'), "a.png", "not UTF-8"),
]


@pytest.mark.parametrize("folder_name, job_toml, photo_name, expected", ENGINE_CASES, ids=range(len(ENGINE_CASES)))
def test_names_through_prepare(tmp_path, fuzz_engine, face_rgb, folder_name, job_toml, photo_name, expected):
    source = _job_folder(str(tmp_path), folder_name, job_toml, {photo_name: png_bytes(face_rgb)})
    before = tree_snapshot(source)
    result = fuzz_engine.run_job(source, tmp_path / "out" / "outbox", until="prepare")
    assert tree_snapshot(source) == before, "the engine changed its input"
    if expected != "prepared":
        error = check_failed_copy(result, before, JOB_CODES, (expected,))
        assert result.output_dir.parent.parent == tmp_path / "out" / "failed"
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", result.output_dir.parent.name), "failed/<subject> must be a safe name"
        json.loads((result.output_dir / "audit.jsonl").read_text(encoding="utf-8").splitlines()[0])  # UTF-8 JSON, whatever the names
        assert error["source"] == utf8_safe(str(source))
        return
    assert result.outcome == "partial", result.error
    info = json.loads((result.output_dir / "prepared" / "prepare.json").read_text(encoding="utf-8"))
    (photo,) = info["photos"]
    assert photo["name"] == photo_name and photo["chosen_face"] == 0
    prepared = result.output_dir / photo["images"][0]["file"]
    assert prepared.is_file() and len(prepared.name.encode()) <= NAME_MAX
