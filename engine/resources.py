"""The one owner of model lifetime: every model a job uses is loaded here, once per process, and
shared by every job (the daemon keeps one `Resources`): the face models, the background remover,
the diffusion pipelines of the `base` and `realism` roles and the image-to-image pipelines made
from them (`from_pipe`: the same components, no second copy of the weights), the second identity
model, and the sha256 of every model file. Also the lab's keys and the C2PA signer.

Models are named by *role* (MODEL_ROLES). A stage declares the roles it uses (engine.stages:
`models(ctx)`); the runner puts `hashes(role)` of each into the stage's fingerprint, and the stage
takes each model through `StageContext.use(role)`, which records its hashes in `models_used`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.identity.background import BackgroundRemover, staged_model_path
from engine.config import Settings
from engine.errors import ConfigError
from engine.identity.faces import FaceModels, load_face_models
from engine.hashcache import sha256_of

# faces: SCRFD + ArcFace (engine.identity.faces); background: the staged rembg model (None when not
# staged); base / realism: diffusion pipelines (engine.diffusion.models); identity2: dlib's descriptor
# (engine.identity.second; None when not installed); landmarks: 2d106det + dlib's 68 points (engine.identity.landmarks);
# inpaint: an inpainting pipeline (models.inpaint; "base": the base pipeline's components);
# faceid: the IP-Adapter-FaceID folder (engine.identity.faceid; loaded into the base pipeline per block).
MODEL_ROLES = ("faces", "background", "base", "realism", "inpaint", "identity2", "landmarks", "faceid")
DIFFUSION_ROLES = ("base", "realism", "inpaint")  # the roles that are diffusion models, each of a family (engine.diffusion.families)


class Resources:
    """Models loaded once per process and shared by every job."""

    def __init__(self, settings: Settings, demo: bool = False) -> None:
        self.settings = settings
        self.demo = demo
        self._faces: FaceModels | None = None
        self._background: BackgroundRemover | None = None
        self._background_key: tuple[int, int, int] | None = None  # the staged file's (size, mtime, inode) when loaded
        self._pipelines: dict[str, Any] = {}
        self._img2img: list[tuple[Any, Any]] = []  # (pipeline, its image-to-image pipeline)
        self._identity2: Any = None
        self._landmarks: Any = None
        self._sealer: Any = None
        self._credentials: Any = None

    # ------------------------------------------------------------------ by role

    def model(self, role: str) -> Any:
        """The loaded model of `role` (None for `background` or `identity2` when not available)."""
        if role == "faces":
            return self.faces()
        if role == "background":
            return self.background()
        if role in ("base", "realism", "inpaint"):
            return self.pipeline(role)
        if role == "identity2":
            return self.identity2()
        if role == "landmarks":
            return self.landmarks()
        if role == "faceid":
            return self.faceid_folder()
        raise ValueError(f"unknown model role {role!r}; roles are {', '.join(MODEL_ROLES)}")

    def hashes(self, role: str) -> dict[str, str]:
        """sha256 of every file of the model of `role`, keyed as the manifest lists them
        ('<role>/<file>'; rembg/<file> for the background remover); {} for a `background` or
        `identity2` model that is not there. Each file is hashed once per content (engine.hashcache)."""
        if role == "faces":
            return self.faces().hashes()
        if role == "background":  # hashed, not loaded: a prepare skipped on a resume needs no remover session
            path = self.background_model_path()
            if _file_key(path) is None:
                return {}
            return {f"rembg/{path.name}": sha256_of(path, self.settings.models_dir)}
        if role == "inpaint" and self.inpaint_from_base():
            return self.hashes("base")  # the same files
        if role in ("base", "realism", "inpaint"):
            from engine.diffusion.models import model_files_hashes

            return {f"{role}/{name}": digest for name, digest in model_files_hashes(self.model_ref(role)).items()}
        if role == "identity2":
            from engine.identity import second as identity2
            files, _ = identity2.locate()
            return identity2.model_hashes(files) if files is not None else {}
        if role == "landmarks":
            return self.landmarks().hashes()
        if role == "faceid":
            from engine.identity.faceid import WEIGHTS

            return {f"faceid/{WEIGHTS}": sha256_of(self.faceid_folder() / WEIGHTS, self.settings.models_dir)}
        raise ValueError(f"unknown model role {role!r}; roles are {', '.join(MODEL_ROLES)}")

    # ------------------------------------------------------------------ each model

    def faces(self) -> FaceModels:
        if self._faces is None:
            s = self.settings.faces
            self._faces = load_face_models(
                self.settings.models_dir, s.pack, require_pack=s.require_pack, detect_size=s.detect_size,
                detect_threshold=s.detect_threshold, providers=s.providers, threads=s.threads,
            )
        return self._faces

    def background_model_path(self) -> Path:
        return staged_model_path(self.settings.models_dir, self.settings.background.model)

    def background(self) -> BackgroundRemover | None:
        """The rembg remover, or None when no model is staged (the caller decides what that means).
        Loaded again when the staged file changes (a lab stages or replaces it while the daemon
        runs): the remover used and the hash recorded are always of the file there now."""
        path = self.background_model_path()
        key = _file_key(path)
        if key is None:
            self._background = None
            return None
        if self._background is None or self._background_key != key:
            self._background = BackgroundRemover(path, threads=self.settings.faces.threads)
            self._background_key = key
        return self._background

    def model_ref(self, role: str) -> Any:
        """Where the `base` or `realism` model is (ConfigError naming what to stage where).

        With demo on, both are the tiny generated model: it is never used otherwise."""
        from engine.diffusion.models import resolve_model

        models = self.settings.models
        name, config = {"base": (models.base, models.base_config), "realism": (models.realism, models.realism_config),
                        "inpaint": (models.inpaint, models.inpaint_config)}[role]
        return resolve_model(name, config, self.settings, demo=self.demo, role=role)

    def family(self, role: str) -> str:
        """The family (engine.diffusion.families: "sd", "sdxl") of the diffusion model of `role`, read
        from its model_index.json, nothing loaded; ConfigError where it is not staged."""
        from engine.diffusion.models import model_family

        return model_family(self.model_ref("base" if role == "inpaint" and self.inpaint_from_base() else role)).name

    def inpaint_from_base(self) -> bool:
        """models.inpaint = "base": the base pipeline's components as an inpainting pipeline
        (`from_pipe`; the demo model has a 9-channel twin of its own instead)."""
        from engine.diffusion.models import INPAINT_FROM_BASE

        return not self.demo and self.settings.models.inpaint.strip() == INPAINT_FROM_BASE

    def pipeline(self, role: str = "base") -> Any:
        """The loaded diffusion pipeline of `role`, loaded once per process (demo: the realism
        role is the base pipeline itself; inpaint = "base": the base pipeline's components)."""
        if role not in self._pipelines:
            if role == "realism" and self.demo:
                self._pipelines[role] = self.pipeline("base")
            elif role == "inpaint" and self.inpaint_from_base():
                from engine.diffusion.families import family_of

                base = self.pipeline("base")
                inpainting = family_of(base).inpaint_from(base)  # the family's inpainting pipeline on the base's components
                inpainting.set_progress_bar_config(disable=True)
                self._pipelines[role] = inpainting
            else:
                from engine.diffusion.models import load_pipeline

                self._pipelines[role] = load_pipeline(self.model_ref(role), self.settings)
        return self._pipelines[role]

    def img2img(self, pipe: Any) -> Any:
        """The image-to-image pipeline on `pipe`'s components (`from_pipe`: no second copy of the
        weights; a LoRA loaded into `pipe` acts in it too), made once per pipeline."""
        for owner, image2image in self._img2img:
            if owner is pipe:
                return image2image
        from engine.diffusion.families import family_of

        image2image = family_of(pipe).img2img_from(pipe)
        image2image.set_progress_bar_config(disable=True)
        self._img2img.append((pipe, image2image))
        return image2image

    def identity2(self) -> Any:
        """The second identity model (engine.identity.second.SecondIdentityModel), loaded on first use;
        None when dlib or its model files are not installed."""
        if self._identity2 is None:
            from engine.identity import second as identity2
            files, _ = identity2.locate()
            self._identity2 = identity2.SecondIdentityModel(files) if files is not None else False
        return self._identity2 or None

    def faceid_folder(self) -> Path:
        """The FaceID adapter's folder (checked; demo: the tiny random adapter, built on demand),
        or ConfigError("model_missing") naming models.faceid."""
        from engine.identity import faceid
        if self.demo:
            return faceid.make_demo_faceid(Path(self.settings.models_dir) / faceid.DEMO_FACEID_NAME, self.pipeline("base"))
        name = self.settings.models.faceid.strip()
        if not name:
            raise ConfigError("model_missing", "models.faceid is not set: stage an IP-Adapter-FaceID folder (python -m engine models "
                                               "convert-faceid <file.bin> <models>/faceid) and name it there")
        folder = Path(name) if Path(name).is_absolute() else Path(self.settings.models_dir) / name
        faceid.check_folder(folder, "models.faceid")
        return folder

    def landmarks(self) -> Any:
        """The landmark models (engine.identity.landmarks.LandmarkModels), loaded on first use."""
        if self._landmarks is None:
            from engine.identity.faces import select_providers
            from engine.identity.landmarks import LandmarkModels

            self._landmarks = LandmarkModels(select_providers(self.settings.faces.providers), self.settings.faces.threads)
        return self._landmarks

    # ------------------------------------------------------------------ keys (through the signer)

    def sealer(self) -> Any:
        """Who seals this engine's jobs (engine.provenance.signer): with [trust] keys, a signer process this
        engine starts (the keys are read there, never in this process, which decodes photos and
        loads models); without, the same rules in this process, unsigned. ConfigError naming what
        is missing where; `[trust] require` refuses to go unsigned."""
        if self._sealer is None:
            from engine.provenance.signer import Sealer, start_signer

            folder = self.settings.keys_dir
            if folder is None:
                if self.settings.trust.require:
                    raise ConfigError("keys_missing", "[trust] require = true, but [trust] keys names no folder: make lab keys with "
                                                      "`python -m engine keys init --out DIR` and set [trust] keys = DIR")
                self._sealer = Sealer(None)
            else:
                self._sealer = start_signer(folder)
        return self._sealer

    def lab_public_key(self) -> Any:
        """The lab's audit key, its public half (from the signer's facts), or None without keys:
        what a resume checks the signer's witnesses with (engine.provenance.verification.trusted_records)."""
        from engine.provenance.trust import public_key_from_b64

        return public_key_from_b64(self.sealer().facts().get("public_key"))

    def trust_facts(self) -> dict[str, Any]:
        """Who signs this installation's records (for the audit log and the report; no secret in it)."""
        return dict(self.sealer().facts()["trust"])

    def credentials(self) -> Any:
        """The C2PA signer of generated images (engine.provenance.credentials), or None without keys."""
        if self._credentials is None:
            sealer = self.sealer()
            chain = sealer.facts().get("signer_chain_pem")
            if chain is None:
                self._credentials = False
            else:
                from engine.provenance.credentials import ContentCredentials

                self._credentials = ContentCredentials(chain.encode("ascii"), sealer.content_signature)
        return self._credentials or None


def _file_key(path: Path) -> tuple[int, int, int] | None:
    """(size, mtime, inode) of a staged file, or None when it is not there: what says it changed."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns, info.st_ino
