"""What a new lab hits on day one: the pre-flight `engine models check`, `--until embed` without
diffusion weights, the face pack that is not staged, and files a reviewer on the share can open."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.fsutil import set_umask, sha256_file
from engine.diffusion.models import make_demo_model
from engine.runner import Engine
from tests.harness.jobs import FAST_JOB, make_job
from tests.harness.paths import REPO


def _check(config: Path, *args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "engine", "--config", str(config), "models", "check", *args], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, done.stdout


def test_models_check_lists_every_model_staged_or_missing_and_exits_0_only_when_all_needed_are_there(tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nmodels = "{models}"\n', encoding="utf-8")

    code, text = _check(config, "--no-hash")
    assert code == 1
    assert f"[MISSING] base (models.base): {models / 'sd15'}" in text
    assert f"[missing (optional)] faces (faces.pack): {models / 'insightface' / 'buffalo_l'}" in text
    assert "the embedded buffalo_s" in text and "[staged] faces_fallback" in text
    assert "[missing (optional)] background (background.model)" in text and "[staged] identity2" in text
    assert "used only by two_pass renders" in text and text.rstrip().endswith("1 needed model(s) missing")

    code, text = _check(config, "--until", "embed", "--no-hash")
    assert code == 0 and "models.base" in text and "[MISSING]" not in text  # listed, but not needed by prepare/embed

    make_demo_model(models / "sd15")  # any diffusers folder will do: here the demo model, staged under the lab's name
    code, out = _check(config, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["missing"] == []
    base = next(entry for entry in report["models"] if entry["role"] == "base")
    assert base["staged"] and base["required"] and base["path"] == str(models / "sd15") and base["bytes"] > 0
    for item in base["files"]:
        assert item["sha256"] == sha256_file(Path(item["path"]))
    assert {item["name"] for item in base["files"]} >= {"model_index.json", "unet/diffusion_pytorch_model.safetensors"}

    config.write_text(f'[paths]\nmodels = "{models}"\n[faces]\nrequire_pack = true\n[background]\nwhen_missing = "refuse"\n'
                      '[job.render]\nmode = "two_pass"\n', encoding="utf-8")
    code, out = _check(config, "--json", "--no-hash")
    assert code == 1
    assert json.loads(out)["missing"] == ["faces.pack", "background.model", "models.realism"]


def test_until_embed_needs_no_diffusion_weights(tmp_path: Path, settings, astronaut_rgb):
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb})
    with pytest.raises(ConfigError) as refused:
        Engine(settings)  # the whole chain: refused at start, naming where the base model goes
    assert refused.value.code == "model_missing" and str(settings.models_dir / "sd15") in refused.value.message
    engine = Engine(settings, until="embed")
    result = engine.run_job(source, tmp_path / "outbox", until="embed")
    assert result.outcome == "partial", result.error
    assert (result.output_dir / "embedding").is_dir()
    with pytest.raises(ConfigError, match="models.base"):
        engine.run_job(source, tmp_path / "outbox")  # further than this engine checked: its models are checked now

    from engine.__main__ import main

    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nmodels = "{settings.models_dir}"\n', encoding="utf-8")
    bob = make_job(tmp_path / "bob", {"a.png": astronaut_rgb})
    assert main(["--config", str(config), "run", str(bob), "--outbox", str(tmp_path / "outbox"), "--until", "embed"]) == 0


def _unreadable_by_others(root: Path) -> list[str]:
    bad = []
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        wanted = 0o755 if path.is_dir() else 0o644
        if mode & wanted != wanted:
            bad.append(f"{path.relative_to(root.parent)} {oct(mode)}")
    return bad


@pytest.fixture()
def umask_022():
    before = os.umask(0o022)
    os.umask(before)
    set_umask(0o022)
    yield
    set_umask(before)


def test_every_file_of_a_finished_and_a_failed_job_is_readable_by_others_and_keys_stay_private(
        tmp_path: Path, settings, astronaut_rgb, no_face_rgb, umask_022):
    from engine.provenance.trust import make_lab_keys

    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb, "notes.txt": b"private note"}, FAST_JOB)
    os.chmod(source / "notes.txt", 0o600)  # dropped by someone whose umask is 077
    os.chmod(source / "a.png", 0o600)
    outbox = tmp_path / "outbox"
    finished = Engine(settings, demo=True).run_job(source, outbox)
    assert finished.outcome == "finished", finished.error
    failed = Engine(settings, demo=True).run_job(make_job(tmp_path / "cup", {"cup.png": no_face_rgb}), outbox)
    assert failed.outcome == "failed"
    for job in (finished.output_dir, failed.output_dir):
        assert _unreadable_by_others(job) == []
    assert stat.S_IMODE((finished.output_dir / "inputs" / "notes.txt").stat().st_mode) == 0o644
    assert _unreadable_by_others(outbox / ".journal") == []

    # The face pack asked for (buffalo_l, the default) is not staged: said in the audit and the report.
    first = json.loads((finished.output_dir / "audit.jsonl").read_text().splitlines()[0])
    faces = first["models"]["faces"]
    assert faces["requested_pack"] == "buffalo_l" and faces["pack"].startswith("buffalo_s") and "not staged" in faces["fallback"]
    assert faces["providers"] == {"detector": ["CPUExecutionProvider"], "recognizer": ["CPUExecutionProvider"]}
    assert first["versions"]["identity-replication-daemon"].startswith("0.1.0")
    report = (finished.output_dir / "report.html").read_text()
    assert 'id="face-pack-fallback"' in report and "identity-replication-daemon" in report

    os.umask(0)  # even with nothing masked, the private keys are the owner's alone
    try:
        keys = make_lab_keys(tmp_path / "keys")
    finally:
        os.umask(0o022)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in keys.values()}
    assert {name for name, mode in modes.items() if mode == 0o600} == {name for name in modes if name.endswith(".key.pem")}, modes
    assert all(mode & 0o004 for name, mode in modes.items() if not name.endswith(".key.pem")), modes


def test_a_stricter_umask_keeps_others_out_of_outputs(tmp_path: Path, settings, no_face_rgb, umask_022):
    set_umask(0o027)
    failed = Engine(settings, demo=True).run_job(make_job(tmp_path / "cup", {"cup.png": no_face_rgb}), tmp_path / "outbox")
    assert failed.outcome == "failed"
    for path in [failed.output_dir, *failed.output_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o007 == 0 and mode & 0o040, (path, oct(mode))
