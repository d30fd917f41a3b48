"""report.html: the job's evidence for a person to look at, made from the job folder alone.

Timeline: original photos -> prepared crops -> seed candidates (LoRA beside control, drift
under each, locked seed and faces-not-found marked) -> renders per pass; loss curves of every
training phase with its exit reason and step; a drift chart (LoRA vs control, threshold line);
the second identity model's distances and where it disagrees with ArcFace; settings, model
hashes, software versions; the audit chain's head hash.

Files (all inside the job folder, all listed in manifest.json):
    report.html               images by relative path, CSS inline, no script, no network
    report/drift.png          matplotlib (Agg) charts, also shown in the page
    report/loss.png
    report/original_<n>.png   display copies of the input photos (written once, by the runner)

Byte-identical regeneration: `python -m engine report <job>` rebuilds the same bytes from the
same folder, so the manifest stays valid. Nothing here reads a clock; every list is in a fixed
order; plots use matplotlib's default style, fixed DPI and no PNG "Software" metadata. The audit
head shown is the hash of the last line before `job_finished` (the line that seals the
manifest, which lists this report), so it is the same when the report is made and when it is
regenerated.
"""

from __future__ import annotations

import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import numpy as np

from engine import layout
from engine.audit import AUDIT_FILE, MANIFEST_FILE
from engine.fsutil import atomic_write_bytes, sha256_bytes, sha256_file
from engine.kinds import DEFAULT_KIND, Kind, kind_named

REPORT_FILE = "report.html"
ASSETS_DIR = "report"
DRIFT_CHART = "report/drift.png"
LOSS_CHART = "report/loss.png"
ORIGINAL_PATTERN = "report/original_{index}.png"
ORIGINAL_MAX_SIDE = 1024  # px: display copies only; the inputs' sha256 are in the manifest
CHART_DPI = 100
PASS_ORDER = {"anchor": 0, "scene": 1, "rescue": 2, "realism": 1}


# ---------------------------------------------------------------------------- entry points

def write_report(job_dir: Path, originals: Iterable[tuple[str, Path]] | None = None) -> dict[str, str]:
    """Write report.html and its charts into `job_dir`; returns {relative path: sha256}.

    `originals` ((name, path) of each input photo, in job order) is given by the runner, which
    still has the inputs: their display copies are written first, and kept by regeneration."""
    job_dir = Path(job_dir)
    if originals is not None:
        _write_originals(job_dir, list(originals))
    files = build_report(job_dir)
    for rel, data in files.items():
        atomic_write_bytes(job_dir / rel, data)
    return {rel: sha256_bytes(data) for rel, data in files.items()}


@dataclass
class Regenerated:
    written: list[Path] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # listed in the manifest with these very bytes
    conflicts: list[str] = field(default_factory=list)  # would change a file the manifest lists, or add an unlisted one

    @property
    def ok(self) -> bool:
        return not self.conflicts


def regenerate_report(job_dir: Path, out_dir: Path | None = None) -> Regenerated:
    """Rebuild the report of a job folder (finished or not).

    Into the job folder itself only where that keeps its manifest true: a finished job's
    report must come out byte-identical (else nothing is written and `conflicts` says which
    file differs). With `out_dir` the report is written there instead, linking back to the
    job's images."""
    job_dir = Path(job_dir).resolve()
    result = Regenerated()
    if out_dir is not None:
        out_dir = Path(out_dir).resolve()
        link = os.path.relpath(job_dir, out_dir).replace(os.sep, "/") + "/"
        for rel, data in build_report(job_dir, link_to_job=link).items():
            atomic_write_bytes(out_dir / rel, data)
            result.written.append(out_dir / rel)
        return result
    files = build_report(job_dir)
    manifest_path = job_dir / MANIFEST_FILE
    if manifest_path.is_file():
        listed = json.loads(manifest_path.read_text("utf-8")).get("outputs", {})
        for rel, data in files.items():
            if listed.get(rel) == sha256_bytes(data):
                result.unchanged.append(rel)
            else:
                why = "differs from the manifest" if rel in listed else "is not in the manifest"
                result.conflicts.append(f"{rel} {why}")
        if result.conflicts:
            return result
    for rel, data in files.items():
        if not ((job_dir / rel).is_file() and sha256_file(job_dir / rel) == sha256_bytes(data)):
            atomic_write_bytes(job_dir / rel, data)
        result.written.append(job_dir / rel)
    return result


def build_report(job_dir: Path, link_to_job: str = "") -> dict[str, bytes]:
    """{relative path: bytes} of report.html and the charts of its kind's sections; the same
    folder gives the same bytes."""
    facts = JobFacts.read(Path(job_dir))
    files = {rel: chart(facts) for name in facts.kind.report for rel, chart in SECTIONS[name][1].items()}
    files[REPORT_FILE] = render_html(facts, link_to_job).encode("utf-8")
    return files


# ---------------------------------------------------------------------------- reading the job

@dataclass
class JobFacts:
    """Everything the report shows, read from the job folder (missing parts stay None/empty)."""

    job_dir: Path
    prepare: dict[str, Any] | None
    embed: dict[str, Any] | None
    train: dict[str, Any] | None
    loss: list[tuple[str, int, int, float]]
    verify: dict[str, Any] | None
    drift_report: dict[str, Any] | None
    audit: list[dict[str, Any]]  # the lines up to (not including) the last job_finished
    originals: dict[int, str]  # photo index -> relative path of its display copy
    retouch: dict[str, Any] | None = None
    restore: dict[str, Any] | None = None
    evaluate: dict[str, Any] | None = None
    mine: dict[str, Any] | None = None

    @classmethod
    def read(cls, job_dir: Path) -> "JobFacts":
        originals = {}
        for index in range(64):
            rel = ORIGINAL_PATTERN.format(index=index)
            if (job_dir / rel).is_file():
                originals[index] = rel
        return cls(
            job_dir=job_dir,
            prepare=_json(job_dir / layout.PREPARE_INFO),
            embed=_json(job_dir / layout.EMBED_INFO),
            train=_json(job_dir / layout.TRAIN_INFO),
            loss=_loss_rows(job_dir / layout.LOSS_FILE),
            verify=_json(job_dir / layout.VERIFY_INFO),
            drift_report=_json(job_dir / layout.DRIFT_REPORT_JSON),
            retouch=_json(job_dir / layout.RETOUCH_INFO),
            restore=_json(job_dir / layout.RESTORE_INFO),
            evaluate=_json(job_dir / layout.EVALUATE_INFO),
            mine=_json(job_dir / layout.MINE_INFO),
            audit=_audit_before_finish(job_dir / AUDIT_FILE),
            originals=originals,
        )

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list((self.drift_report or {}).get("renders", []))

    @property
    def threshold(self) -> float | None:
        selection = (self.drift_report or {}).get("seed_selection") or {}
        return (self.verify or {}).get("threshold", selection.get("threshold"))

    def first(self, event: str) -> dict[str, Any] | None:
        return next((line for line in self.audit if line.get("event") == event), None)

    def starts(self) -> list[dict[str, Any]]:
        return [line for line in self.audit if line.get("event") in ("job_started", "job_resumed")]

    @property
    def job_id(self) -> str:
        return str((self.drift_report or {}).get("job_id") or (self.audit[0].get("job_id") if self.audit else self.job_dir.name))

    @property
    def subject(self) -> str:
        start = self.first("job_started") or {}
        return str((self.drift_report or {}).get("subject") or start.get("subject") or self.job_dir.parent.name)

    @property
    def kind(self) -> Kind:
        """The job's kind, from its job_started line (older jobs have none: replicate)."""
        start = self.first("job_started") or {}
        return kind_named(str(start.get("kind") or DEFAULT_KIND))

    @property
    def demo(self) -> bool:
        start = self.first("job_started") or {}
        return bool((self.drift_report or {}).get("demo", start.get("demo", False)))


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def _loss_rows(path: Path) -> list[tuple[str, int, int, float, float | None]]:
    """(phase, step, phase step, loss, probe loss or None) per row of train/loss.csv (older
    files have no probe_loss column)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text("utf-8").splitlines()[1:]:
        if line.strip():
            phase, step, phase_step, loss, *rest = line.split(",")
            probe = float(rest[0]) if rest and rest[0] else None
            rows.append((phase, int(step), int(phase_step), float(loss), probe))
    return rows


def _audit_before_finish(path: Path) -> list[dict[str, Any]]:
    """The audit lines the report can know of: all of them up to the last `job_finished`
    (excluded); a torn or unreadable line ends the reading."""
    if not path.is_file():
        return []
    lines: list[dict[str, Any]] = []
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            lines.append(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError):
            break
    finished = [i for i, line in enumerate(lines) if line.get("event") == "job_finished"]
    return lines[: finished[-1]] if finished else lines


def _write_originals(job_dir: Path, originals: list[tuple[str, Path]]) -> None:
    """Display copies of the input photos (upright, at most ORIGINAL_MAX_SIDE px)."""
    import cv2

    from engine.images import load_photo, png_bytes

    assets = job_dir / ASSETS_DIR
    if assets.is_dir():
        for stale in sorted(assets.glob("original_*.png")):
            stale.unlink()
    for index, (name, path) in enumerate(originals):
        rgb = load_photo(Path(path), name, max_pixels=1 << 40).rgb  # already accepted by prepare
        scale = ORIGINAL_MAX_SIDE / max(rgb.shape[:2])
        if scale < 1.0:
            rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        text = {"source": name, "sha256": sha256_file(Path(path)), "note": f"display copy for {REPORT_FILE}, at most {ORIGINAL_MAX_SIDE} px"}
        atomic_write_bytes(job_dir / ORIGINAL_PATTERN.format(index=index), png_bytes(rgb, text))


# ---------------------------------------------------------------------------- charts

def _figure(width: float, height: float, *, left: float = 0.8, right: float = 2.2, top: float = 0.6, bottom: float = 0.7,
            hspace: float = 0.6, wspace: float = 0.25):
    """A matplotlib figure on the Agg canvas (no pyplot, no global backend switch), with fixed
    margins in inches (legends go in the right margin). Fixed rather than constrained layout:
    it halves the drawing time and cannot move with the data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=CHART_DPI)
    figure.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height, hspace=hspace, wspace=wspace)
    FigureCanvasAgg(figure)
    return figure


def _png(draw) -> bytes:
    """Run `draw()` (which returns a Figure) under matplotlib's default style and fixed
    settings, and encode it as PNG with no metadata that could change between runs."""
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context({"svg.hashsalt": "engine-report", "font.family": "DejaVu Sans"}):
        figure = draw()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=CHART_DPI, metadata={"Software": None})
    return buffer.getvalue()


VERIFY_GROUP_COLOURS = {"lora": "tab:blue", "control": "tab:gray", "faceid": "tab:orange", "lora+faceid": "tab:green"}
VERIFY_GROUP_TITLES = {"lora": "LoRA", "control": "control", "faceid": "FaceID", "lora+faceid": "LoRA + FaceID"}
VERIFY_GROUP_HEADINGS = {"lora": "with LoRA", "control": "control (no LoRA)", "faceid": "FaceID (no LoRA)", "lora+faceid": "LoRA + FaceID"}


def _verify_groups(verify: dict[str, Any] | None) -> list[str]:
    """The groups seed discovery rendered (verify.json before [identity]: LoRA and control)."""
    return list((verify or {}).get("groups") or ("lora", "control"))


def drift_chart_png(facts: JobFacts) -> bytes:
    """Seed candidates (LoRA vs control) and renders per pass, ArcFace drift against the
    lock threshold; and the second model's distances against its tolerances."""

    def draw():
        figure = _figure(11, 10, top=0.8, bottom=1.3)
        seeds_axis, renders_axis, second_axis = figure.subplots(3, 1)
        threshold = facts.threshold
        candidates = (facts.verify or {}).get("candidates", [])
        locked_seed = (facts.verify or {}).get("locked_seed")
        groups = _verify_groups(facts.verify)
        top = _axis_top([c[g]["drift"] for c in candidates for g in groups] + [r["drift"] for r in facts.rows])
        positions = np.arange(len(candidates), dtype=float)
        offsets = np.linspace(-0.15, 0.15, len(groups)) if len(groups) > 1 else [0.0]
        for offset, group in zip(offsets, groups):
            colour = VERIFY_GROUP_COLOURS.get(group, "tab:purple")
            found = [(p + offset, c[group]["drift"]) for p, c in zip(positions, candidates) if c[group]["drift"] is not None]
            missing = [p + offset for p, c in zip(positions, candidates) if c[group]["drift"] is None]
            if found:
                seeds_axis.scatter(*zip(*found), color=colour, marker="o", label=f"{group}: ArcFace drift", zorder=3)
            if missing:
                _no_face_marks(seeds_axis, missing, colour, f"{group}: no face found (no drift)")
        seeds_axis.set_xticks(positions, [f"{c['seed']}{' (locked)' if c['seed'] == locked_seed else ''}" for c in candidates],
                              rotation=45 if len(candidates) > 12 else 0)
        seeds_axis.set_xlabel("seed")
        seeds_axis.set_title("Seed candidates: " + " vs ".join(VERIFY_GROUP_TITLES.get(g, g) for g in groups) + " (no adapter)")
        render_rows = [r for r in facts.rows if r.get("kind") == "render"]
        render_positions = np.arange(len(render_rows), dtype=float)
        found = [(p, r["drift"]) for p, r in zip(render_positions, render_rows) if r["drift"] is not None]
        missing = [p for p, r in zip(render_positions, render_rows) if r["drift"] is None]
        if found:
            renders_axis.scatter(*zip(*found), color="tab:blue", marker="o", label="ArcFace drift", zorder=3)
        if missing:
            _no_face_marks(renders_axis, missing, "tab:red", "no face found (no drift)")
        renders_axis.set_xticks(render_positions, [_render_label(r) for r in render_rows], rotation=45 if len(render_rows) > 8 else 0, fontsize=8)
        renders_axis.set_title("Renders per pass")
        for axis in (seeds_axis, renders_axis):
            if threshold is not None:
                axis.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"lock threshold {threshold:g}")
            axis.set_ylim(0.0, top)
            axis.set_ylabel("drift (1 - cosine)")
            axis.set_xlim(-0.6, max(len(axis.get_xticks()), 1) - 0.4)
            axis.grid(axis="y", alpha=0.3)
            _legend(axis)
        _draw_second_model(second_axis, facts)
        if facts.demo:
            figure.suptitle("demo model: random weights, renders are noise", color="tab:red")
        return figure

    return _png(draw)


def _no_face_marks(axis, positions: list[float], colour: str, label: str) -> None:
    """Images without a face have no drift: mark them in a strip above the plot area (x in data,
    y in axes coordinates), never at a drift value someone could read off the scale."""
    from matplotlib.transforms import blended_transform_factory

    axis.scatter(positions, [1.04] * len(positions), color=colour, marker="x", label=label, zorder=3, clip_on=False,
                 transform=blended_transform_factory(axis.transData, axis.transAxes))


def _draw_second_model(axis, facts: JobFacts) -> None:
    from engine.identity2 import STRICT_TOLERANCE, TOLERANCE

    rows = facts.rows
    measured = [(i, r) for i, r in enumerate(rows) if r.get("identity2_distance") is not None]
    axis.set_title("Second identity model (dlib 128-D): distance to the reference; never used to choose seeds")
    axis.axhline(TOLERANCE, color="tab:orange", linestyle="--", linewidth=1, label=f"same person (dlib) {TOLERANCE}")
    axis.axhline(STRICT_TOLERANCE, color="tab:green", linestyle=":", linewidth=1, label=f"strict {STRICT_TOLERANCE}")
    if measured:
        for disagree, colour, label in ((False, "tab:blue", "dlib distance"), (True, "tab:red", "dlib distance, models disagree")):
            points = [(i, r["identity2_distance"]) for i, r in measured if bool(r.get("models_disagree")) == disagree]
            if points:
                axis.scatter(*zip(*points), color=colour, marker="o", label=label, zorder=3)
        axis.set_ylim(0.0, max(1.0, max(r["identity2_distance"] for _, r in measured) * 1.1))
    else:
        axis.set_ylim(0.0, 1.0)
        axis.text(0.5, 0.5, "nothing measured: no face found in any render", transform=axis.transAxes, ha="center", va="center", color="tab:gray")
    axis.set_xticks(np.arange(len(rows), dtype=float), [_short_label(r) for r in rows], rotation=90, fontsize=7)
    axis.set_xlim(-0.6, max(len(rows), 1) - 0.4)
    axis.set_ylabel("distance (Euclidean)")
    axis.grid(axis="y", alpha=0.3)
    _legend(axis)


def loss_chart_png(facts: JobFacts) -> bytes:
    """All phases on one axis (phase exits marked with reason and step), then one panel per
    phase on its own scale."""
    phases = (facts.train or {}).get("phases", [])

    def draw():
        panels = max(1, len(phases))
        rows = 1 + (panels + 1) // 2
        figure = _figure(11, 3.2 * rows, right=1.4, top=0.5, bottom=0.6, hspace=0.5)
        grid = figure.add_gridspec(rows, 2)
        overview = figure.add_subplot(grid[0, :])
        colours = [f"C{i % 10}" for i in range(len(phases))]
        for colour, phase in zip(colours, phases):
            points = [(step, loss) for name, step, _, loss, _ in facts.loss if name == phase["name"]]
            if points:
                overview.plot(*zip(*points), color=colour, linewidth=1.2, label=phase["name"])
            if phase.get("steps"):
                overview.axvline(phase["last_step"], color=colour, linestyle="--", linewidth=0.8)
                overview.annotate(f"{phase['name']}: {phase['exit_reason']} @ {phase['last_step']}", xy=(phase["last_step"], 0.98),
                                  xycoords=("data", "axes fraction"), rotation=90, ha="right", va="top", fontsize=7, color=colour)
        overview.set_title("Training loss, every phase (dashed: phase exit, with reason and step)")
        overview.set_xlabel("step")
        overview.set_ylabel("loss")
        overview.grid(alpha=0.3)
        if phases:
            _legend(overview)
        else:
            overview.text(0.5, 0.5, f"no training record ({layout.TRAIN_INFO})", transform=overview.transAxes, ha="center", va="center")
        for index, (colour, phase) in enumerate(zip(colours, phases)):
            axis = figure.add_subplot(grid[1 + index // 2, index % 2])
            points = [(phase_step, loss) for name, _, phase_step, loss, _ in facts.loss if name == phase["name"]]
            probes = [(phase_step, probe) for name, _, phase_step, _, probe in facts.loss if name == phase["name"] and probe is not None]
            if points:
                axis.plot(*zip(*points), color=colour, linewidth=1.2, alpha=0.5 if probes else 1.0, label="step loss")
                if probes:  # the signal the convergence test judges
                    axis.plot(*zip(*probes), color="black", marker="o", markersize=2.5, linewidth=1.0, label="probe loss")
                    axis.legend(loc="best", fontsize=7)  # inside: outside it would cover the panel beside it
            else:
                axis.text(0.5, 0.5, f"not run ({phase['exit_reason']})", transform=axis.transAxes, ha="center", va="center", color="tab:gray")
            axis.set_title(f"{phase['name']}: lr {phase['lr']:g}, alpha {phase['alpha']:g}, {phase['loss']}, {phase['optimizer']}", fontsize=9)
            axis.set_xlabel(f"phase step; {phase['exit_reason']} at step {phase['last_step']} ({phase['steps']} steps{_p_value(phase)})", fontsize=8)
            axis.grid(alpha=0.3)
        return figure

    return _png(draw)


def _legend(axis) -> None:
    """A legend outside the plot, on the right, so that it never hides a point."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _axis_top(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return max(1.0, max(present) * 1.1) if present else 1.0


def _p_value(phase: dict[str, Any]) -> str:
    summary = phase.get("summary") or {}
    if summary.get("improvement_upper") is not None and summary.get("allowed") is not None:
        return f"; bound {summary['improvement_upper']:.2g} vs {summary['allowed']:.2g}"
    return f", slope p={summary['p_value']:.3f}" if summary.get("p_value") is not None else ""


def _render_label(row: dict[str, Any]) -> str:
    return f"r{row['render']}.{row['output']} {row['pass']}"


def _short_label(row: dict[str, Any]) -> str:
    if row.get("kind", "").startswith("verify"):
        return f"seed {row['seed']} {row['pass']}"
    return _render_label(row)


# ---------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1rem 2rem;color:#1d1d1f;background:#fff}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.demo{background:#fde8e8;border:2px solid #c62828;padding:.6rem 1rem;font-weight:600}
.summary{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:1rem 0}
.summary dt{font-weight:600} .summary dd{margin:0}
.row{display:flex;flex-wrap:wrap;gap:.8rem;align-items:flex-start;margin:.6rem 0}
figure{margin:0;padding:.4rem;border:1px solid #ddd;border-radius:4px;background:#fafafa}
figure img{display:block;width:192px;height:auto;image-rendering:auto}
figure.chart img{width:100%;max-width:1000px}
figure.locked{border:3px solid #2e7d32} figure.noface{border-color:#c62828}
figcaption{font-size:.8rem;line-height:1.35;max-width:192px;word-wrap:break-word}
figure.chart figcaption{max-width:none}
.photo{position:relative;display:inline-block} .photo img{width:320px}
.box{position:absolute;border:2px solid #9e9e9e} .box.chosen{border-color:#2e7d32} .box.crop{border:2px dashed #1565c0}
.badge{display:inline-block;padding:0 .35rem;border-radius:3px;font-size:.75rem;font-weight:600;color:#fff;background:#555}
.badge.locked{background:#2e7d32} .badge.noface{background:#c62828} .badge.disagree{background:#e65100} .badge.best{background:#1565c0}
table{border-collapse:collapse;margin:.6rem 0} td,th{border:1px solid #ddd;padding:.3rem .5rem;vertical-align:top;text-align:left;font-size:.9rem}
pre{background:#f5f5f5;padding:.6rem;overflow:auto;max-height:30rem;font-size:.8rem}
code{font-size:.85rem} .muted{color:#666}
"""


def render_html(facts: JobFacts, link_to_job: str = "") -> str:
    """The page. `link_to_job` prefixes links to the job's own images (when written elsewhere)."""
    def job_src(rel: str) -> str:
        return _attr(link_to_job + quote(rel))

    title = facts.kind.title or f"{facts.kind.name} report"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(title)}: {_text(facts.subject)} / {_text(facts.job_id)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{_text(title)}: {_text(facts.subject)}</h1>",
        f'<p class="muted">job <code>{_text(facts.job_id)}</code>; made from the job folder alone '
        f"(<code>python -m engine report &lt;job folder&gt;</code> rebuilds it byte for byte)</p>",
    ]
    if facts.demo:
        parts.append('<p class="demo" id="demo-warning">Demo model: random weights. The renders are noise, no face is found in them, '
                     "and their drifts mean nothing. This report shows the chain works, not an identity.</p>")
    fallback = _face_models(facts).get("fallback")
    if fallback:
        parts.append(f'<p class="demo" id="face-pack-fallback">Face pack: {_text(fallback)}.</p>')
    for name in facts.kind.report:
        parts += SECTIONS[name][0](facts, job_src)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary(facts: JobFacts) -> list[str]:
    selection = (facts.drift_report or {}).get("seed_selection") or {key: (facts.verify or {}).get(key) for key in
                                                                      ("status", "reason", "best_seed", "best_drift", "locked_seed", "threshold")}
    second = (facts.drift_report or {}).get("identity2") or {}
    head, lines = _head(facts)
    items = [
        ("seed selection", f"{selection.get('status') or 'not run'}: {selection.get('reason') or ''}"),
        ("locked seed", _maybe(selection.get("locked_seed"))),
        ("best seed / drift", f"{_maybe(selection.get('best_seed'))} / {_number(selection.get('best_drift'))}"),
        ("lock threshold (ArcFace drift)", _maybe(selection.get("threshold"))),
        ("images scored (a face found)", f"{sum(1 for row in facts.rows if row.get('face_found'))} of {len(facts.rows)} rendered"),
        ("faces not found", str((facts.drift_report or {}).get("faces_not_found", "—"))),
        ("second model disagreements", _second_summary(second)),
        ("audit head at report time", f"{head} (line {lines})"),
    ]
    out = ['<dl class="summary" id="summary">']
    out += [f"<dt>{_text(key)}</dt><dd>{_text(value)}</dd>" for key, value in items]
    out.append("</dl>")
    return out


def _face_models(facts: JobFacts) -> dict[str, Any]:
    """The face models of the latest run (its job_started / job_resumed line)."""
    starts = facts.starts()
    return ((starts[-1] if starts else {}).get("models") or {}).get("faces") or {}


def _second_summary(second: dict[str, Any]) -> str:
    if not second:
        return "not recorded"
    if not second.get("available"):
        return f"not measured: {second.get('reason')}"
    if not second.get("measured"):
        return f"nothing measured: {second.get('note', 'no face')}"
    return f"{second['disagreements']} of {second['measured']} measured images"


def _timeline(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="timeline"><h2>1. Original photos and prepared crops</h2>']
    if not facts.prepare:
        return out + [f"<p>No prepare record ({layout.PREPARE_INFO}).</p></section>"]
    drift_of = {row["file"]: row for row in (facts.embed or {}).get("images", [])}
    for index, photo in enumerate(facts.prepare["photos"]):
        out.append(f'<h3>{_text(photo["name"])} <span class="muted">sha256 {_text(photo["sha256"])}</span></h3><div class="row">')
        if index in facts.originals:
            out.append(_original_figure(photo, job_src(facts.originals[index]), facts.originals[index]))
        else:
            out.append(f'<p class="muted">original not kept in the job folder (sha256 {_text(photo["sha256"])}).</p>')
        for image in photo["images"]:
            embedded = drift_of.get(image["file"], {})
            caption = [f"<b>{_text(image['kind'])}</b> (rotation {image['angle']:g}°, crop {image['scale']:g})",
                       f"ArcFace drift to reference {_number(embedded.get('drift_to_reference'))}"]
            out.append(_figure_html(job_src(image["file"]), image["file"], "prepared", caption))
        out.append("</div>")
        background = photo.get("background", {})
        out.append(f'<p class="muted">background: {_text(background.get("method"))} {_text(background.get("reason", ""))}; '
                   f"faces found: {len(photo['faces'])}, subject: #{photo['chosen_face']}</p>")
    pairwise = (facts.embed or {}).get("pairwise") or []
    if pairwise:
        out.append("<p>Same-person check between photos (ArcFace drift): " +
                   "; ".join(f"{_text(p['photos'][0])} vs {_text(p['photos'][1])}: {_number(p['drift'])}" for p in pairwise) + "</p>")
    return out + ["</section>"]


def _original_figure(photo: dict[str, Any], src: str, file: str) -> str:
    width, height = photo["decode"]["size"]
    boxes = []
    for number, face in enumerate(photo["faces"]):
        x1, y1, x2, y2 = face["box"]
        boxes.append(_box(x1, y1, x2 - x1, y2 - y1, width, height, "box chosen" if number == photo["chosen_face"] else "box"))
    crop = photo.get("crop")
    if crop:
        (cx, cy), side = crop["center"], crop["side"]
        boxes.append(_box(cx - side / 2, cy - side / 2, side, side, width, height, "box crop"))
    caption = [f"<b>original</b> {width}×{height} px (display copy)", "green: subject's face; grey: other faces; dashed: crop"]
    return (f'<figure class="original" data-kind="original" data-file="{_attr(file)}"><div class="photo"><img src="{src}" alt="original {_attr(photo["name"])}">{"".join(boxes)}</div>'
            f"<figcaption>{'<br>'.join(caption)}</figcaption></figure>")


def _box(x: float, y: float, w: float, h: float, width: int, height: int, css: str) -> str:
    return (f'<div class="{css}" style="left:{100 * x / width:.3f}%;top:{100 * y / height:.3f}%;'
            f'width:{100 * w / width:.3f}%;height:{100 * h / height:.3f}%"></div>')


def _seeds(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="seeds"><h2>2. Seed candidates (seed discovery)</h2>']
    verify = facts.verify
    if not verify:
        return out + [f"<p>No verify record ({layout.VERIFY_INFO}).</p></section>"]
    rows = {(row["kind"], row["seed"]): row for row in facts.rows if row.get("kind", "").startswith("verify")}
    rank = {seed: number for number, seed in enumerate(verify.get("ranking", []), start=1)}
    groups = _verify_groups(verify)
    method = verify.get("method", "lora")
    not_found = ", ".join(f"{VERIFY_GROUP_TITLES.get(g, g)} {verify['faces_not_found'][g]}" for g in groups)
    out.append(f"<p>Prompt <code>{_text(verify['prompt'])}</code>, {verify['steps']} steps, CFG {verify['guidance']:g}, "
               f"{verify['resolution']} px; batches {_text(json.dumps(verify['batch_layout']))}. Seeds are ranked by ArcFace drift of "
               f"the {_text(VERIFY_GROUP_TITLES.get(method, method))} render; the best is locked when its drift is at most {verify['threshold']:g}. "
               f"{_text(verify['status'])}: {_text(verify['reason'])}. Faces not found: {_text(not_found)}.</p>")
    if verify.get("faceid_note"):
        out.append('<p class="warning" id="faceid-note">' + _text(verify["faceid_note"]) + "</p>")
    out.append('<table id="seed-table"><tr><th>seed</th>' + "".join(f"<th>{_text(VERIFY_GROUP_HEADINGS.get(g, g))}</th>" for g in groups) + "</tr>")
    for candidate in verify["candidates"]:
        seed = candidate["seed"]
        marks = []
        if seed == verify.get("locked_seed"):
            marks.append('<span class="badge locked">LOCKED</span>')
        elif seed == verify.get("best_seed"):
            marks.append('<span class="badge best">rendered from (not locked)</span>')
        if seed in rank:
            marks.append(f'<span class="muted">rank {rank[seed]}</span>')
        cells = []
        for group in groups:
            result = candidate[group]
            row = rows.get((f"verify_{group}", seed), {})
            css = "locked" if group == method and seed == verify.get("locked_seed") else ""
            cells.append("<td>" + _scored_figure(job_src(result["file"]), result["file"], "candidate", css, f"seed {seed}, {group}", result["drift"],
                                                 result["face_found"], row) + "</td>")
        out.append(f"<tr><td><b>{seed}</b><br>{' '.join(marks)}</td>{''.join(cells)}</tr>")
    return out + ["</table></section>"]


def _drift(facts: JobFacts) -> list[str]:
    caption = ("ArcFace drift (1 − cosine to the reference embedding) of every seed candidate, each group beside the control, and of every render "
               "pass; dashed red: the lock threshold; ×: no face found (never scored as 0 or 1). Bottom: the second model's distance "
               "(red: disagrees with ArcFace).")
    return ['<section id="drift"><h2>3. Drift chart</h2>',
            _figure_html(_attr(quote(DRIFT_CHART)), DRIFT_CHART, "chart", [_text(caption)], "drift"), "</section>"]


def _renders(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="renders"><h2>4. Renders per pass</h2>']
    renders = [row for row in facts.rows if row.get("kind") == "render"]
    if not renders:
        return out + [f"<p>No renders ({layout.DRIFT_REPORT_JSON}).</p></section>"]
    selection = (facts.drift_report or {}).get("seed_selection", {})
    out.append(f"<p>Rendered from seed {_maybe(selection.get('best_seed'))} ({_text(selection.get('status'))}).</p>")
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in renders:
        groups.setdefault((row["render"], row["output"]), []).append(row)
    for (entry, output), passes in sorted(groups.items()):
        first = passes[0]
        negative = passes[-1].get("negative_prompt")
        shown_negative = f"; negative: {_text(negative or '(none)')}" if negative is not None else ""
        out.append(f"<h3>render {entry}, output {output} <span class=\"muted\">{_text(first['mode'])}: {_text(passes[-1]['prompt'])}"
                   f"{shown_negative}</span></h3>")
        out.append('<div class="row">')
        for row in sorted(passes, key=lambda r: PASS_ORDER.get(r["pass"], 9)):
            out.append(_scored_figure(job_src(row["file"]), row["file"], "render", "", f"{row['pass']} (seed {row['seed']})", row["drift"], row["face_found"], row))
        out.append("</div>")
    return out + ["</section>"]


def _second_model(facts: JobFacts) -> list[str]:
    second = (facts.drift_report or {}).get("identity2")
    out = ['<section id="identity2"><h2>5. Second identity model</h2>']
    if not second:
        return out + [f"<p>Not recorded ({layout.DRIFT_REPORT_JSON} has no second-model record).</p></section>"]
    out.append(f"<p>{_text(second['model'])}: {_text(second['distance'])}. Reference: {_text(second['reference'])}. "
               f"Same person by dlib's tolerance at most {second['tolerance']:g}, by a strict one at most {second['strict_tolerance']:g}. "
               f"Used for seed selection: {'yes' if second.get('used_for_seed_selection') else 'no'} (measured after the seed was locked).</p>")
    out.append(f"<p>Disagreement: {_text(second['disagreement_rule'])}.</p>")
    if not second.get("available"):
        return out + [f'<p class="demo">Not measured: {_text(second.get("reason"))}</p></section>']
    note = f"; {second['note']}" if second.get("note") else ""
    out.append(f"<p>Measured {second.get('measured', 0)} of {len(facts.rows)} images{_text(note)}.</p>")
    flagged = [row for row in facts.rows if row.get("models_disagree")]
    if flagged:
        out.append('<table id="disagreements"><tr><th>image</th><th>ArcFace drift</th><th>dlib distance</th><th>reading</th></tr>')
        threshold = facts.threshold
        for row in flagged:
            if threshold is not None and row["drift"] <= threshold:
                reading = f"ArcFace: within the lock threshold {threshold:g}; dlib: another person (> {second['tolerance']:g})"
            else:
                reading = f"ArcFace: beyond the lock threshold {_maybe(threshold)}; dlib: same person even by the strict {second['strict_tolerance']:g}"
            out.append(f"<tr><td>{_text(row['file'])}</td><td>{_number(row['drift'])}</td><td>{_number(row['identity2_distance'])}</td>"
                       f"<td>{_text(reading)}</td></tr>")
        out.append("</table>")
    else:
        out.append('<p id="disagreements">No image where the two models disagree.</p>')
    return out + ["</section>"]


def _training(facts: JobFacts) -> list[str]:
    out = ['<section id="training"><h2>6. Training</h2>']
    out.append(_figure_html(_attr(quote(LOSS_CHART)), LOSS_CHART, "chart",
                            [_text("Loss of every training phase; each phase ends when its probe loss has converged (or diverges), at its step cap, or at the job's total cap.")], "loss"))
    train = facts.train
    if not train:
        return out + [f"<p>No training record ({layout.TRAIN_INFO}).</p></section>"]
    if train.get("main_trained") is False:
        out.append(f"<p>{_text(train.get('why'))}.</p>")
    out.append(f"<p>Caption <code>{_text(train['caption'])}</code>, rank {train['rank']}, {train['resolution']} px, "
               f"{train['total_steps']} of at most {train['max_steps']} steps"
               f"{_resumes(facts)}.</p>")
    files = train.get("lora_files") or {}
    if files:
        out.append(f'<p id="lora-files">The LoRA, trigger word <code>{_text(train.get("trigger"))}</code> (put it in the prompt): '
                   f'<code>{_text(files.get("diffusers"))}</code> for diffusers (<code>pipe.load_lora_weights</code>); '
                   f'<code>{_text(files.get("kohya"))}</code>, the same LoRA in kohya\'s format, for AUTOMATIC1111/Forge, ComfyUI, '
                   "InvokeAI and Fooocus (its metadata names this job, the subject, the trigger word and the base model's sha256).</p>")
    out.append('<table id="phases"><tr><th>phase</th><th>lr</th><th>alpha</th><th>loss</th><th>optimizer</th><th>steps</th>'
               "<th>exit reason</th><th>at step</th><th>probe loss</th><th>improvement bound / allowed</th><th>slope p-value</th></tr>")
    for phase in train["phases"]:
        summary = phase.get("summary") or {}
        bound = (f"{_number(summary.get('improvement_upper'), 4)} / {_number(summary.get('allowed'), 4)}"
                 if summary.get("allowed") is not None else "—")
        out.append(f"<tr><td>{_text(phase['name'])}</td><td>{phase['lr']:g}</td><td>{phase['alpha']:g}</td><td>{_text(phase['loss'])}</td>"
                   f"<td>{_text(phase['optimizer'])}</td><td>{phase['steps']}</td><td>{_text(phase['exit_reason'])}</td>"
                   f"<td>{phase['last_step']}</td><td>{_number(summary.get('probe_loss'), 4)}</td><td>{bound}</td>"
                   f"<td>{_number(summary.get('p_value'), 3)}</td></tr>")
    return out + ["</table></section>"]


def _resumes(facts: JobFacts) -> str:
    """The text ', resumed from step 50, 100', from the audit log's train_resumed lines
    (train.json keeps no run history, so that a resumed job's files equal an uninterrupted one's)."""
    steps = [str(line.get("step")) for line in facts.audit if line.get("event") == "train_resumed"]
    return f", resumed from step {', '.join(steps)}" if steps else ""


def _settings(facts: JobFacts) -> list[str]:
    import matplotlib

    out = ['<section id="settings"><h2>7. Settings, models and software</h2>']
    starts = facts.starts()
    latest = starts[-1] if starts else {}
    models: dict[str, str] = {}
    for line in facts.audit:
        if line.get("event") == "stage_finished":
            models.update(line.get("models") or {})
    second = (facts.drift_report or {}).get("identity2") or {}
    models.update(second.get("sha256") or {})
    out.append("<h3>Model files (sha256)</h3><table id=\"models\"><tr><th>model file</th><th>sha256</th></tr>")
    out += [f"<tr><td>{_text(name)}</td><td><code>{_text(digest)}</code></td></tr>" for name, digest in sorted(models.items())]
    out.append("</table>")
    faces = _face_models(facts)
    if faces:
        providers = faces.get("providers") or []
        if isinstance(providers, dict):  # what each onnxruntime session got; older audits hold a list: what was asked for
            providers = sorted({name for session in providers.values() for name in session})
        out.append(f"<p>Face models: {_text(faces.get('pack'))} on {_text(', '.join(providers))}.</p>")
    runs = []
    for start in starts:
        if not runs or runs[-1][1] != start.get("versions"):
            runs.append((f"{start['event']} {start.get('ts', '')}", start.get("versions") or {}))
    extra = {f"identity2: {name}": version for name, version in (second.get("versions") or {}).items()}
    extra["report: matplotlib"] = matplotlib.__version__
    packages = sorted({name for _, versions in runs for name in versions})
    out.append("<h3>Software versions</h3><table id=\"versions\"><tr><th>package</th>" +
               "".join(f"<th>{_text(label)}</th>" for label, _ in runs) + "</tr>")
    out += [f"<tr><td>{_text(name)}</td>" + "".join(f"<td>{_text(versions.get(name, '—'))}</td>" for _, versions in runs) + "</tr>" for name in packages]
    out += [f"<tr><td>{_text(name)}</td><td colspan=\"{max(1, len(runs))}\">{_text(version)}</td></tr>" for name, version in sorted(extra.items())]
    out.append("</table>")
    stages = [line for line in facts.audit if line.get("event") in ("stage_finished", "stage_skipped")]
    if stages:
        out.append("<h3>Stages</h3><table id=\"stages\"><tr><th>stage</th><th>event</th><th>seconds</th><th>at (UTC)</th></tr>")
        out += [f"<tr><td>{_text(line.get('stage'))}</td><td>{_text(line['event'])}</td><td>{_maybe(line.get('seconds'))}</td><td>{_text(line.get('ts'))}</td></tr>"
                for line in stages]
        out.append("</table>")
    for title, key, opened in (("Job (job.toml with defaults)", "spec", " open"), ("Settings (config.toml with defaults)", "settings", ""),
                               ("Device", "device", "")):
        if key in latest:
            out.append(f"<details{opened}><summary>{_text(title)}</summary><pre>{_text(json.dumps(latest[key], indent=2, sort_keys=True, ensure_ascii=False))}</pre></details>")
    return out + ["</section>"]


def _audit(facts: JobFacts) -> list[str]:
    head, lines = _head(facts)
    starts = facts.starts()
    trust = (starts[-1] if starts else {}).get("trust") or {}
    if trust.get("signed"):
        signer = (f'<p id="signer">Signed by the lab: audit key <code>{_text(trust.get("key_fingerprint"))}</code> (Ed25519) signs this job\'s '
                  f"head in <code>signature.json</code> and its line in the outbox's journal; every generated image carries C2PA Content "
                  f"Credentials signed by <code>{_text(trust.get('content_signer'))}</code> under the lab CA <code>{_text(trust.get('lab_ca'))}</code>.</p>")
    else:
        signer = ('<p id="signer"><b>UNSIGNED.</b> No lab key was configured ([trust] keys): the records below are hash-chained, which shows '
                  "an edited byte, but someone who can write the share could rewrite them consistently; the images carry no Content "
                  "Credentials.</p>")
    return ['<section id="audit"><h2>8. Audit chain and signatures</h2>',
            f'<p>Head of <code>{AUDIT_FILE}</code> when this report was made: <code id="audit-head">{head}</code> (line {lines}). '
            f"The next line, <code>job_finished</code>, holds the sha256 of <code>{MANIFEST_FILE}</code>, which lists this report "
            "and its charts. Check the chain, every file, the signature and the images' credentials: "
            "<code>python -m engine verify-audit &lt;job folder&gt; --trusted-key audit-signing.pub.pem --trusted-ca lab-ca.cert.pem</code>; "
            "the whole outbox: <code>python -m engine verify-journal &lt;outbox&gt;</code>.</p>", signer,
            "</section>"]


def _head(facts: JobFacts) -> tuple[str, int]:
    return (facts.audit[-1].get("hash", "—"), len(facts.audit)) if facts.audit else ("—", 0)


def _scored_figure(src: str, file: str, kind: str, css: str, title: str, drift: float | None, face_found: bool, row: dict[str, Any]) -> str:
    caption = [f"<b>{_text(title)}</b>"]
    if face_found:
        caption.append(f"ArcFace drift <b>{_number(drift)}</b>")
    else:
        caption.append('<span class="badge noface">no face found</span>')
        css += " noface"
    if row.get("identity2_distance") is not None:
        caption.append(f"dlib distance {_number(row['identity2_distance'])} ({_text(row.get('identity2_verdict'))})")
    if row.get("models_disagree"):
        caption.append('<span class="badge disagree">models disagree</span>')
    if row.get("credentials"):
        caption.append(f'<span class="muted">C2PA Content Credentials: {_text(row["credentials"])}</span>')
    return _figure_html(src, file, kind, caption, css)


def _figure_html(src: str, file: str, kind: str, caption: list[str], css: str = "") -> str:
    """One image with its caption (HTML, already escaped). `kind` (data-kind) says what it is:
    prepared, candidate, render or chart."""
    classes = f"{kind} {css}".strip()
    return (f'<figure class="{_attr(classes)}" data-kind="{_attr(kind)}" data-file="{_attr(file)}"><img src="{src}" alt="{_attr(file)}">'
            f"<figcaption>{'<br>'.join(caption)}<br><span class=\"muted\">{_text(file)}</span></figcaption></figure>")


def _number(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _maybe(value: Any) -> str:
    return "—" if value is None else str(value)


def _text(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=False)


def _attr(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# ---------------------------------------------------------------------------- retouch

def _retouch_summary(facts: JobFacts) -> list[str]:
    info = facts.retouch or {}
    head, lines = _head(facts)
    marks = info.get("landmarks") or {}
    regions = info.get("regions") or []
    items = [
        ("variants", f"{len(info.get('variants', []))}: {info.get('accepted', 0)} accepted, {info.get('rejected', 0)} rejected"),
        ("region sets", ", ".join(info.get("region_sets", [])) or "none applicable"),
        ("not applicable", "; ".join(f"{r['region']}: {r['reason']}" for r in regions if not r.get("applicable")) or "none"),
        ("landmarks", f"106 points, checked by {marks.get('check') or 'nothing'}: disagreement {_number(marks.get('disagreement_iod'), 3)} IOD"
                      + (" — UNCERTAIN, check the masks by eye" if marks.get("uncertain") else "")),
        ("strengths x seeds", f"{info.get('strengths')} x {info.get('seeds')}, {info.get('compositing')} compositing"),
        ("audit head at report time", f"{head} (line {lines})"),
    ]
    out = ['<dl class="summary" id="summary">']
    out += [f"<dt>{_text(key)}</dt><dd>{_text(value)}</dd>" for key, value in items]
    return out + ["</dl>"]


def _retouch_masks(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="retouch-masks"><h2>Region masks</h2>']
    info = facts.retouch
    if not info:
        return out + [f"<p>No retouch record ({layout.RETOUCH_INFO}).</p></section>"]
    overlay = f"{layout.RETOUCH_MASKS_DIR}/overlay.png"
    out.append('<div class="row">' + _figure_html(job_src(overlay), overlay, "mask", [_text("every region's feathered alpha over the photo")]) + "</div>")
    out.append('<table id="regions"><tr><th>region</th><th>applicable</th><th>drawn px</th><th>kept (skin, unprotected)</th><th>why not</th></tr>')
    for region in info.get("regions", []):
        out.append(f"<tr><td>{_text(region['region'])}</td><td>{'yes' if region['applicable'] else 'no'}</td><td>{region['drawn_px']}</td>"
                   f"<td>{_number(region['kept'], 2)}</td><td>{_text(region['reason'])}</td></tr>")
    return out + ["</table></section>"]


def _retouch_grids(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="retouch-grids"><h2>Sweeps: strength rows x seed columns</h2>']
    for name in (facts.retouch or {}).get("region_sets", []):
        grid = f"{layout.RETOUCH_GRIDS_DIR}/{name}.png"
        out.append(_figure_html(job_src(grid), grid, "grid", [_text(f"{name}: drift, texture kept and ΔE2000 under each variant; red: rejected")]))
    return out + ["</section>"]


def _retouch_variants(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="retouch-variants"><h2>Variants</h2>',
           '<table id="variants"><tr><th>region set</th><th>strength</th><th>seed</th><th>steps</th><th>drift</th><th>dlib distance</th><th>texture kept</th>'
           "<th>ΔE2000</th><th>landmark shift (IOD)</th><th>outside the mask</th><th>verdict</th></tr>"]
    for row in (facts.retouch or {}).get("variants", []):
        verdict = "accepted" if row["accepted"] else "rejected: " + "; ".join(row["reasons"])
        texture = _number(row["texture_ratio"], 2) + ("" if row["texture_measurable"] else " (not judged)")
        out.append(f"<tr><td>{_text('+'.join(row['region_set']))}</td><td>{row['strength']:g}</td><td>{row['seed']}</td><td>{row['denoising_steps']}</td>"
                   f"<td>{_number(row['drift'])}</td><td>{_number(row.get('identity2_distance'))}</td><td>{_text(texture)}</td><td>{_number(row['delta_e'], 2)}</td>"
                   f"<td>{_number(row['landmark_shift_iod'], 3)}</td><td>{row['changed_outside_mask_px']} px changed</td><td>{_text(verdict)}</td></tr>")
    out.append("</table>")
    accepted = [row for row in (facts.retouch or {}).get("variants", []) if row["accepted"]]
    if accepted:
        out.append('<div class="row">' + "".join(_figure_html(job_src(row["file"]), row["file"], "variant",
                                                              [_text(f"{'+'.join(row['region_set'])} s {row['strength']:g} seed {row['seed']}")])
                                               for row in accepted) + "</div>")
    return out + ["</section>"]


# ---------------------------------------------------------------------------- restore

def _restore_summary(facts: JobFacts) -> list[str]:
    info = facts.restore or {}
    head, lines = _head(facts)
    cover = info.get("coverage") or {}
    items = [
        ("verdict", f"{info.get('verdict', 'not run')}: " + ("; ".join(info.get("reasons") or []) or "within every limit")),
        ("face covered by the mask", f"{_number(cover.get('face_coverage'), 3)}"),
        ("features covered", f"{_number(cover.get('feature_coverage'), 3)} (" + ", ".join(f"{k} {v:.2f}" for k, v in (cover.get("features") or {}).items()) + ")"),
        ("generative", "no: the TELEA fill alone (classical)" if info.get("generative") is False else "yes"),
        ("identity", info.get("identity") or "—"),
        ("seed spread (hallucination index)", _number(info.get("seed_spread"))),
        ("audit head at report time", f"{head} (line {lines})"),
    ]
    out = ['<dl class="summary" id="summary">']
    out += [f"<dt>{_text(key)}</dt><dd>{_text(value)}</dd>" for key, value in items]
    return out + ["</dl>"]


def _restore_variants(facts: JobFacts, job_src) -> list[str]:
    info = facts.restore or {}
    out = ['<section id="restore-variants"><h2>Mask and variants</h2><div class="row">',
           _figure_html(job_src(layout.RESTORE_OVERLAY), layout.RESTORE_OVERLAY, "mask", [_text(f"the damage mask {info.get('mask')} over the photo")])]
    if info.get("classical_fill"):
        out.append(_figure_html(job_src(info["classical_fill"]), info["classical_fill"], "classical", [_text("TELEA fill: not generative")]))
    for row in info.get("variants", []):
        caption = [_text(f"seed {row['seed']}: drift to the references {_number(row['drift_to_references'])}"
                         + (" — FARTHER than the damaged photo" if row.get("farther_than_damaged") else "")),
                   _text(f"{row['changed_outside_mask_px']} px changed outside the mask")]
        out.append(_figure_html(job_src(row["file"]), row["file"], "variant", caption))
    return out + ["</div></section>"]


# ---------------------------------------------------------------------------- evaluate

EVALUATE_CHARTS = {"prompts": "report/evaluate_prompts.png", "no_face": "report/evaluate_no_face.png",
                   "groups": "report/evaluate_groups.png", "heatmap": "report/evaluate_heatmap.png"}
GROUP_COLOURS = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _grid(facts: JobFacts) -> tuple[dict[str, Any], list[str], list[str]]:
    info = facts.evaluate or {}
    return info, [group["name"] for group in info.get("groups", [])], list(info.get("prompts", []))


def _evaluate_title(figure, facts: JobFacts, title: str) -> None:
    figure.suptitle(title + (" — demo model: random weights, cells are noise" if facts.demo else ""), color="tab:red" if facts.demo else "black")


def _per_prompt_axis(axis, prompts: int, ylabel: str) -> None:
    """The x axis of a chart with one slot per prompt (p0, p1...: the table names them), a bar per group in each."""
    axis.set_xticks(range(prompts), [f"p{p}" for p in range(prompts)])
    axis.set_xlim(-0.6, max(prompts, 1) - 0.4)
    axis.set_xlabel("prompt (the table names them)")
    axis.set_ylabel(ylabel)
    axis.grid(axis="y", alpha=0.3)
    _legend(axis)


def evaluate_prompts_png(facts: JobFacts) -> bytes:
    """Mean drift per prompt x group (error bars: one standard deviation over the faces found);
    a (group, prompt) without any face has no bar, and says so."""

    def draw():
        info, groups, prompts = _grid(facts)
        figure = _figure(11, 4.5)
        axis = figure.subplots()
        rows = {(row["group"], row["prompt_index"]): row for row in info.get("by_prompt", [])}
        width = 0.8 / max(len(groups), 1)
        for g, (group, colour) in enumerate(zip(groups, GROUP_COLOURS * 4)):
            for p in range(len(prompts)):
                row = rows.get((group, p), {})
                x = p - 0.4 + width * (g + 0.5)
                if row.get("mean") is None:
                    axis.text(x, 0.01, "no face", rotation=90, ha="center", va="bottom", fontsize=7, color=colour)
                    continue
                axis.bar(x, row["mean"], width * 0.9, yerr=row.get("sd") or 0.0, color=colour, capsize=3,
                         label=f"{group}" if p == min(i for i in range(len(prompts)) if rows.get((group, i), {}).get("mean") is not None) else None)
        if info.get("threshold") is not None:
            axis.axhline(info["threshold"], color="tab:red", linestyle="--", linewidth=1, label=f"lock threshold {info['threshold']:g}")
        axis.set_ylim(0.0, _axis_top([row.get("mean") for row in rows.values()] + [info.get("threshold")]))
        _per_prompt_axis(axis, len(prompts), "mean drift (1 - cosine)")
        _evaluate_title(figure, facts, "Average drift per prompt and group (faces found only)")
        return figure

    return _png(draw)


def evaluate_no_face_png(facts: JobFacts) -> bytes:
    """Faces not found per prompt x group, out of the seeds rendered."""

    def draw():
        info, groups, prompts = _grid(facts)
        figure = _figure(11, 4)
        axis = figure.subplots()
        rows = {(row["group"], row["prompt_index"]): row for row in info.get("by_prompt", [])}
        width = 0.8 / max(len(groups), 1)
        for g, (group, colour) in enumerate(zip(groups, GROUP_COLOURS * 4)):
            counts = [rows.get((group, p), {}).get("faces_not_found", 0) for p in range(len(prompts))]
            axis.bar([p - 0.4 + width * (g + 0.5) for p in range(len(prompts))], counts, width * 0.9, color=colour, label=group)
        seeds = len(info.get("seeds", []))
        axis.set_ylim(0, max(seeds, 1))
        _per_prompt_axis(axis, len(prompts), f"faces not found (of {seeds} seeds)")
        _evaluate_title(figure, facts, "Faces not found per prompt and group (counted, never scored)")
        return figure

    return _png(draw)


def evaluate_groups_png(facts: JobFacts) -> bytes:
    """Each group's drifts over every cell with a face: box and points."""

    def draw():
        info, groups, _ = _grid(facts)
        figure = _figure(11, 4.5)
        axis = figure.subplots()
        cells = info.get("cells", [])
        values = [[row["drift"] for row in cells if row["group"] == group and row["drift"] is not None] for group in groups]
        for g, (drifts, colour) in enumerate(zip(values, GROUP_COLOURS * 4)):
            if drifts:
                axis.boxplot([drifts], positions=[g], widths=0.5, showfliers=False)
                jitter = np.linspace(-0.15, 0.15, len(drifts)) if len(drifts) > 1 else [0.0]
                axis.scatter([g + j for j in jitter], drifts, color=colour, s=14, zorder=3)
            else:
                axis.text(g, 0.02, "no face found", ha="center", va="bottom", fontsize=8, color=colour)
        if info.get("threshold") is not None:
            axis.axhline(info["threshold"], color="tab:red", linestyle="--", linewidth=1, label=f"lock threshold {info['threshold']:g}")
        counts = {row["group"]: row for row in info.get("by_group", [])}
        axis.set_xticks(range(len(groups)), [f"{group}\n{counts.get(group, {}).get('faces_found', 0)}/{counts.get(group, {}).get('cells', 0)} faces"
                                             for group in groups])
        axis.set_xlim(-0.6, max(len(groups), 1) - 0.4)
        axis.set_ylim(0.0, _axis_top([d for drifts in values for d in drifts] + [info.get("threshold")]))
        axis.set_ylabel("drift (1 - cosine)")
        axis.grid(axis="y", alpha=0.3)
        _legend(axis)
        _evaluate_title(figure, facts, "Drift per group (every cell with a face)")
        return figure

    return _png(draw)


def evaluate_heatmap_png(facts: JobFacts) -> bytes:
    """A prompt x seed heatmap per group (one colour scale); cells without a face are grey and crossed."""

    def draw():
        info, groups, prompts = _grid(facts)
        seeds = list(info.get("seeds", []))
        if not (groups and prompts and seeds):
            figure = _figure(11, 2)
            figure.text(0.5, 0.5, f"no grid recorded ({layout.EVALUATE_INFO})", ha="center", va="center")
            return figure
        panels = len(groups)
        figure = _figure(11, 1.2 + panels * (0.45 * max(len(prompts), 1) + 0.9), right=1.4, hspace=0.9)
        axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
        cells = {(row["group"], row["prompt_index"], row["seed"]): row["drift"] for row in info.get("cells", [])}
        found = [d for d in cells.values() if d is not None]
        top = max(found + [info.get("threshold") or 0.0, 1e-6])
        image = None
        for axis, group in zip(axes, groups):
            matrix = np.ma.masked_invalid(np.array([[np.nan if cells.get((group, p, s)) is None else cells[(group, p, s)] for s in seeds]
                                                    for p in range(len(prompts))], dtype=float).reshape(len(prompts), len(seeds)))
            axis.set_facecolor("0.85")
            image = axis.imshow(matrix, vmin=0.0, vmax=top, cmap="viridis_r", aspect="auto")
            for p in range(len(prompts)):
                for s, seed in enumerate(seeds):
                    if cells.get((group, p, seed)) is None:
                        axis.text(s, p, "×", ha="center", va="center", color="tab:red", fontsize=11)
            axis.set_xticks(range(len(seeds)), [str(seed) for seed in seeds])
            axis.set_yticks(range(len(prompts)), [f"p{p}" for p in range(len(prompts))])
            axis.set_title(f"{group}: drift per prompt x seed (× no face)", fontsize=10)
        axes[-1].set_xlabel("seed")
        if image is not None:
            figure.colorbar(image, ax=list(axes), label="drift (1 - cosine)", fraction=0.03)
        _evaluate_title(figure, facts, "Every cell")
        return figure

    return _png(draw)


def _evaluate_summary(facts: JobFacts) -> list[str]:
    info, _, prompts = _grid(facts)
    head, lines = _head(facts)
    groups = info.get("groups", [])
    items = [
        ("grid", f"{len(groups)} groups x {len(prompts)} prompts x {len(info.get('seeds', []))} seeds = {info.get('cells_total', 0)} cells"),
        ("faces not found", f"{info.get('faces_not_found', 0)} of {info.get('cells_total', 0)} cells (counted, never scored)"),
        ("groups", "; ".join(f"{g['name']}: {g['source']}" + (f" ({g['extra_training_steps']} training steps of its own)" if g.get("extra_training_steps") else "")
                             for g in groups) or "none"),
        ("audit head at report time", f"{head} (line {lines})"),
    ]
    out = ['<dl class="summary" id="summary">'] + [f"<dt>{_text(key)}</dt><dd>{_text(value)}</dd>" for key, value in items] + ["</dl>"]
    if info.get("faceid_note"):
        out.append('<p class="warning" id="faceid-note">' + _text(info["faceid_note"]) + "</p>")
        out.append('<table id="by-group"><tr><th>group</th><th>ArcFace drift, mean</th><th>dlib distance, mean</th><th>faces found</th></tr>')
        for row in info.get("by_group", []):
            out.append(f"<tr><td>{_text(row['group'])}</td><td>{_number(row['mean'])}</td><td>{_number(row.get('identity2_mean'))}</td>"
                       f"<td>{row['faces_found']} / {row['cells']}</td></tr>")
        out.append("</table>")
    tests = info.get("tests", [])
    if tests:
        out.append('<section id="evaluate-tests"><h2>Each group against the control</h2><p>' + _text(info.get("test_rule", "")) + "</p>")
        out.append('<table id="tests"><tr><th>group</th><th>pairs</th><th>excluded (no face)</th><th>median difference</th><th>closer / farther / equal</th>'
                   "<th>p</th><th>p (Holm)</th><th>method</th></tr>")
        for test in tests:
            p_value = _p(test["p_value"]) if test["p_value"] is not None else _text(test.get("reason") or "—")
            out.append(f"<tr><td>{_text(test['group'])}</td><td>{test['n']}</td><td>{test['excluded']}</td><td>{_number(test['median_difference'])}</td>"
                       f"<td>{test['closer']} / {test['farther']} / {test['equal']}</td><td>{p_value}</td><td>{_p(test.get('p_holm'))}</td>"
                       f"<td>{_text(test.get('method') or '—')}</td></tr>")
        out.append("</table></section>")
    return out


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _evaluate_charts(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="evaluate-charts"><h2>Charts</h2>']
    captions = {"prompts": "average drift per prompt and group, one standard deviation as error bar; faces found only",
                "no_face": "faces not found per prompt and group", "groups": "each group's drifts", "heatmap": "every cell: prompt x seed per group"}
    for key, rel in EVALUATE_CHARTS.items():
        out.append(_figure_html(_attr(quote(rel)), rel, "chart", [_text(captions[key])], "evaluate-" + key))
    return out + ["</section>"]


def _evaluate_sheets(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="evaluate-sheets"><h2>Contact sheets: prompt rows x seed columns</h2>']
    for group in _grid(facts)[1]:
        sheet = layout.evaluate_sheet(group)
        out.append(_figure_html(job_src(sheet), sheet, "sheet", [_text(f"{group}: drift under each cell, NO FACE in red")]))
    return out + ["</section>"]


def _evaluate_table(facts: JobFacts) -> list[str]:
    info, _, prompts = _grid(facts)
    out = ['<section id="evaluate-table"><h2>Per group and prompt</h2><ol class="prompts">']
    out += [f"<li value=\"{i}\">p{i}: {_text(prompt)}</li>" for i, prompt in enumerate(prompts)]
    out.append('</ol><table id="by-prompt"><tr><th>group</th><th>prompt</th><th>faces found</th><th>not found</th><th>mean</th><th>median</th><th>sd</th>'
               "<th>locked share</th></tr>")
    for row in info.get("by_prompt", []):
        out.append(f"<tr><td>{_text(row['group'])}</td><td>p{row['prompt_index']}</td><td>{row['faces_found']}</td><td>{row['faces_not_found']}</td>"
                   f"<td>{_number(row['mean'])}</td><td>{_number(row['median'])}</td><td>{_number(row['sd'])}</td><td>{_number(row['locked_share'], 2)}</td></tr>")
    return out + ["</table></section>"]


MINE_CHART = "report/mine.png"
DECISION_COLOURS = {"accepted": "tab:green", "rejected_group": "tab:orange", "rejected_anchor": "tab:red", "no_face": "tab:gray"}


def mine_chart_png(facts: JobFacts) -> bytes:
    """Each candidate's mean drift to the group and drift to the anchor, by decision, with the
    bound at the time; candidates without a face marked above the plot."""

    def draw():
        info = facts.mine or {}
        candidates = info.get("candidates", [])
        figure = _figure(11, 4.5)
        axis = figure.subplots()
        if not candidates:
            axis.text(0.5, 0.5, "no mining in this job ([mine] enabled = false)" if not info else "no candidate", ha="center", va="center",
                      transform=axis.transAxes)
        positions = list(range(len(candidates)))
        bounds = [(p, c["bound"]) for p, c in zip(positions, candidates) if c.get("bound") is not None]
        if bounds:
            axis.step(*zip(*bounds), where="mid", color="black", linewidth=1, label="bound at the time")
        anchor = (info.get("rule") or {}).get("anchor_max_drift")
        if anchor is not None:
            axis.axhline(anchor, color="tab:red", linestyle="--", linewidth=1, label=f"anchor_max_drift {anchor:g}")
        for decision, colour in DECISION_COLOURS.items():
            group = [(p, c["mean_drift_to_group"]) for p, c in zip(positions, candidates) if c["decision"] == decision and c.get("mean_drift_to_group") is not None]
            if group:
                axis.scatter(*zip(*group), color=colour, s=18, label=decision, zorder=3)
            to_anchor = [(p, c["anchor_drift"]) for p, c in zip(positions, candidates) if c["decision"] == decision and c.get("anchor_drift") is not None]
            if to_anchor:
                axis.scatter(*zip(*to_anchor), color=colour, marker="^", s=18, label=None if group else decision, zorder=3)
        missing = [p for p, c in zip(positions, candidates) if c["decision"] == "no_face"]
        if missing:
            _no_face_marks(axis, missing, "tab:gray", "no face found")
        pruned = [p for p, c in zip(positions, candidates) if c.get("pruned_at") is not None]
        for p in pruned:
            axis.axvline(p, color="tab:purple", alpha=0.3, linewidth=3)
        axis.set_xlim(-0.6, max(len(candidates), 1) - 0.4)
        axis.set_ylim(0.0, _axis_top([c.get("mean_drift_to_group") for c in candidates] + [c.get("anchor_drift") for c in candidates] + [anchor]))
        axis.set_xlabel("candidate, in the order judged (● mean drift to the group, ▲ drift to the anchor; purple band: pruned later)")
        axis.set_ylabel("drift (1 - cosine)")
        axis.grid(axis="y", alpha=0.3)
        _legend(axis)
        _evaluate_title(figure, facts, "Mining: every candidate against the group and the anchor")
        return figure

    return _png(draw)


def _mine(facts: JobFacts, job_src) -> list[str]:
    info = facts.mine
    out = ['<section id="mine"><h2>Face mining, anchored to the subject</h2>']
    if not info:
        return out + ["<p>No mining in this job ([mine] enabled = false).</p></section>"]
    decisions = ", ".join(f"{k} {v}" for k, v in sorted(info.get("decisions", {}).items())) or "none"
    out.append(f"<p>{_text(info.get('stop_reason'))}: {len(info.get('members', []))} members from {len(info.get('candidates', []))} candidates "
               f"({_text(decisions)}; {info.get('pruned', 0)} pruned later). Group centroid's drift to the reference: "
               f"{_number(info.get('centroid_drift_to_reference'))}.</p>")
    out.append(_figure_html(_attr(quote(MINE_CHART)), MINE_CHART, "chart", [_text("each candidate against the bound at the time and the anchor")], "mine"))
    members = info.get("member_files", [])
    if members:
        out.append('<div class="row">' + "".join(_figure_html(job_src(file), file, "member", [_text(Path(file).stem)]) for file in members) + "</div>")
    return out + ["</section>"]


# The report's sections by name (a kind lists those it shows, in order: engine.kinds.Kind.report):
# name -> (builder(facts, job_src) -> HTML lines, {chart file: chart builder(facts) -> PNG} it shows).
SECTIONS: dict[str, tuple[Callable[[JobFacts, Callable[[str], str]], list[str]], dict[str, Callable[[JobFacts], bytes]]]] = {
    "summary": (lambda facts, job_src: _summary(facts), {}),
    "timeline": (_timeline, {}),
    "seeds": (_seeds, {}),
    "drift": (lambda facts, job_src: _drift(facts), {DRIFT_CHART: drift_chart_png}),
    "renders": (_renders, {}),
    "second_model": (lambda facts, job_src: _second_model(facts), {}),
    "training": (lambda facts, job_src: _training(facts), {LOSS_CHART: loss_chart_png}),
    "settings": (lambda facts, job_src: _settings(facts), {}),
    "audit": (lambda facts, job_src: _audit(facts), {}),
    "retouch_summary": (lambda facts, job_src: _retouch_summary(facts), {}),
    "retouch_masks": (_retouch_masks, {}),
    "retouch_grids": (_retouch_grids, {}),
    "retouch_variants": (_retouch_variants, {}),
    "restore_summary": (lambda facts, job_src: _restore_summary(facts), {}),
    "restore_variants": (_restore_variants, {}),
    "evaluate_summary": (lambda facts, job_src: _evaluate_summary(facts), {}),
    "evaluate_charts": (_evaluate_charts, {EVALUATE_CHARTS["prompts"]: evaluate_prompts_png, EVALUATE_CHARTS["no_face"]: evaluate_no_face_png,
                                           EVALUATE_CHARTS["groups"]: evaluate_groups_png, EVALUATE_CHARTS["heatmap"]: evaluate_heatmap_png}),
    "evaluate_sheets": (_evaluate_sheets, {}),
    "evaluate_table": (lambda facts, job_src: _evaluate_table(facts), {}),
    "mine": (_mine, {MINE_CHART: mine_chart_png}),
}
