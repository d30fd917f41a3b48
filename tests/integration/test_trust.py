"""Signed records on real jobs: lab keys made by `keys init`, demo jobs signed with them, and every
forgery that used to verify (a consistent rewrite with a re-hashed chain, a changed input hash,
swapped folders, a deleted job, a render re-saved without its Content Credentials, one signed by
another lab, a journal cut back) is named by verify-audit or verify-journal."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from PIL import Image

from engine.provenance.audit import line_hash
from engine.config import Settings
from engine.provenance.credentials import ASSERTION_LABEL, DIGITAL_SOURCE_TYPE, ContentCredentials
from engine.errors import ConfigError
from engine.fsutil import canonical_json, sha256_file
from engine.images import png_bytes
from engine.layout import SIGNATURE_FILE
from engine.runner import Engine
from engine.provenance.trust import (AUDIT_KEY, AUDIT_PUBLIC_KEY, CA_CERT, CA_KEY, SIGNER_CHAIN, SIGNER_KEY, LabKeys, journal_path, load_public_key,
                          make_lab_keys)
from engine.provenance.verification import read_credentials, verify_audit, verify_journal
from tests.harness.jobs import FAST_JOB, make_job


@pytest.fixture(scope="module")
def published(tmp_path_factory, lab_keys, astronaut_rgb, face_models) -> Path:
    """Two signed jobs (alice, bob) and one refused (carol) in one outbox."""
    from engine.diffusion.models import demo_model_dir, make_demo_model

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
    assert failed.trust.signed == "trusted" and failed.ok and failed.verdict == "failed", failed.problems
    journal = verify_journal(lab / "outbox", trusted=anchors["trusted_key"], trusted_ca=anchors["trusted_ca"])
    assert journal.ok, journal.problems
    assert journal.entries == 3 and journal.jobs_checked == 3 and journal.signed == "trusted"
    report_html = (alice / "report.html").read_text()
    assert report.trust.key_fingerprint in report_html and "Test Lab content signer" in report_html
    # said once per section (seed candidates, renders), counting the images it covers: every one
    said = [int(n) for n in re.findall(r"C2PA Content Credentials of these (\d+) images: signed<", report_html)]
    assert len(said) == 2 and sum(said) == generated, said


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
    assert any("the signed audit_sha256" in p and "audit.jsonl was rewritten" in p for p in problems), problems


def test_a_changed_input_hash_with_a_recomputed_chain_is_named(lab, anchors):
    alice = _job(lab, "alice")

    def change_input(lines):
        lines[0]["inputs"]["photo.png"] = "0" * 64
    _rechain(alice / "audit.jsonl", change_input)
    problems = verify_audit(alice, **anchors).problems
    assert any("the signed audit_sha256" in p for p in problems), problems


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
    render.write_bytes(ContentCredentials.holding(other).sign_png(plain, title=render.name, facts={"job_id": alice.name}, job_dir=alice,
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
    from engine.provenance.trust import journal_line_hash

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
    from engine.diffusion.models import demo_model_dir, make_demo_model

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
from engine.provenance.trust import LabKeys, append_journal
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

    from engine.provenance.trust import read_journal
    from tests.harness.paths import REPO

    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "outbox"), str(lab_keys), f"d{i}"], cwd=REPO)
              for i in range(3)]
    assert [racer.wait(120) for racer in racers] == [0, 0, 0]
    lines = read_journal(journal_path(tmp_path / "outbox"))
    assert len(lines) == 45 and [line["seq"] for line in lines] == list(range(1, 46))
    assert all(line["prev"] == before["hash"] for before, line in zip(lines, lines[1:]))
    report = verify_journal(tmp_path / "outbox", trusted=anchors["trusted_key"])
    assert report.signed == "trusted" and not [p for p in report.problems if "missing" not in p]  # (the folders are not there)


# ---------------------------------------------------------------------------- issue 30: the share is hostile

def _strip(job: Path, edit_audit=None) -> None:
    """What a forger who holds no key does to a job: rewrite the manifest as unsigned, re-chain the
    audit log to it, and replace the signed head with an unsigned one over the new files."""
    from engine.provenance.trust import build_statement, signed_document

    manifest = json.loads((job / "manifest.json").read_text())
    manifest["trust"] = {"signed": False}
    manifest["outputs"] = {rel: sha256_file(job / rel) for rel in manifest["outputs"]}
    (job / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    digest = sha256_file(job / "manifest.json")

    def unsign(lines):
        for line in lines:
            if "trust" in line:
                line["trust"] = {"signed": False}
        next(line for line in reversed(lines) if line["event"] == "job_finished")["manifest_sha256"] = digest
    _rechain(job / "audit.jsonl", unsign)
    statement = build_statement(job, where="outbox", path=f"{job.parent.name}/{job.name}", job_id=job.name, subject=job.parent.name)
    (job / SIGNATURE_FILE).write_text(json.dumps(signed_document(statement, None)))


def _unsign_journal_from(root: Path, number: int) -> None:
    """Rewrite journal line `number` (1-based) and every later one unsigned, each job's line
    holding the statement its folder holds now, the chain re-hashed."""
    from engine.provenance.trust import journal_line_hash, statement_sha256

    journal = journal_path(root / "outbox")
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    for record in records[number - 1:]:
        where = root / ("outbox" if record["where"] == "outbox" else "failed") / record["path"]
        statement = json.loads((where / SIGNATURE_FILE).read_text())["statement"]
        record.update(statement=statement, statement_sha256=statement_sha256(statement), statement_signature=None, signature=None,
                      key_fingerprint=None)
    prev = records[number - 2]["hash"] if number > 1 else "0" * 64
    for record in records[number - 1:]:
        record["prev"] = prev
        record["hash"] = journal_line_hash(record)
        prev = record["hash"]
    journal.write_text("".join(canonical_json(record) + "\n" for record in records))


def test_stripped_signatures_fail_with_the_reviewers_keys(lab, anchors, lab_keys, capsys):
    """Issue 30, case 3: a render replaced, the manifest made "unsigned", the chain re-hashed, the
    head's signature nulled, the job's journal line and all later ones rewritten unsigned."""
    from engine.__main__ import main

    bob = _job(lab, "bob")
    [render, other] = sorted((bob / "renders").glob("*.png"))[:2]
    render.write_bytes(other.read_bytes())
    _strip(bob)
    _unsign_journal_from(lab, 2)  # bob's line (alice's, line 1, stays signed)
    problems = verify_audit(bob, **anchors).problems
    assert any("the job's head is unsigned, but a trusted key was given" in p for p in problems), problems
    assert any("carry signed Content Credentials" in p and "head is unsigned" in p for p in problems), problems
    # The opt-out accepts unsigned jobs, never images that say "signed" in a job that says it is not.
    relaxed = verify_audit(bob, **anchors, allow_unsigned=True).problems
    assert relaxed and all("Content Credentials" in p for p in relaxed), relaxed
    journal = _journal_ok(lab, anchors)
    assert any(p.startswith("journal line 2: unsigned, after signed lines from line 1 on") for p in journal), journal
    assert any(p.startswith("journal line 3: unsigned, after signed lines") for p in journal), journal
    keys = ["--trusted-key", str(lab_keys / AUDIT_PUBLIC_KEY), "--trusted-ca", str(lab_keys / CA_CERT)]
    assert main(["verify-audit", str(bob), *keys]) == 1
    assert main(["verify-journal", str(lab / "outbox"), "--failed", str(lab / "failed"), *keys]) == 1
    capsys.readouterr()


def test_a_tampered_failed_job_is_named_and_an_untouched_one_verifies_as_failed(lab, anchors, lab_keys, capsys):
    """Issue 30, case 4: failed jobs are sealed like published ones (their inputs/ too)."""
    from engine.__main__ import main

    [carol] = list((lab / "failed" / "carol").iterdir())
    keys = ["--trusted-key", str(lab_keys / AUDIT_PUBLIC_KEY), "--trusted-ca", str(lab_keys / CA_CERT)]
    assert main(["verify-audit", str(carol), *keys]) == 0
    assert "OK (a failed job, recorded intact)" in capsys.readouterr().out
    inputs = carol / "inputs"
    (inputs / "photo.png").write_bytes(b"another photo altogether")
    (inputs / "added.txt").write_text("put there later")
    (inputs / "job.toml").unlink()
    problems = verify_audit(carol, **anchors).problems
    assert set(problems) >= {"inputs/photo.png: changed (differs from the manifest's inputs)",
                             "inputs/added.txt: not in the manifest's inputs (added after the job finished)",
                             "inputs/job.toml: missing (the manifest lists it as dropped)"}, problems
    journal = _journal_ok(lab, anchors)
    assert any(p.startswith(f"failed:carol/{carol.name}: inputs/photo.png: changed") for p in journal), journal
    # A forger who also rewrites the manifest breaks the signed head instead.
    manifest = json.loads((carol / "manifest.json").read_text())
    manifest["inputs"] = {**{k: v for k, v in manifest["inputs"].items() if k != "job.toml"}, "photo.png": sha256_file(inputs / "photo.png"),
                          "added.txt": sha256_file(inputs / "added.txt")}
    (carol / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_audit(carol, **anchors).problems
    assert any("the signed manifest_sha256" in p for p in problems), problems


def test_a_torn_journal_tail_leads_to_each_job_exactly_once_and_a_journal_that_verifies(lab, lab_keys, anchors, astronaut_rgb):
    """Issue 30, case 5: the journal cut in the middle of its last line (a power cut), then two jobs."""
    from engine.provenance.trust import TORN_SUFFIX, read_journal

    journal = journal_path(lab / "outbox")
    data = journal.read_bytes()
    journal.write_bytes(data[:len(data) - 40])  # carol's line, torn
    assert "ends in" in " ".join(_journal_ok(lab, anchors))  # named before it is repaired
    settings = Settings.from_table({"paths": {"models": str(lab.parent / "models")}, "trust": {"keys": str(lab_keys)}}, root=lab)
    from engine.diffusion.models import demo_model_dir, make_demo_model

    make_demo_model(demo_model_dir(lab.parent / "models"))
    engine = Engine(settings, demo=True)
    results = [engine.run_job(make_job(lab / "inbox" / name, {"photo.png": astronaut_rgb}, FAST_JOB), lab / "outbox") for name in ("dan", "eve")]
    assert [r.outcome for r in results] == ["finished", "finished"], [r.error for r in results]
    for result in results:  # each exactly once, in exactly one place
        assert [p for p in (lab / "outbox").glob(f"*/{result.job_id}")] == [result.output_dir]
        assert not list((lab / "failed").glob(f"*/{result.job_id}")) and not (lab / "outbox" / ".work" / result.job_id).exists()
    lines = read_journal(journal)
    assert [line.get("kind") for line in lines] == ["finished", "finished", "repair", "finished", "finished"]
    [kept] = list(journal.parent.glob(f"journal.jsonl{TORN_SUFFIX}*"))
    assert kept.read_bytes() == data[data.rfind(b"\n", 0, len(data) - 1) + 1:len(data) - 40]
    assert lines[2]["repair"]["removed_bytes"] == kept.stat().st_size
    problems = _journal_ok(lab, anchors)
    # carol's failed job lost its journal line with the torn tail: named, and nothing else is.
    assert len(problems) == 1 and problems[0].startswith("failed:carol/") and "not in the journal" in problems[0], problems
