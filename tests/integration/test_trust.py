"""Signed records on real jobs: lab keys made by `keys init`, demo jobs signed with them, and every
forgery that used to verify (a consistent rewrite with a re-hashed chain, a changed input hash,
swapped folders, a deleted job, a render re-saved without its Content Credentials, one signed by
another lab, a journal cut back) is named by verify-audit or verify-journal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from PIL import Image

from engine.audit import line_hash, verify_audit
from engine.config import Settings
from engine.credentials import ASSERTION_LABEL, DIGITAL_SOURCE_TYPE, ContentCredentials, read_credentials
from engine.errors import ConfigError
from engine.fsutil import canonical_json, sha256_file
from engine.images import png_bytes
from engine.runner import Engine
from engine.trust import (AUDIT_KEY, AUDIT_PUBLIC_KEY, CA_CERT, CA_KEY, SIGNATURE_FILE, SIGNER_CHAIN, SIGNER_KEY, LabKeys, journal_path,
                          load_public_key, make_lab_keys, verify_journal)
from tests.conftest import FAST_JOB, make_job


@pytest.fixture(scope="module")
def lab_keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lab") / "keys"
    make_lab_keys(folder, "Test Lab")
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory, lab_keys, astronaut_rgb, face_models) -> Path:
    """Two signed jobs (alice, bob) and one refused (carol) in one outbox."""
    from engine.models import demo_model_dir, make_demo_model

    root = tmp_path_factory.mktemp("signed")
    make_demo_model(demo_model_dir(root / "models"))
    settings = Settings.from_table({"paths": {"models": str(root / "models")}, "trust": {"keys": str(lab_keys)}}, root=root)
    engine = Engine(settings, demo=True)
    for name in ("alice", "bob"):
        result = engine.run_job(make_job(root / "inbox" / name, {"photo.png": astronaut_rgb}, FAST_JOB), root / "outbox")
        assert result.outcome == "finished", result.error
    refused = engine.run_job(make_job(root / "inbox" / "carol", {"photo.png": astronaut_rgb}, "colour = 'blue'\n"), root / "outbox")
    assert refused.outcome == "failed"
    return root


@pytest.fixture()
def lab(published, tmp_path):
    """A copy of the published outbox and failed/ to forge in."""
    shutil.copytree(published / "outbox", tmp_path / "outbox", symlinks=True)
    shutil.copytree(published / "failed", tmp_path / "failed", symlinks=True)
    return tmp_path


@pytest.fixture(scope="module")
def anchors(lab_keys):
    return {"trusted_key": load_public_key(lab_keys / AUDIT_PUBLIC_KEY), "trusted_ca": (lab_keys / CA_CERT).read_bytes()}


def _job(root: Path, subject: str) -> Path:
    [job] = [p for p in (root / "outbox" / subject).iterdir() if p.is_dir()]
    return job


def _journal_ok(root: Path, anchors) -> list[str]:
    report = verify_journal(root / "outbox", trusted=anchors["trusted_key"], trusted_ca=anchors["trusted_ca"])
    return report.problems


def _rechain(audit: Path, edit) -> None:
    """What a forger with write access does: edit lines, then re-hash the chain from the first
    changed line on, so that it verifies as a chain."""
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    edit(lines)
    prev = "0" * 64
    for record in lines:
        record["prev"] = prev
        record["hash"] = line_hash(record)
        prev = record["hash"]
    audit.write_text("".join(canonical_json(record) + "\n" for record in lines))


def _rewrite_manifest(job: Path) -> None:
    """Re-hash every listed output into manifest.json, and the chain's job_finished line to match."""
    manifest = json.loads((job / "manifest.json").read_text())
    manifest["outputs"] = {rel: sha256_file(job / rel) for rel in manifest["outputs"]}
    (job / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    digest = sha256_file(job / "manifest.json")

    def seal(lines):
        next(line for line in reversed(lines) if line["event"] == "job_finished")["manifest_sha256"] = digest
    _rechain(job / "audit.jsonl", seal)


def test_keys_init_makes_what_c2pa_needs_with_private_keys_closed(lab_keys, tmp_path, capsys):
    from engine.__main__ import main

    assert main(["keys", "init", "--out", str(tmp_path / "cli-keys"), "--lab", "CLI Lab"]) == 0
    assert "Move lab-ca.key.pem somewhere offline" in capsys.readouterr().out
    assert LabKeys.load(tmp_path / "cli-keys").signer_subject.startswith("O=CLI Lab")
    assert main(["keys", "init", "--out", str(tmp_path / "cli-keys")]) == 2  # never over an existing set
    for name in (AUDIT_KEY, CA_KEY, SIGNER_KEY):
        assert (lab_keys / name).stat().st_mode & 0o777 == 0o600, name
    signer, ca = x509.load_pem_x509_certificates((lab_keys / SIGNER_CHAIN).read_bytes())
    assert signer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert signer.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert x509.oid.ExtendedKeyUsageOID.EMAIL_PROTECTION in signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert signer.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    assert signer.issuer == ca.subject and ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    with pytest.raises(ConfigError, match="already holds lab keys"):
        make_lab_keys(lab_keys)


def test_an_untouched_outbox_verifies_as_signed_and_trusted(lab, anchors, lab_keys):
    alice = _job(lab, "alice")
    report = verify_audit(alice, **anchors)
    assert report.ok, report.problems
    assert report.trust.signed == "trusted" and report.trust.journal == "found"
    assert report.trust.key_fingerprint == LabKeys.load(lab_keys).key_fingerprint
    generated = len(json.loads((alice / "drift_report.json").read_text())["renders"])  # seed candidates (LoRA, control) and render passes
    assert report.trust.credentials == {"Trusted": generated}
    [carol] = list((lab / "failed" / "carol").iterdir())
    failed = verify_audit(carol, **anchors)
    assert failed.trust.signed == "trusted" and failed.problems == ["audit.jsonl: no job_finished event (job incomplete)"]
    journal = verify_journal(lab / "outbox", trusted=anchors["trusted_key"], trusted_ca=anchors["trusted_ca"])
    assert journal.ok, journal.problems
    assert journal.entries == 3 and journal.jobs_checked == 3 and journal.signed == "trusted"
    report_html = (alice / "report.html").read_text()
    assert report.trust.key_fingerprint in report_html and "Test Lab content signer" in report_html
    assert report_html.count("C2PA Content Credentials: signed") == generated


def test_every_generated_image_carries_the_labs_content_credentials(lab, anchors):
    alice = _job(lab, "alice")
    images = sorted((alice / "verify").glob("*.png")) + sorted((alice / "renders").glob("*.png"))
    assert len(images) == len(json.loads((alice / "drift_report.json").read_text())["renders"])
    for image in images:
        state, manifest, detail = read_credentials(image, anchors["trusted_ca"])
        assert state == "Trusted", (image.name, detail)
        [actions] = [a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
        assert actions["data"]["actions"][0] == {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}
        ours = next(a["data"] for a in manifest["assertions"] if a["label"] == ASSERTION_LABEL)
        assert ours["job_id"] == alice.name and "seed" in ours and "drift" in ours and ours["models"]
        assert [(i["title"], i["relationship"]) for i in manifest["ingredients"]] == [("photo.png", "inputTo")]
        assert manifest["signature_info"]["common_name"] == "Test Lab content signer"
        text = Image.open(image).text  # the PNG text chunks are still there
        assert json.loads(text["seed"]) == ours["seed"] and text["prompt"]
    assert all(row["credentials"] == "signed" for row in json.loads((alice / "drift_report.json").read_text())["renders"])


def test_a_consistent_rewrite_of_a_render_with_a_rehashed_chain_is_named(lab, anchors):
    alice = _job(lab, "alice")
    [render, other] = sorted((alice / "renders").glob("*.png"))[:2]
    render.write_bytes(other.read_bytes())  # a render replaced by another (credentials and all)
    _rewrite_manifest(alice)
    problems = verify_audit(alice, **anchors).problems
    assert any("the signed manifest_sha256" in p and "manifest.json was rewritten" in p for p in problems), problems
    assert any("the signed audit_head" in p and "audit.jsonl was rewritten" in p for p in problems), problems


def test_a_changed_input_hash_with_a_recomputed_chain_is_named(lab, anchors):
    alice = _job(lab, "alice")

    def change_input(lines):
        lines[0]["inputs"]["photo.png"] = "0" * 64
    _rechain(alice / "audit.jsonl", change_input)
    problems = verify_audit(alice, **anchors).problems
    assert any("the signed audit_head" in p for p in problems), problems


def test_folders_of_two_subjects_swapped_are_named(lab, anchors):
    alice, bob = _job(lab, "alice"), _job(lab, "bob")
    alice.rename(lab / "outbox" / "bob" / alice.name)  # each job put under the other subject
    bob.rename(lab / "outbox" / "alice" / bob.name)
    moved = verify_audit(lab / "outbox" / "alice" / bob.name, **anchors).problems
    assert any("the signed subject is 'bob', the folder's is 'alice'" in p for p in moved), moved
    problems = _journal_ok(lab, anchors)
    assert any(f"outbox:alice/{alice.name}: the job folder is missing" in p for p in problems), problems
    assert any(f"outbox:alice/{bob.name}: not in the journal" in p for p in problems), problems


def test_a_deleted_job_is_named_by_the_journal(lab, anchors):
    bob = _job(lab, "bob")
    shutil.rmtree(bob)
    problems = _journal_ok(lab, anchors)
    assert problems == [f"journal line 2: outbox:bob/{bob.name}: the job folder is missing (deleted?)"]


def test_a_job_put_back_from_an_older_copy_is_named(lab, anchors):
    """Another version of the job under its path (here: its signed head replaced by an older one)."""
    alice = _job(lab, "alice")
    document = json.loads((alice / SIGNATURE_FILE).read_text())
    document["statement"]["audit_lines"] -= 1  # what an older run of the folder would have signed
    (alice / SIGNATURE_FILE).write_text(json.dumps(document))
    problems = _journal_ok(lab, anchors)
    assert any(f"outbox:alice/{alice.name} holds another version of the job than the journal recorded" in p for p in problems), problems


def test_a_render_resaved_without_its_credentials_is_named(lab, anchors):
    alice = _job(lab, "alice")
    render = sorted((alice / "renders").glob("*.png"))[0]
    image = Image.open(render)
    image.save(render, pnginfo=_text_chunks(image))  # same pixels, same text chunks, no C2PA chunk
    _rewrite_manifest(alice)
    problems = verify_audit(alice, **anchors).problems
    assert any(p.startswith(f"renders/{render.name}: carries no Content Credentials") for p in problems), problems


def test_a_render_signed_by_another_lab_is_named(lab, anchors, tmp_path):
    other = LabKeys.load(make_lab_keys(tmp_path / "other-lab", "Other Lab")[AUDIT_KEY].parent)
    alice = _job(lab, "alice")
    render = sorted((alice / "renders").glob("*.png"))[0]
    image = Image.open(render)
    plain = png_bytes(__import__("numpy").asarray(image.convert("RGB")), dict(image.text))
    render.write_bytes(ContentCredentials(other).sign_png(plain, title=render.name, facts={"job_id": alice.name},
                                                            ingredients=[("photo.png", alice / "inputs" / "photo.png")]))
    assert read_credentials(render, None)[0] == "Valid"  # intact and signed: by someone
    _rewrite_manifest(alice)
    problems = verify_audit(alice, **anchors).problems
    assert any(f"renders/{render.name}: its Content Credentials are signed, but not under the lab CA" in p for p in problems), problems


def test_a_head_signed_by_another_key_and_a_journal_cut_back_are_named(lab, anchors, tmp_path):
    other = LabKeys.load(make_lab_keys(tmp_path / "other-lab", "Other Lab")[AUDIT_KEY].parent)
    alice, bob = _job(lab, "alice"), _job(lab, "bob")
    document = json.loads((alice / SIGNATURE_FILE).read_text())
    document["signature"] = other.sign(canonical_json(document["statement"]).encode())
    (alice / SIGNATURE_FILE).write_text(json.dumps(document))
    problems = verify_audit(alice, **anchors).problems
    assert any("the signature does not verify with the trusted key" in p for p in problems), problems

    journal = journal_path(lab / "outbox")
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:1]) + "\n")  # bob's and carol's lines cut off
    problems = _journal_ok(lab, anchors)
    assert any(f"outbox:bob/{bob.name}: not in the journal" in p for p in problems), problems
    assert any("failed:carol/" in p and "not in the journal" in p for p in problems), problems


def test_an_edited_journal_line_is_named_even_rehashed(lab, anchors):
    journal = journal_path(lab / "outbox")
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    records[1]["ts"] = "2020-01-01T00:00:00+00:00"
    from engine.trust import journal_line_hash

    prev = records[0]["hash"]
    for record in records[1:]:  # re-hashed, as a forger would; the line signatures cannot be redone
        record["prev"] = prev
        record["hash"] = journal_line_hash(record)
        prev = record["hash"]
    journal.write_text("".join(canonical_json(record) + "\n" for record in records))
    problems = _journal_ok(lab, anchors)
    signature = "the line's signature does not verify with the trusted key (edited, or signed by another key)"
    assert problems == [f"journal line 2: {signature}", f"journal line 3: {signature}"]  # the edited line, and the one re-linked to it


def test_without_keys_everything_says_unsigned_and_require_refuses(tmp_path, astronaut_rgb, capsys):
    from engine.__main__ import main
    from engine.models import demo_model_dir, make_demo_model

    make_demo_model(demo_model_dir(tmp_path / "models"))
    settings = Settings.from_table({"paths": {"models": str(tmp_path / "models")}}, root=tmp_path)
    result = Engine(settings, demo=True).run_job(make_job(tmp_path / "inbox" / "dora", {"photo.png": astronaut_rgb}, FAST_JOB),
                                                 tmp_path / "outbox")
    assert result.outcome == "finished", result.error
    report = verify_audit(result.output_dir)
    assert report.ok and report.trust.signed == "unsigned" and any(note.startswith("UNSIGNED") for note in report.trust.notes)
    assert json.loads((result.output_dir / "manifest.json").read_text())["trust"]["signed"] is False
    assert all(row["credentials"] == "unsigned" for row in json.loads((result.output_dir / "drift_report.json").read_text())["renders"])
    assert set(report.trust.credentials) == {"none"}
    assert "<b>UNSIGNED.</b>" in (result.output_dir / "report.html").read_text()
    assert main(["verify-audit", str(result.output_dir)]) == 0
    out = capsys.readouterr().out
    assert "signed head: unsigned" in out and "note: UNSIGNED" in out
    assert main(["verify-audit", str(result.output_dir), "--require-signed"]) == 1
    assert main(["verify-journal", str(tmp_path / "outbox")]) == 0 and "UNSIGNED" in capsys.readouterr().out
    strict = Settings.from_table({"paths": {"models": str(tmp_path / "models")}, "trust": {"require": True}}, root=tmp_path)
    with pytest.raises(ConfigError, match=r"\[trust\] require = true"):
        Engine(strict, demo=True)
    missing = Settings.from_table({"paths": {"models": str(tmp_path / "models")}, "trust": {"keys": "nowhere"}}, root=tmp_path)
    with pytest.raises(ConfigError, match="audit-signing.key.pem"):
        Engine(missing, demo=True)


def _text_chunks(image: Image.Image):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in image.text.items():
        info.add_itxt(key, value)
    return info


RACER = """
import sys
from pathlib import Path
from engine.trust import LabKeys, append_journal
outbox, keys, me = Path(sys.argv[1]), LabKeys.load(Path(sys.argv[2])), sys.argv[3]
for number in range(15):
    statement = {"where": "outbox", "path": f"{me}/{number}", "job_id": f"{me}-{number}", "kind": "finished", "subject": me}
    from engine.fsutil import canonical_json
    append_journal(outbox, {"statement": statement, "signature": keys.sign(canonical_json(statement).encode()),
                            "key_fingerprint": keys.key_fingerprint}, keys)
"""


def test_daemons_appending_to_one_journal_at_once_keep_one_chain(tmp_path, lab_keys, anchors):
    """Several daemons share an outbox: their lines interleave, the chain stays one."""
    import subprocess
    import sys

    from engine.trust import read_journal
    from tests.conftest import REPO

    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "outbox"), str(lab_keys), f"d{i}"], cwd=REPO)
              for i in range(3)]
    assert [racer.wait(120) for racer in racers] == [0, 0, 0]
    lines = read_journal(journal_path(tmp_path / "outbox"))
    assert len(lines) == 45 and [line["seq"] for line in lines] == list(range(1, 46))
    assert all(line["prev"] == before["hash"] for before, line in zip(lines, lines[1:]))
    report = verify_journal(tmp_path / "outbox", trusted=anchors["trusted_key"])
    assert report.signed == "trusted" and not [p for p in report.problems if "missing" not in p]  # (the folders are not there)
