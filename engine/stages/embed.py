"""Stage 2, embed: a 512-D ArcFace embedding of every prepared image, the identity reference,
and the same-person check between the job's photos.

Faces are aligned on the keypoints that `prepare` mapped into each image (exact, no second
detection). The reference embedding is the normalised mean of the photos' `base` images;
augmentations are scored against their own photo's base as a robustness check. Photos whose
pairwise drift exceeds `embed.same_person_max_drift` are refused by name, never averaged in.
"""

from __future__ import annotations

import io
from itertools import combinations

import numpy as np

from engine import layout
from engine.context import StageContext
from engine.errors import JobError
from engine.identity.faces import drift, normalise
from engine.fsutil import atomic_write_bytes, atomic_write_json
from engine.images import read_rgb
from engine.schema import to_plain

NAME = "embed"
VERSION = 2  # 2: its models are declared (models()), the runner fingerprints them
OUTPUTS = (layout.EMBEDDING_DIR,)
MODELS = ("faces",)  # every model role it may use (engine.inventory checks them); models(ctx): this job's


def models(ctx: StageContext) -> tuple[str, ...]:
    return MODELS


def fingerprint(ctx: StageContext) -> dict[str, object]:
    return {"embed": to_plain(ctx.settings.embed)}


def run(ctx: StageContext) -> None:
    faces_model = ctx.use("faces")
    rows: list[dict[str, object]] = []
    vectors: list[np.ndarray] = []
    for image in layout.prepared_images(ctx.job_dir):
        rgb = read_rgb(ctx.path(image.file))
        vectors.append(faces_model.embed(rgb, np.asarray(image.keypoints, dtype=np.float32)))
        rows.append({"photo": image.photo, "file": image.file, "kind": image.kind})
    embeddings = np.stack(vectors).astype(np.float32)
    base_index = {row["photo"]: i for i, row in enumerate(rows) if row["kind"] == "base"}
    names = layout.photo_names(ctx.job_dir)

    pairwise = [
        {"photos": [a, b], "drift": round(drift(embeddings[base_index[a]], embeddings[base_index[b]]), 6)}
        for a, b in combinations(names, 2)
    ]
    limit = ctx.settings.embed.same_person_max_drift
    mismatched = [pair for pair in pairwise if pair["drift"] > limit]
    if mismatched:
        listing = "; ".join(f"{p['photos'][0]} vs {p['photos'][1]}: drift {p['drift']:.3f}" for p in mismatched)
        raise JobError(
            "identity_mismatch",
            f"the photos do not show the same person ({listing}; same-person limit {limit}, config embed.same_person_max_drift). "
            "Remove the photo of someone else and drop the folder again.",
            details={"pairwise": pairwise, "limit": limit},
        )

    reference = normalise(np.mean([embeddings[base_index[name]] for name in names], axis=0))
    for i, row in enumerate(rows):
        row["drift_to_reference"] = round(drift(reference, embeddings[i]), 6)
        row["drift_to_own_base"] = round(drift(embeddings[base_index[row["photo"]]], embeddings[i]), 6)
    _save_npy(ctx.path(layout.EMBEDDINGS_FILE), embeddings)
    _save_npy(ctx.path(layout.REFERENCE_FILE), reference)
    atomic_write_json(ctx.path(layout.EMBED_INFO), {
        "model": faces_model.files.pack,
        "dimensions": int(embeddings.shape[1]),
        "reference": "normalised mean of the base image of every photo",
        "images": rows,
        "pairwise": pairwise,
        "same_person_max_drift": limit,
    })
    worst = max(row["drift_to_own_base"] for row in rows)
    ctx.log.info("embedded", images=len(rows), photos=len(names), worst_augmentation_drift=worst)



def _save_npy(path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())
