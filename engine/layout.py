"""Where each thing of a job is, inside its job folder: the one owner of the names of the files
in it (the job machinery's records, each stage's outputs, the report's page and charts: the code
that writes a file and every reader of it, the report, `status`, the audit, the daemon through
engine.jobfolder, name it from here), and typed access to the prepared images.

Names only: importing this pulls in nothing heavy, so readers of job folders can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# where a job is before it is published (engine.jobfolder has the rest of the job-folder vocabulary)
WORK_DIR = ".work"  # <outbox>/.work/<job-id>: a job while it runs
INCOMING_SUFFIX = ".incoming"  # a folder being filled before its publishing rename


def work_dir(outbox: Path, job_id: str) -> Path:
    return Path(outbox) / WORK_DIR / job_id


def failure_staging(failed_root: Path, subject: str, job_id: str) -> Path:
    """Where a failed job's folder is filled (and sealed) before its publishing rename into
    `failed/<subject>/<job-id>`: hidden, beside it."""
    return Path(failed_root) / subject / f".{job_id}{INCOMING_SUFFIX}"


# the job's records (engine.runner, engine.provenance.audit, engine.ledger, engine.provenance.trust, engine.jobfolder)
INPUTS_DIR = "inputs"  # the dropped folder, copied and verified before anything reads it
ERROR_FILE = "error.json"
AUDIT_FILE = "audit.jsonl"
MANIFEST_FILE = "manifest.json"
LEDGER_FILE = "state.json"
SIGNATURE_FILE = "signature.json"  # the signed head of a published or failed job (engine.provenance.trust)
WITNESS_FILE = "audit.witness"  # the signer's signatures over the audit chain's head as it grew (engine.provenance.audit.AuditLog.witness)
DAMAGED_AUDIT_PREFIX = AUDIT_FILE + ".damaged-"  # an audit chain broken before its end, set aside (engine.provenance.audit.set_aside_damaged): evidence, kept
# the report (engine.report): the page, its charts, display copies of the input photos
REPORT_FILE = "report.html"
REPORT_DIR = "report"
ORIGINAL_PATTERN = f"{REPORT_DIR}/original_{{index}}.png"  # written once, by the runner; kept by regeneration
DRIFT_CHART = f"{REPORT_DIR}/drift.png"
LOSS_CHART = f"{REPORT_DIR}/loss.png"
EVALUATE_CHARTS = {"prompts": f"{REPORT_DIR}/evaluate_prompts.png", "no_face": f"{REPORT_DIR}/evaluate_no_face.png",
                   "groups": f"{REPORT_DIR}/evaluate_groups.png", "heatmap": f"{REPORT_DIR}/evaluate_heatmap.png"}
MINE_CHART = f"{REPORT_DIR}/mine.png"
# prepare
PREPARED_DIR = "prepared"
PREPARE_INFO = "prepared/prepare.json"
# embed
EMBEDDING_DIR = "embedding"
EMBEDDINGS_FILE = "embedding/embeddings.npy"
REFERENCE_FILE = "embedding/reference.npy"
EMBED_INFO = "embedding/embed.json"
# train
LORA_DIR = "lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers writes and reads in a LoRA folder
LORA_FILE = f"{LORA_DIR}/{LORA_WEIGHTS}"
LORA_PHASES_DIR = "lora/phases"  # the job's LoRA as it stood at a phase's exit (an evaluate group asks for it)
LORA_GROUPS_DIR = "lora/groups"  # an evaluate photo-subset group's own LoRA
TRAIN_DIR = "train"
TRAIN_INFO = "train/train.json"
LOSS_FILE = "train/loss.csv"
CHECKPOINTS_DIR = "checkpoints"
# The job's LoRA run's checkpoint generations: <prefix>-<step:06d>.safetensors + .json (engine.diffusion.training).
# (Older engines wrote pickles, checkpoints/train.pt and group_<name>.pt: never read.)
CHECKPOINT_PREFIX = "checkpoints/train"
# verify
VERIFY_DIR = "verify"
VERIFY_INFO = "verify/verify.json"
# render
RENDERS_DIR = "renders"
DRIFT_REPORT_JSON = "drift_report.json"
DRIFT_REPORT_CSV = "drift_report.csv"
# retouch
RETOUCH_DIR = "retouch"
RETOUCH_INFO = "retouch/retouch.json"
RETOUCH_CSV = "retouch/retouch.csv"
RETOUCH_MASKS_DIR = "retouch/masks"
RETOUCH_OVERLAY = f"{RETOUCH_MASKS_DIR}/overlay.png"  # every region's feathered alpha over the photo
RETOUCH_VARIANTS_DIR = "retouch/variants"
RETOUCH_GRIDS_DIR = "retouch/grids"
RETOUCH_PROGRESS_DIR = "retouch_progress"  # finished variants of an interrupted sweep (scratch)
# restore
RESTORE_DIR = "restore"
RESTORE_INFO = "restore/restore.json"
RESTORE_CSV = "restore/restore.csv"
RESTORE_COVERAGE = "restore/coverage.json"
RESTORE_MASK = "restore/mask.png"
RESTORE_OVERLAY = "restore/overlay.png"
RESTORE_CLASSICAL = "restore/classical_fill.png"  # on_refuse = "classical": the TELEA fill, non-generative
RESTORE_VARIANTS_DIR = "restore/variants"
# evaluate
EVALUATE_DIR = "evaluate"
EVALUATE_INFO = "evaluate/evaluate.json"
EVALUATE_CSV = "evaluate/evaluate.csv"
EVALUATE_CELLS_DIR = "evaluate/cells"
EVALUATE_SHEETS_DIR = "evaluate/sheets"
EVALUATE_PROGRESS_DIR = "evaluate_progress"  # finished batches of an interrupted grid (scratch)
# mine
MINE_DIR = "mine"
MINE_INFO = "mine/mine.json"
MINE_CANDIDATES_DIR = "mine/candidates"
MINE_PROGRESS_DIR = "mine_progress"  # finished batches of interrupted mining (scratch)
# The folders whose PNGs a model generated (each carries C2PA Content Credentials with lab keys).
GENERATED_IMAGE_DIRS = (VERIFY_DIR, RENDERS_DIR, RETOUCH_VARIANTS_DIR, RESTORE_VARIANTS_DIR, EVALUATE_CELLS_DIR, MINE_CANDIDATES_DIR)


def phase_lora_dir(phase: str) -> str:
    return f"{LORA_PHASES_DIR}/{phase}"


def group_lora_dir(group: str) -> str:
    return f"{LORA_GROUPS_DIR}/{group}"


def group_checkpoint(group: str) -> str:
    """The prefix of a photo-subset group's checkpoint generations (as CHECKPOINT_PREFIX)."""
    return f"{CHECKPOINTS_DIR}/group_{group}"


def group_loss_file(group: str) -> str:
    return f"{TRAIN_DIR}/loss_{group}.csv"


def retouch_grid(region_set: str) -> str:
    """The sweep of a region set (its regions joined by "+"): strength rows x seed columns."""
    return f"{RETOUCH_GRIDS_DIR}/{region_set}.png"


def evaluate_sheet(group: str) -> str:
    return f"{EVALUATE_SHEETS_DIR}/{group}.png"


@dataclass(frozen=True)
class PreparedImage:
    """One training image prepare wrote: whose photo, which file, which kind ("base" or an
    augmentation), and the face's five keypoints in it."""

    photo: str
    file: str
    kind: str
    keypoints: tuple[tuple[float, float], ...]

    @property
    def is_base(self) -> bool:
        return self.kind == "base"


def prepared_images(job_dir: Path) -> list[PreparedImage]:
    """Every prepared image of the job, in prepare.json's order (photo by photo)."""
    info = json.loads((Path(job_dir) / PREPARE_INFO).read_text("utf-8"))
    return [PreparedImage(photo["name"], image["file"], image["kind"], tuple(tuple(point) for point in image.get("keypoints", ())))
            for photo in info["photos"] for image in photo["images"]]


def photo_names(job_dir: Path) -> list[str]:
    """The job's photos, in prepare.json's order."""
    return [photo["name"] for photo in json.loads((Path(job_dir) / PREPARE_INFO).read_text("utf-8"))["photos"]]


def reference_embedding(job_dir: Path) -> Any:
    """The identity reference embedding embed wrote (a float32 numpy vector)."""
    import numpy as np

    return np.load(Path(job_dir) / REFERENCE_FILE, allow_pickle=False)


def seed_selection(job_dir: Path) -> dict[str, Any]:
    """What verify found: verify.json (status, best and locked seed, threshold, every candidate)."""
    return json.loads((Path(job_dir) / VERIFY_INFO).read_text("utf-8"))


def chosen_face(job_dir: Path, photo_index: int = 0) -> dict[str, Any]:
    """The subject's face in photo `photo_index` as prepare found it, in the photo's own pixels:
    {"box": [x1, y1, x2, y2], "score": ..., "keypoints": 5 x [x, y]}."""
    photo = json.loads((Path(job_dir) / PREPARE_INFO).read_text("utf-8"))["photos"][photo_index]
    return photo["faces"][photo["chosen_face"]]
