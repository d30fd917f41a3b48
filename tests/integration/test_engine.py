"""The engine on real photos and real face models: what lands in the outbox, and what a
refused job leaves behind (its inputs, untouched, with error.json)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engine.fsutil import sha256_file, tree_listing
from engine.jobfolder import INPUTS_DIR, work_dir
from engine.kinds.replicate import REPLICATE
from engine.runner import Engine, run_job
from engine.provenance.verification import verify_audit
from tests.harness.jobs import FAST_JOB, folder_snapshot, make_job

STAGE_NAMES = REPLICATE.stages  # a replicate job's stages, in order


def test_example_job_prepares_and_embeds(tmp_path, engine):
    from engine.example import write_example_subject

    source = write_example_subject(tmp_path / "inbox" / "astronaut")
    before = folder_snapshot(source)
    result = engine.run_job(source, tmp_path / "outbox", until="embed")
    assert result.outcome == "partial", result.error
    out = result.output_dir
    assert out == work_dir(tmp_path / "outbox", result.job_id)
    assert folder_snapshot(source) == before  # the engine only reads its input
    assert folder_snapshot(out / INPUTS_DIR) == before  # and works from its own copy of it
    prepared = sorted(p.name for p in (out / "prepared").glob("*.png"))
    assert prepared == ["0-astronaut_base.png", "0-astronaut_crop80.png", "0-astronaut_rot+10.png", "0-astronaut_rot-10.png"]
    embed = json.loads((out / "embedding" / "embed.json").read_text())
    assert embed["dimensions"] == 512
    assert max(row["drift_to_own_base"] for row in embed["images"]) < 0.05


def test_finished_job_is_published_with_manifest_and_audit(tmp_path, engine, astronaut_rgb):
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, FAST_JOB)
    result = engine.run_job(source, tmp_path / "outbox")
    assert result.outcome == "finished", result.error
    out = result.output_dir
    assert out == tmp_path / "outbox" / "alice" / result.job_id
    assert not work_dir(tmp_path / "outbox", result.job_id).exists()
    # Every file a replicate job publishes (the same list before job kinds came: issue 14).
    files = sorted(p.relative_to(out).as_posix().replace(result.job_id, "<job-id>") for p in out.rglob("*") if p.is_file())
    assert files == [
        "audit.jsonl", "drift_report.csv", "drift_report.json", "embedding/embed.json", "embedding/embeddings.npy", "embedding/reference.npy",
        "inputs/a.png", "inputs/job.toml", "lora/alice_<job-id>.safetensors", "lora/pytorch_lora_weights.safetensors", "manifest.json",
        "prepared/0-a_base.png", "prepared/0-a_crop80.png", "prepared/0-a_rot+10.png", "prepared/0-a_rot-10.png", "prepared/prepare.json",
        "renders/r0_0_anchor_drift_noface.png", "renders/r0_0_rescue_drift_noface.png", "renders/r0_0_scene_drift_noface.png",
        "report.html", "report/drift.png", "report/loss.png", "report/original_0.png", "signature.json", "state.json",
        "train/loss.csv", "train/train.json", "verify/control_seed_0_drift_noface.png", "verify/control_seed_1_drift_noface.png",
        "verify/seed_0_drift_noface.png", "verify/seed_1_drift_noface.png", "verify/verify.json",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"a.png", "job.toml"} and manifest["demo"] is True and manifest["kind"] == "replicate"
    assert any(name.startswith("faces/detector/") for name in manifest["models"])
    assert "prepared/0-a_base.png" in manifest["outputs"] and "lora/pytorch_lora_weights.safetensors" in manifest["outputs"]
    assert any(name.startswith("base/") for name in manifest["models"])
    report = verify_audit(out)
    assert report.ok, report.problems
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    first = events[0]
    assert first["event"] == "job_started" and first["kind"] == "replicate"
    assert set(first["versions"]) >= {"python", "torch", "diffusers", "peft", "insightface", "onnxruntime"}
    assert first["inputs"] == manifest["inputs"]
    assert first["models"]["faces"]["sha256"] and "device" in first and first["demo"] is True
    assert [e["event"] for e in events if e["event"] == "background_removal_skipped"]  # recorded, never silent
    # The kohya-format LoRA beside the diffusers one: in the manifest, named in the report, and
    # its metadata leads back to this job's audit log (the train stage's fingerprint).
    from engine.diffusion.kohya import read_kohya_metadata

    kohya = f"lora/alice_{result.job_id}.safetensors"
    assert kohya in manifest["outputs"]
    meta = read_kohya_metadata(out / kohya)
    [train_started] = [e for e in events if e["event"] == "stage_started" and e["stage"] == "train"]
    assert meta["idrep.job_id"] == result.job_id and meta["idrep.train_fingerprint"] == train_started["fingerprint"]
    assert 'id="lora-files"' in (out / "report.html").read_text() and kohya in (out / "report.html").read_text()


def test_a_finished_job_keeps_every_dropped_file_byte_for_byte_and_verify_audit_checks_them(tmp_path, engine, astronaut_rgb):
    """Extra files, a sub-folder, an unused photo, a link inside: inputs/ is the folder as dropped."""
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb, "unused.png": astronaut_rgb[::2, ::2]},
                      '[subject]\nphotos = ["a.png"]\n' + FAST_JOB)
    (source / "notes.txt").write_text("taken 2026-11-30, camera 2\n")
    (source / "raw" / "day 1").mkdir(parents=True)
    (source / "raw" / "day 1" / "IMG_0001.CR3").write_bytes(bytes(range(256)) * 64)
    (source / "empty folder").mkdir()
    (source / "same.png").symlink_to("a.png")
    before = folder_snapshot(source)
    result = engine.run_job(source, tmp_path / "outbox")
    assert result.outcome == "finished", result.error
    assert folder_snapshot(result.output_dir / INPUTS_DIR) == before
    assert folder_snapshot(source) == before
    manifest = json.loads((result.output_dir / "manifest.json").read_text())
    assert manifest["inputs"] == tree_listing(source).entries  # every file hashed, folders and links listed
    assert manifest["inputs"]["raw/day 1/IMG_0001.CR3"] and manifest["inputs"]["same.png"] == "link:a.png"
    assert verify_audit(result.output_dir).ok
    (result.output_dir / INPUTS_DIR / "unused.png").write_bytes(b"swapped")  # the unused photo is evidence too
    assert verify_audit(result.output_dir).problems == [f"{INPUTS_DIR}/unused.png: changed (differs from the manifest's inputs)"]


def test_the_job_reads_its_own_copy_never_the_folder_after_copying_it(tmp_path, settings, astronaut_rgb, monkeypatch):
    """A photo replaced in the source while the job runs changes nothing the job writes: its
    report shows, and its manifest lists, the photo as it was copied."""
    from engine.images import png_bytes

    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, FAST_JOB)
    original = (source / "a.png").read_bytes()

    def replace_the_photo(event: str, fields: dict) -> None:
        if event == "stage_started" and fields.get("stage") == "prepare":
            (source / "a.png").write_bytes(png_bytes(astronaut_rgb[::-1]))  # a person's shell sat in the folder

    result = Engine(settings, demo=True, observer=replace_the_photo).run_job(source, tmp_path / "outbox")
    assert result.outcome == "finished", result.error
    kept = result.output_dir / INPUTS_DIR / "a.png"
    assert kept.read_bytes() == original and (source / "a.png").read_bytes() != original
    from engine.fsutil import sha256_bytes

    manifest = json.loads((result.output_dir / "manifest.json").read_text())
    assert manifest["inputs"]["a.png"] == sha256_bytes(original)
    from PIL import Image

    shown = Image.open(result.output_dir / "report" / "original_0.png")
    assert shown.text["sha256"] == sha256_bytes(original)  # the report's "original" is the photo as copied
    assert verify_audit(result.output_dir).ok


def test_prepared_crop_is_centred_on_the_face(tmp_path, engine, face_models, astronaut_rgb):
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, FAST_JOB)
    result = engine.run_job(source, tmp_path / "outbox", until="embed")
    info = json.loads((result.output_dir / "prepared" / "prepare.json").read_text())
    (photo,) = info["photos"]
    assert photo["chosen_face"] == 0 and photo["background"]["method"] == "kept"
    for image in photo["images"]:
        rgb = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(result.output_dir / image["file"]).convert("RGB"))
        assert rgb.shape == (128, 128, 3)
        (face,) = face_models.detect(rgb)  # the face is still there, found afresh
        detected = face.keypoints
        mapped = np.asarray(image["keypoints"])
        assert np.abs(detected - mapped).max() < 4.0, image["kind"]  # prepare's mapped keypoints are where the face is


def _expect_refusal(tmp_path: Path, settings, source: Path, code: str, text: str) -> dict:
    before = folder_snapshot(source)
    result = run_job(source, tmp_path / "outbox", settings, demo=True)
    assert result.outcome == "failed"
    assert result.error["code"] == code, result.error
    assert text in result.error["message"] or any(text in p["reason"] or text in p["where"] for p in result.error["problems"]), result.error
    failed = tmp_path / "failed" / result.subject / result.job_id
    assert result.output_dir == failed
    assert folder_snapshot(source) == before  # input intact in place
    assert sorted(p.name for p in failed.iterdir()) == ["audit.jsonl", "error.json", INPUTS_DIR, "manifest.json", "signature.json"]
    assert folder_snapshot(failed / INPUTS_DIR) == before  # and a byte-identical copy beside error.json
    error = json.loads((failed / "error.json").read_text())
    assert error["code"] == code and error["job_id"] == result.job_id
    audit = [json.loads(line) for line in (failed / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["event"] == "job_failed" and audit[-1]["code"] == code
    assert not work_dir(tmp_path / "outbox", result.job_id).exists()
    return error


def test_no_face_found(tmp_path, settings, no_face_rgb):
    source = make_job(tmp_path / "cup", {"cup.png": no_face_rgb})
    _expect_refusal(tmp_path, settings, source, "no_face_found", "cup.png")


def test_truncated_jpeg(tmp_path, settings, astronaut_rgb):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(astronaut_rgb).save(buffer, format="JPEG")
    source = make_job(tmp_path / "alice", {"a.jpg": buffer.getvalue()[:20_000]})
    _expect_refusal(tmp_path, settings, source, "truncated_image", "a.jpg")


def test_pixel_bomb(tmp_path, settings):
    from tests.harness.jobs import png_header_only

    source = make_job(tmp_path / "alice", {"bomb.png": png_header_only(30_000, 30_000)})
    _expect_refusal(tmp_path, settings, source, "pixel_limit", "bomb.png")


def test_path_escaping_the_folder(tmp_path, settings, astronaut_rgb):
    make_job(tmp_path / "other", {"secret.png": astronaut_rgb})
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, '[subject]\nphotos = ["../other/secret.png"]\n' + FAST_JOB)
    _expect_refusal(tmp_path, settings, source, "invalid_job", "subject.photos[0]")


def test_bad_toml(tmp_path, settings, astronaut_rgb):
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, "[prepare\nsize = 128\n")
    error = _expect_refusal(tmp_path, settings, source, "invalid_job", "not valid TOML")
    assert "line 1" in error["message"]


def test_invalid_job_lists_every_problem(tmp_path, settings, astronaut_rgb):
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, '[prepare]\nsize = 1\nshape = "round"\n[[render]]\nmode = "x"\n')
    error = _expect_refusal(tmp_path, settings, source, "invalid_job", "prepare.size")
    wheres = {p["where"] for p in error["problems"]}
    assert {"job.toml: prepare.size", "job.toml: prepare.shape", "job.toml: render[0].mode", "job.toml: render[0].prompt"} <= wheres


def test_ambiguous_group_photo_is_refused_then_chosen_by_index(tmp_path, settings, group_rgb):
    source = make_job(tmp_path / "group", {"t1.png": group_rgb})
    error = _expect_refusal(tmp_path, settings, source, "ambiguous_face", "face_index")
    assert len(error["details"]["faces"]) == 6
    areas = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in (face["box"] for face in error["details"]["faces"])]
    similar = {i for i, area in enumerate(areas) if area >= 0.6 * max(areas)}  # input.ambiguous_face_ratio
    assert {int(n) for n in re.findall(r"#(\d+) at", error["message"])} == similar, error["message"]  # only those really similar in size
    (source / "job.toml").write_text('[subject]\nface_index = { "t1.png" = 2 }\n' + FAST_JOB)
    result = Engine(settings, demo=True).run_job(source, tmp_path / "outbox", until="embed")
    assert result.ok, result.error
    info = json.loads((result.output_dir / "prepared" / "prepare.json").read_text())
    assert info["photos"][0]["chosen_face"] == 2


def test_photos_of_different_people_are_refused_by_name(tmp_path, settings, astronaut_rgb, group_rgb):
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb, "b.png": group_rgb}, '[subject]\nface = "largest"\n' + FAST_JOB)
    error = _expect_refusal(tmp_path, settings, source, "identity_mismatch", "a.png vs b.png")
    assert error["details"]["pairwise"][0]["drift"] > 0.8


def test_two_photos_of_the_same_person_make_one_reference(tmp_path, settings, astronaut_rgb):
    mirrored = np.ascontiguousarray(astronaut_rgb[:, ::-1])
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb, "b.png": mirrored})
    result = Engine(settings, demo=True).run_job(source, tmp_path / "outbox", until="embed")
    assert result.ok, result.error
    embed = json.loads((result.output_dir / "embedding" / "embed.json").read_text())
    assert embed["pairwise"][0]["photos"] == ["a.png", "b.png"] and embed["pairwise"][0]["drift"] < 0.1
    reference = np.load(result.output_dir / "embedding" / "reference.npy")
    assert reference.shape == (512,) and abs(float(np.linalg.norm(reference)) - 1) < 1e-5


def _tiny_matting_model(path: Path, name: str = "tiny_matting") -> Path:
    """A real ONNX graph with U2-Net's interface (1x3x320x320 -> 1x1x320x320): the mean
    colour through a sigmoid. Enough to drive rembg's real code path with no download."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input.1"], ["mean"], axes=[1], keepdims=1), helper.make_node("Sigmoid", ["mean"], ["mask"])],
        name,
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 320, 320])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_background_removal_through_rembg_with_a_staged_model(tmp_path, settings, astronaut_rgb):
    from engine.config import BackgroundSettings

    _tiny_matting_model(settings.models_dir / "rembg" / "tiny.onnx")
    staged = settings.with_changes(background=BackgroundSettings(model="tiny", fill_rgb=(0, 255, 0)))
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb})
    result = Engine(staged, demo=True).run_job(source, tmp_path / "outbox", until="embed")
    assert result.ok, result.error
    info = json.loads((result.output_dir / "prepared" / "prepare.json").read_text())
    assert info["photos"][0]["background"]["method"] == "rembg"
    events = [json.loads(line)["event"] for line in (result.output_dir / "audit.jsonl").read_text().splitlines()]
    assert "background_removal_skipped" not in events
    state = json.loads((result.output_dir / "state.json").read_text())
    assert "rembg/tiny.onnx" in state["stages"][0]["models"]
    # The matte darkened by the mean-colour sigmoid moved pixels toward the green fill.
    from engine.images import read_rgb

    base = read_rgb(result.output_dir / "prepared" / "0-a_base.png").astype(int)
    plain = Engine(settings, demo=True).run_job(source, tmp_path / "outbox2", until="embed")
    kept = read_rgb(plain.output_dir / "prepared" / "0-a_base.png").astype(int)
    assert (base[..., 1] - base[..., 0]).mean() > (kept[..., 1] - kept[..., 0]).mean() + 10


def test_a_background_model_staged_while_the_engine_runs_is_used_and_fingerprinted(tmp_path, settings, astronaut_rgb):
    """The daemon's engine lives for days: a rembg model staged (or replaced) meanwhile is loaded
    for the next job, and the hash recorded is the file's there now, never a stale one."""
    from engine.config import BackgroundSettings

    staged = settings.with_changes(background=BackgroundSettings(model="tiny"))
    engine = Engine(staged, demo=True)
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb})
    first = engine.run_job(source, tmp_path / "outbox", until="prepare")
    assert json.loads((first.output_dir / "state.json").read_text())["stages"][0]["models"].keys().isdisjoint({"rembg/tiny.onnx"})
    model = _tiny_matting_model(settings.models_dir / "rembg" / "tiny.onnx")
    second = engine.run_job(make_job(tmp_path / "bob", {"a.png": astronaut_rgb}), tmp_path / "outbox", until="prepare")
    [prepare] = json.loads((second.output_dir / "state.json").read_text())["stages"]
    assert prepare["models"]["rembg/tiny.onnx"] == (was := sha256_file(model))
    assert json.loads((second.output_dir / "prepared" / "prepare.json").read_text())["photos"][0]["background"]["method"] == "rembg"
    os.replace(_tiny_matting_model(tmp_path / "other.onnx", name="another_matting"), model)  # replaced by another model
    third = engine.run_job(make_job(tmp_path / "carol", {"a.png": astronaut_rgb}), tmp_path / "outbox", until="prepare")
    [prepare] = json.loads((third.output_dir / "state.json").read_text())["stages"]
    assert prepare["models"]["rembg/tiny.onnx"] == sha256_file(model) != was


def test_missing_background_model_can_refuse(tmp_path, settings, astronaut_rgb):
    from engine.config import BackgroundSettings

    strict = settings.with_changes(background=BackgroundSettings(when_missing="refuse"))
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb})
    before = folder_snapshot(source)
    result = run_job(source, tmp_path / "outbox", strict, demo=True, until="embed")
    assert result.error["code"] == "background_model_missing"
    assert str(settings.models_dir / "rembg" / "u2net.onnx") in result.error["message"]
    assert folder_snapshot(source) == before


def test_until_stops_after_the_named_stage(tmp_path, settings, astronaut_rgb):
    source = make_job(tmp_path / "alice", {"a.png": astronaut_rgb})
    result = Engine(settings, demo=True).run_job(source, tmp_path / "outbox", until="prepare")
    assert result.outcome == "partial"  # stopped after prepare: embed and the rest did not run
    assert (result.output_dir / "prepared" / "prepare.json").exists()
    assert not (result.output_dir / "embedding").exists()
    with pytest.raises(ValueError, match="unknown stage"):
        Engine(settings, demo=True).run_job(source, tmp_path / "outbox", until="nonsense")


def test_cli_run_exit_codes(tmp_path, astronaut_rgb, no_face_rgb, monkeypatch):
    from engine.__main__ import main

    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nmodels = "{tmp_path / "models"}"\n')
    good = make_job(tmp_path / "alice", {"a.png": astronaut_rgb})
    bad = make_job(tmp_path / "cup", {"cup.png": no_face_rgb})
    run = ["--config", str(config), "run", "--outbox", str(tmp_path / "outbox")]
    assert main(run + [str(good), "--until", "embed", "--demo"]) == 0
    assert main(run + [str(bad), "--demo"]) == 1
    monkeypatch.setenv("ENGINE_FAIL_WRITES", "ENOSPC:*/prepared/*")
    assert main(run + [str(make_job(tmp_path / "dora", {"a.png": astronaut_rgb})), "--demo"]) == 3  # held: the disk, not the job
    monkeypatch.delenv("ENGINE_FAIL_WRITES")
    assert main(run + [str(good)]) == 2  # no base model staged and no --demo: refused, naming where
    config.write_text("[faces]\nrequire_pack = true\n")
    assert main(run + [str(good), "--demo"]) == 2


def test_demo_only_when_asked_for(tmp_path, settings):
    """No staged base model: refused at start-up naming where to stage it; models.base = "demo"
    (or --demo) is the explicit ask for the tiny model."""
    from engine.config import ModelSettings
    from engine.errors import ConfigError

    with pytest.raises(ConfigError) as excinfo:
        Engine(settings)
    assert excinfo.value.code == "model_missing"
    assert str(settings.models_dir / "sd15") in excinfo.value.message
    assert Engine(settings.with_changes(models=ModelSettings(base="demo"))).demo is True


def _face_square(face_models, rgb: np.ndarray, fraction: float = 1.0) -> np.ndarray:
    """The square of `fraction` x the face box's side around the photo's one face: a tight crop."""
    (face,) = face_models.detect(rgb)
    half = int(face.side * fraction / 2)
    x, y = (int(v) for v in face.center)
    return np.ascontiguousarray(rgb[y - half : y + half, x - half : x + half])


def test_a_tightly_cropped_face_is_refused_as_cut_off_with_the_margin_it_needs(tmp_path, settings, face_models, astronaut_rgb):
    """A 112 x 112 photo of the astronaut's face alone (issue 36: it was refused as if the face were
    too small). The detector sees nothing in it as it is: the face fills the photo to its edges."""
    import cv2

    tight = cv2.resize(_face_square(face_models, astronaut_rgb), (112, 112), interpolation=cv2.INTER_AREA)
    assert face_models.detect(tight) == []
    source = make_job(tmp_path / "alice", {"tight.png": tight})
    error = _expect_refusal(tmp_path, settings, source, "face_cut_off", "tight.png: the face fills the photo (112x112 px) to its edges")
    needed = error["details"]["margin_needed_px"]
    assert set(needed) == {"left", "top", "right", "bottom"} and min(needed.values()) > 50, needed  # padding 0.8 of a ~100 px face a side
    assert f"lacks at least {needed['left']} px on the left, {needed['top']} px at the top, {needed['right']} px on the right, {needed['bottom']} px at the bottom" in error["message"]
    assert "prepare.padding = 0.8" in error["message"] and "few dozen" not in error["message"]


def test_a_face_cut_by_the_edge_is_refused_and_an_ordinary_photo_passes(tmp_path, settings, face_models, astronaut_rgb):
    (face,) = face_models.detect(astronaut_rgb)
    through_the_forehead = np.ascontiguousarray(astronaut_rgb[int(face.box[1]) + 30 :])
    source = make_job(tmp_path / "alice", {"cut.png": through_the_forehead})
    error = _expect_refusal(tmp_path, settings, source, "face_cut_off", "cut.png: the face is cut off by the photo's top edge")
    assert error["details"]["edges_touched"] == ["top"] and list(error["details"]["margin_needed_px"]) == ["top"], error["details"]
    # The whole photo (whose padded crop also runs past the top edge, by less) and a loose crop pass.
    loose = _face_square(face_models, astronaut_rgb, 1.8)
    source = make_job(tmp_path / "bob", {"a.png": astronaut_rgb, "loose.png": loose})
    result = Engine(settings, demo=True).run_job(source, tmp_path / "outbox", until="prepare")
    assert result.outcome == "partial", result.error
