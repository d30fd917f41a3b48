"""The outbox's journal survives a torn or NUL-padded tail: the next append keeps the bytes aside,
cuts the journal back to its last whole line and records the repair as a line of the chain."""

from __future__ import annotations

import pytest

from engine.provenance.chain import good_prefix
from engine.fsutil import canonical_json
from engine.provenance.trust import TORN_SUFFIX, LabKeys, append_journal, journal_path, make_lab_keys, read_journal, torn_tail
from engine.provenance.verification import verify_journal


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> LabKeys:
    folder = tmp_path_factory.mktemp("journal-lab") / "keys"
    make_lab_keys(folder, "Journal Lab")
    return LabKeys.load(folder)


def _head(keys: LabKeys | None, job_id: str) -> dict:
    statement = {"where": "outbox", "path": f"s/{job_id}", "job_id": job_id, "kind": "finished", "subject": "s"}
    return {"statement": statement, "signature": keys.sign(canonical_json(statement).encode()) if keys else None,
            "key_fingerprint": keys.key_fingerprint if keys else None}


@pytest.mark.parametrize("tail", [b'{"seq": 3, "ts": "2026', b"\x00" * 4096, b"\x00" * 100 + b"\n", b"garbage\n\x00\x00"],
                         ids=["torn line", "NUL padding", "NUL line", "garbage then NULs"])
def test_a_bad_tail_is_cut_off_kept_aside_and_the_repair_chained(tmp_path, keys, tail):
    outbox = tmp_path / "outbox"
    for job_id in ("a", "b"):
        append_journal(outbox, _head(keys, job_id), keys)
    path = journal_path(outbox)
    whole = path.read_bytes()
    path.write_bytes(whole + tail)
    assert good_prefix(path.read_bytes()) == len(whole) and torn_tail(path) == len(tail)
    append_journal(outbox, _head(keys, "c"), keys)
    lines = read_journal(path)
    assert [line.get("job_id") for line in lines] == ["a", "b", None, "c"]
    assert lines[2]["kind"] == "repair" and lines[2]["repair"]["removed_bytes"] == len(tail) and lines[2]["signature"]
    [kept] = list(path.parent.glob(f"journal.jsonl{TORN_SUFFIX}*"))
    assert kept.read_bytes() == tail
    report = verify_journal(outbox, trusted=keys.public_key)
    assert report.repairs == 1 and any("a torn tail of" in note for note in report.notes)
    assert [p for p in report.problems if "missing" not in p] == []  # (there are no job folders here)


def test_a_damaged_line_followed_by_good_ones_is_not_a_tail(tmp_path, keys):
    outbox = tmp_path / "outbox"
    for job_id in ("a", "b", "c"):
        append_journal(outbox, _head(keys, job_id), keys)
    path = journal_path(outbox)
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"x" * len(lines[1])
    path.write_bytes(b"\n".join(lines))
    assert torn_tail(path) == 0  # nothing is cut: the chain check names the damage
    append_journal(outbox, _head(keys, "d"), keys)
    assert not list(path.parent.glob(f"journal.jsonl{TORN_SUFFIX}*"))
    assert any(p.startswith("journal line 2: not JSON") for p in verify_journal(outbox, trusted=keys.public_key).problems)


def test_with_a_trusted_key_an_unsigned_journal_fails_unless_allowed(tmp_path, keys):
    outbox = tmp_path / "outbox"
    append_journal(outbox, _head(None, "a"), None)
    strict = verify_journal(outbox, trusted=keys.public_key)
    assert any("the journal is unsigned, but a trusted key was given" in p for p in strict.problems)
    relaxed = verify_journal(outbox, trusted=keys.public_key, allow_unsigned=True)
    assert not [p for p in relaxed.problems if "missing" not in p]
