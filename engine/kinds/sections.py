"""The spec sections several kinds share (engine.kinds): who the subject is ([subject]), how the
photos are prepared ([prepare]), how a LoRA is trained ([train] with its phases), the identity
methods, and `KindSpec`, the base of every kind's spec. A kind's own sections live in its module
(engine/kinds/<kind>.py); engine.job reads a job.toml into them.

Plain data with its schema rules (engine.schema); imports no kind and no stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import Problem
from engine.schema import Bool, Float, Int, ListOf, MapOf, Str, Table, Tables, rule

DEFAULT_KIND = "replicate"  # the kind of a job.toml without `kind` (engine.kinds.replicate)
MAX_PHOTOS = 3  # photos a job takes at most (a kind may take fewer: engine.kinds.Kind.max_photos)
# The sections every kind's spec has: who the subject is, and how the photos are prepared.
COMMON_SECTIONS = ("subject", "prepare")
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
SAFE_NAME_DOC = "use 1-64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit"


@dataclass(frozen=True)
class SubjectSpec:
    name: str = field(default="", metadata=rule(Str(pattern=SAFE_NAME, pattern_doc=SAFE_NAME_DOC)))
    photos: tuple[str, ...] = field(default=(), metadata=rule(ListOf(Str(min_len=1, max_len=255))))  # how many: the kind's max_photos (resolve_photos)
    # "auto": the largest face, refused when another face is nearly as large;
    # "largest": the largest face, whatever else is in the photo.
    face: str = field(default="auto", metadata=rule(Str(choices=("auto", "largest"))))
    # photo file name -> face number, counted left to right from 0 (overrides `face`).
    face_index: tuple[tuple[str, int], ...] = field(default=(), metadata=rule(MapOf(Int(0, 99))))


@dataclass(frozen=True)
class PrepareSpec:
    size: int = field(default=768, metadata=rule(Int(64, 2048)))
    remove_background: bool = field(default=True, metadata=rule(Bool()))
    rotations: tuple[float, ...] = field(default=(-10.0, 10.0), metadata=rule(ListOf(Float(-45, 45), 0, 8)))
    crops: tuple[float, ...] = field(default=(0.8, 0.6), metadata=rule(ListOf(Float(0.3, 1.0), 0, 8)))
    # Crop side = face box side x (1 + 2 x padding): 0.8 keeps head, hair and shoulders.
    padding: float = field(default=0.8, metadata=rule(Float(0.1, 3.0)))


@dataclass(frozen=True)
class PhaseSpec:
    name: str = field(default="", metadata=rule(Str(pattern=r"[A-Z][A-Z0-9_]{0,31}", pattern_doc="upper-case name like MID_FINE")))
    lr: float = field(default=1e-4, metadata=rule(Float(0.0, 1.0, low_open=True)))
    alpha: float = field(default=8.0, metadata=rule(Float(0.0, 1024.0, low_open=True)))
    loss: str = field(default="mse", metadata=rule(Str(choices=("mse", "huber", "charbonnier"))))
    optimizer: str = field(default="adamw", metadata=rule(Str(choices=("adamw", "adamp"))))
    min_steps: int = field(default=20, metadata=rule(Int(0, 100_000)))
    max_steps: int = field(default=400, metadata=rule(Int(1, 100_000)))


DEFAULT_PHASES = (
    PhaseSpec("COARSE", 1e-4, 8.0, "mse", "adamw", 50, 400),
    PhaseSpec("MID", 3e-5, 4.0, "huber", "adamw", 50, 400),
    PhaseSpec("MID_FINE", 1e-6, 2.0, "charbonnier", "adamp", 30, 200),  # 30: the first step the convergence test judges
    PhaseSpec("FINAL_FINE", 5e-7, 1.0, "charbonnier", "adamp", 30, 200),
)


@dataclass(frozen=True)
class TrainSpec:
    rank: int = field(default=8, metadata=rule(Int(1, 256)))
    max_steps: int = field(default=1200, metadata=rule(Int(1, 100_000)))  # hard cap over all phases
    phases: tuple[PhaseSpec, ...] = field(default=DEFAULT_PHASES, metadata=rule(Tables(PhaseSpec, 1, 8)))
    resolution: int = field(default=512, metadata=rule(Int(32, 2048)))
    batch_size: int = field(default=1, metadata=rule(Int(1, 64)))
    seed: int = field(default=0, metadata=rule(Int(0, 2**32 - 1)))
    checkpoint_every: int = field(default=50, metadata=rule(Int(1, 100_000)))
    # Steps whose losses stay on the device before they are read to the host at once and fed to the
    # convergence test (a read per step stalls a GPU's queue). 1: every step, as before; a phase exit
    # is then seen at the end of its block (the step it fired at is recorded). Blocks also end at a
    # checkpoint, a phase's max_steps and the total cap.
    sync_every: int = field(default=1, metadata=rule(Int(1, 1000)))
    # Convergence (engine/measure/convergence.py). improvement_bound: the loss on a fixed probe set of
    # `probe_size` (latent, noise, timestep) tuples, evaluated every `probe_every` steps; a phase has
    # converged when the upper `convergence_confidence` bound of its improvement over the next
    # `convergence_horizon` steps, from the slope of the probe losses of the last `plateau_window`
    # steps, is at most `convergence_epsilon` x their level (and diverges when the lower bound of
    # the rise is above it). no_visible_trend: the older rule, kept for comparison: the per-step
    # loss's slope over `plateau_window` steps has a p-value above `plateau_p_value`.
    convergence: str = field(default="improvement_bound", metadata=rule(Str(choices=("improvement_bound", "no_visible_trend"))))
    plateau_window: int = field(default=100, metadata=rule(Int(3, 10_000)))
    plateau_p_value: float = field(default=0.2, metadata=rule(Float(0.0, 0.999, low_open=True)))
    probe_size: int = field(default=8, metadata=rule(Int(1, 64)))
    probe_every: int = field(default=10, metadata=rule(Int(1, 1000)))
    convergence_horizon: int = field(default=100, metadata=rule(Int(1, 100_000)))
    convergence_epsilon: float = field(default=0.01, metadata=rule(Float(0.0, 1.0, low_open=True)))
    convergence_confidence: float = field(default=0.95, metadata=rule(Float(0.5, 0.9999, low_open=True)))
    trigger: str = field(default="sks person", metadata=rule(Str(min_len=1, max_len=64)))


CONTROL_GROUP = "control"  # seed discovery's and the evaluate grid's group with no adapter: never a group's name


IDENTITY_METHODS = ("lora", "faceid", "lora+faceid")


class IdentityMethod:
    """What a `method` field (one of IDENTITY_METHODS) asks for."""

    method: str

    @property
    def uses_lora(self) -> bool:
        return self.method != "faceid"

    @property
    def uses_faceid(self) -> bool:
        return "faceid" in self.method


@dataclass(frozen=True, kw_only=True)
class KindSpec:
    """What every kind's job.toml has: its kind (engine.kinds), who the subject is, how the photos
    are prepared. A kind's spec subclasses this with its own sections. `subject.name` and
    `subject.photos` are always filled in once loaded."""

    kind: str = field(default=DEFAULT_KIND, metadata=rule(Str(min_len=1, max_len=64)))
    subject: SubjectSpec = field(default_factory=SubjectSpec, metadata=rule(Table(SubjectSpec)))
    prepare: PrepareSpec = field(default_factory=PrepareSpec, metadata=rule(Table(PrepareSpec)))


@dataclass(frozen=True)
class LoraRun:
    """One LoRA the train stage trains (engine.kinds.Kind.lora_runs). `name` "" is the job's own
    LoRA, on every photo; a group's LoRA has its name and a subset of the photos. `snapshots`:
    phases whose LoRA is kept as it stood at their exit (no extra training step)."""

    name: str = ""
    photos: tuple[str, ...] = ()
    snapshots: tuple[str, ...] = ()

    @property
    def is_main(self) -> bool:
        return self.name == ""


def train_checks(train: TrainSpec, where: str) -> list[Problem]:
    """The checks between [train]'s keys, for every kind that trains (replicate, evaluate)."""
    return _phase_checks(train, where) + _convergence_checks(train, where)


def _phase_checks(train: TrainSpec, where: str) -> list[Problem]:
    problems: list[Problem] = []
    names = [p.name for p in train.phases]
    for i, phase in enumerate(train.phases):
        if phase.min_steps > phase.max_steps:
            problems.append(Problem(f"{where}: train.phases[{i}].min_steps", f"{phase.min_steps} is above max_steps {phase.max_steps}"))
        if names.count(phase.name) > 1:
            problems.append(Problem(f"{where}: train.phases[{i}].name", f"phase name {phase.name!r} is used twice"))
    if train.rank > 0 and not train.phases:
        problems.append(Problem(f"{where}: train.phases", "at least one phase is needed"))
    return problems


def _convergence_checks(train: TrainSpec, where: str) -> list[Problem]:
    """Settings under which a phase could never exit by convergence, or a min_steps that never
    acts: refused, not silently run to the step cap."""
    problems: list[Problem] = []
    if train.convergence == "improvement_bound":
        first_judged = 3 * train.probe_every  # the slope's error needs 3 probe losses
        if train.plateau_window // train.probe_every < 3:
            problems.append(Problem(f"{where}: train.plateau_window", f"{train.plateau_window} steps hold {train.plateau_window // train.probe_every} "
                                    f"probe losses at one every {train.probe_every} steps; the convergence test needs at least 3 "
                                    f"(plateau_window >= {first_judged})"))
    else:
        first_judged = train.plateau_window
    for i, phase in enumerate(train.phases):
        if phase.max_steps < first_judged:
            problems.append(Problem(f"{where}: train.phases[{i}].max_steps", f"phase {phase.name}: {phase.max_steps} steps end before the "
                                    f"convergence test first judges (step {first_judged}), so it could only stop at its cap"))
        elif 0 < phase.min_steps < first_judged:
            problems.append(Problem(f"{where}: train.phases[{i}].min_steps", f"phase {phase.name}: min_steps {phase.min_steps} never acts, as the "
                                    f"convergence test first judges at step {first_judged}; set 0 or at least {first_judged}"))
    return problems


def inside_folder(path: Path, root: Path) -> bool:
    """Whether `path`, its links resolved, is inside `root` (a resolved job folder): a file job.toml
    names is never read from elsewhere."""
    try:
        path.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):
        return False
    return True
