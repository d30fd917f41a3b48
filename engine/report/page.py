"""The report's shared page: what every kind's report.html has, and the tools its sections use.

Reads the job folder into `JobFacts`, lays out the page (the heading, the demo warning, then
the sections the job's kind lists in `Kind.report`, in order), and holds the sections every kind
may show (timeline of the original photos and prepared crops, settings and software, the audit
chain), the chart canvas and the HTML helpers. Each kind's own sections and charts are in
engine.report.<kind>, which the package adds to `SECTIONS` (engine/report/__init__.py); this
module imports none of them.

Files (all inside the job folder, all listed in manifest.json; names in engine.layout):
    report.html               images by relative path, CSS inline, no script, no network
    report/<chart>.png        matplotlib (Agg) charts of the kind's sections, also shown in the page
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from engine import layout
from engine.fsutil import atomic_write_bytes, sha256_bytes, sha256_file
from engine.kinds import DEFAULT_KIND, Kind, kind_named
from engine.layout import AUDIT_FILE, MANIFEST_FILE, ORIGINAL_PATTERN, REPORT_DIR, REPORT_FILE

ORIGINAL_MAX_SIDE = 1024  # px: display copies only; the inputs' sha256 are in the manifest
CHART_DPI = 100


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
    files = {rel: chart(facts) for name in facts.kind.report for rel, chart in SECTIONS[name].charts.items()}
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

    if (job_dir / REPORT_DIR).is_dir():
        for stale in sorted(job_dir.glob(ORIGINAL_PATTERN.format(index="*"))):
            stale.unlink()
    for index, (name, path) in enumerate(originals):
        rgb = load_photo(Path(path), name, max_pixels=1 << 40).rgb  # already accepted by prepare
        scale = ORIGINAL_MAX_SIDE / max(rgb.shape[:2])
        if scale < 1.0:
            rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        text = {"source": name, "sha256": sha256_file(Path(path)), "note": f"display copy for {REPORT_FILE}, at most {ORIGINAL_MAX_SIDE} px"}
        atomic_write_bytes(job_dir / ORIGINAL_PATTERN.format(index=index), png_bytes(rgb, text))


# ---------------------------------------------------------------------------- charts (the canvas and what every chart uses)

def new_figure(width: float, height: float, *, left: float = 0.8, right: float = 2.2, top: float = 0.6, bottom: float = 0.7,
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


def png(draw) -> bytes:
    """Run `draw()` (which returns a Figure) under matplotlib's default style and fixed
    settings, and encode it as PNG with no metadata that could change between runs."""
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context({"svg.hashsalt": "engine-report", "font.family": "DejaVu Sans"}):
        figure = draw()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=CHART_DPI, metadata={"Software": None})
    return buffer.getvalue()


def no_face_marks(axis, positions: list[float], colour: str, label: str) -> None:
    """Images without a face have no drift: mark them in a strip above the plot area (x in data,
    y in axes coordinates), never at a drift value someone could read off the scale."""
    from matplotlib.transforms import blended_transform_factory

    axis.scatter(positions, [1.04] * len(positions), color=colour, marker="x", label=label, zorder=3, clip_on=False,
                 transform=blended_transform_factory(axis.transData, axis.transAxes))


def legend(axis) -> None:
    """A legend outside the plot, on the right, so that it never hides a point."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def axis_top(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return max(1.0, max(present) * 1.1) if present else 1.0


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
figure.chart img{width:100%;max-width:1000px} figure.grid img{width:100%;max-width:1100px} figure.grid figcaption{max-width:none}
.crop{overflow:hidden;display:block} figure.closeup .crop img{width:auto;max-width:none;height:auto} figure.closeup figcaption{max-width:480px}
figure.locked{border:3px solid #2e7d32} figure.noface{border-color:#c62828}
figcaption{font-size:.8rem;line-height:1.35;max-width:192px;word-wrap:break-word}
figure.chart figcaption{max-width:none}
.photo{position:relative;display:inline-block;overflow:hidden} .photo img{width:320px}
.box{position:absolute;border:2px solid #9e9e9e} .box.chosen{border-color:#2e7d32} .box.crop{border:2px dashed #1565c0}
.badge{display:inline-block;padding:0 .35rem;border-radius:3px;font-size:.75rem;font-weight:600;color:#fff;background:#555}
.seeds{display:flex;flex-wrap:wrap;gap:.6rem;margin:.6rem 0} .seed{border:1px solid #ddd;border-radius:4px;padding:.3rem}
.seed>h4{margin:.1rem 0 .3rem;font-size:.9rem} .seed figure img{width:160px} .seed figcaption{max-width:160px}
.badge.locked{background:#2e7d32} .badge.noface{background:#c62828} .badge.disagree{background:#e65100} .badge.best{background:#1565c0}
table{border-collapse:collapse;margin:.6rem 0} td,th{border:1px solid #ddd;padding:.3rem .5rem;vertical-align:top;text-align:left;font-size:.9rem}
pre{background:#f5f5f5;padding:.6rem;overflow:auto;max-height:30rem;font-size:.8rem}
code{font-size:.85rem} .muted{color:#666}
"""


def _family_label(name: str) -> str:
    """How a family recorded in the audit log is named to a reader (its own label; a family this
    engine no longer knows, by its recorded name)."""
    from engine.diffusion.families import FAMILIES

    return next((family.label for family in FAMILIES if family.name == name), name)


def render_html(facts: JobFacts, link_to_job: str = "") -> str:
    """The page. `link_to_job` prefixes links to the job's own images (when written elsewhere)."""
    def job_src(rel: str) -> str:
        return html_attr(link_to_job + quote(rel))

    title = facts.kind.title or f"{facts.kind.name} report"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html_text(title)}: {html_text(facts.subject)} / {html_text(facts.job_id)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html_text(title)}: {html_text(facts.subject)}</h1>",
        f'<p class="muted">job <code>{html_text(facts.job_id)}</code>; made from the job folder alone '
        f"(<code>python -m engine report &lt;job folder&gt;</code> rebuilds it byte for byte)</p>",
    ]
    families = (facts.starts()[-1] if facts.starts() else {}).get("families") or {}
    if families:
        parts.append('<p id="families">Diffusion models: ' + "; ".join(f"{html_text(role)}: {html_text(_family_label(name))}"
                                                                      for role, name in sorted(families.items())) + "</p>")
    if facts.demo:
        parts.append('<p class="demo" id="demo-warning">Demo model: random weights. The renders are noise, no face is found in them, '
                     "and their drifts mean nothing. This report shows the chain works, not an identity.</p>")
    fallback = face_models(facts).get("fallback")
    if fallback:
        parts.append(f'<p class="demo" id="face-pack-fallback">Face pack: {html_text(fallback)}.</p>')
    for name in facts.kind.report:
        parts += SECTIONS[name].html(facts, job_src)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def face_models(facts: JobFacts) -> dict[str, Any]:
    """The face models of the latest run (its job_started / job_resumed line)."""
    starts = facts.starts()
    return ((starts[-1] if starts else {}).get("models") or {}).get("faces") or {}


def _timeline(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="timeline"><h2>1. Original photos and prepared crops</h2>']
    if not facts.prepare:
        return out + [f"<p>No prepare record ({layout.PREPARE_INFO}).</p></section>"]
    drift_of = {row["file"]: row for row in (facts.embed or {}).get("images", [])}
    for index, photo in enumerate(facts.prepare["photos"]):
        out.append(f'<h3>{html_text(photo["name"])} <span class="muted">sha256 {html_text(photo["sha256"])}</span></h3><div class="row">')
        if index in facts.originals:
            out.append(_original_figure(photo, job_src(facts.originals[index]), facts.originals[index]))
        else:
            out.append(f'<p class="muted">original not kept in the job folder (sha256 {html_text(photo["sha256"])}).</p>')
        for image in photo["images"]:
            embedded = drift_of.get(image["file"], {})
            caption = [f"<b>{html_text(image['kind'])}</b> (rotation {image['angle']:g}°, crop {image['scale']:g})",
                       f"ArcFace drift to reference {fmt_number(embedded.get('drift_to_reference'))}"]
            out.append(figure_html(job_src(image["file"]), image["file"], "prepared", caption))
        out.append("</div>")
        background = photo.get("background", {})
        out.append(f'<p class="muted">background: {html_text(background.get("method"))} {html_text(background.get("reason", ""))}; '
                   f"faces found: {len(photo['faces'])}, subject: #{photo['chosen_face']}</p>")
    pairwise = (facts.embed or {}).get("pairwise") or []
    if pairwise:
        out.append("<p>Same-person check between photos (ArcFace drift): " +
                   "; ".join(f"{html_text(p['photos'][0])} vs {html_text(p['photos'][1])}: {fmt_number(p['drift'])}" for p in pairwise) + "</p>")
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
    if any("past-edge" in box for box in boxes):
        caption.append("the crop runs past the photo's edge (padded there): drawn to the edge")
    return (f'<figure class="original" data-kind="original" data-file="{html_attr(file)}"><div class="photo"><img src="{src}" alt="original {html_attr(photo["name"])}">{"".join(boxes)}</div>'
            f"<figcaption>{'<br>'.join(caption)}</figcaption></figure>")


def _box(x: float, y: float, w: float, h: float, width: int, height: int, css: str) -> str:
    """A box on the photo, clipped to its frame: a crop that runs past the photo's edge (the prepare
    stage pads there) is drawn to the edge, never across the cards beside it."""
    left, top, right, bottom = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
    if (left, top, right, bottom) != (x, y, x + w, y + h):
        css += " past-edge"
    return (f'<div class="{css}" style="left:{100 * left / width:.3f}%;top:{100 * top / height:.3f}%;'
            f'width:{100 * max(0.0, right - left) / width:.3f}%;height:{100 * max(0.0, bottom - top) / height:.3f}%"></div>')


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
    out += [f"<tr><td>{html_text(name)}</td><td><code>{html_text(digest)}</code></td></tr>" for name, digest in sorted(models.items())]
    out.append("</table>")
    faces = face_models(facts)
    if faces:
        providers = faces.get("providers") or []
        if isinstance(providers, dict):  # what each onnxruntime session got; older audits hold a list: what was asked for
            providers = sorted({name for session in providers.values() for name in session})
        out.append(f"<p>Face models: {html_text(faces.get('pack'))} on {html_text(', '.join(providers))}.</p>")
    runs = []
    for start in starts:
        if not runs or runs[-1][1] != start.get("versions"):
            runs.append((f"{start['event']} {start.get('ts', '')}", start.get("versions") or {}))
    extra = {f"identity2: {name}": version for name, version in (second.get("versions") or {}).items()}
    extra["report: matplotlib"] = matplotlib.__version__
    packages = sorted({name for _, versions in runs for name in versions})
    out.append("<h3>Software versions</h3><table id=\"versions\"><tr><th>package</th>" +
               "".join(f"<th>{html_text(label)}</th>" for label, _ in runs) + "</tr>")
    out += [f"<tr><td>{html_text(name)}</td>" + "".join(f"<td>{html_text(versions.get(name, '—'))}</td>" for _, versions in runs) + "</tr>" for name in packages]
    out += [f"<tr><td>{html_text(name)}</td><td colspan=\"{max(1, len(runs))}\">{html_text(version)}</td></tr>" for name, version in sorted(extra.items())]
    out.append("</table>")
    stages = [line for line in facts.audit if line.get("event") in ("stage_finished", "stage_skipped")]
    if stages:
        out.append("<h3>Stages</h3><table id=\"stages\"><tr><th>stage</th><th>event</th><th>seconds</th><th>at (UTC)</th></tr>")
        out += [f"<tr><td>{html_text(line.get('stage'))}</td><td>{html_text(line['event'])}</td><td>{fmt_maybe(line.get('seconds'))}</td><td>{html_text(line.get('ts'))}</td></tr>"
                for line in stages]
        out.append("</table>")
    for title, key, opened in (("Job (job.toml with defaults)", "spec", " open"), ("Settings (config.toml with defaults)", "settings", ""),
                               ("Device", "device", "")):
        if key in latest:
            out.append(f"<details{opened}><summary>{html_text(title)}</summary><pre>{html_text(json.dumps(latest[key], indent=2, sort_keys=True, ensure_ascii=False))}</pre></details>")
    return out + ["</section>"]


def _audit(facts: JobFacts) -> list[str]:
    head, lines = audit_head(facts)
    starts = facts.starts()
    trust = (starts[-1] if starts else {}).get("trust") or {}
    if trust.get("signed"):
        signer = (f'<p id="signer">Signed by the lab: audit key <code>{html_text(trust.get("key_fingerprint"))}</code> (Ed25519) signs this job\'s '
                  f"head in <code>signature.json</code> and its line in the outbox's journal; every generated image carries C2PA Content "
                  f"Credentials signed by <code>{html_text(trust.get('content_signer'))}</code> under the lab CA <code>{html_text(trust.get('lab_ca'))}</code>.</p>")
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


def audit_head(facts: JobFacts) -> tuple[str, int]:
    return (facts.audit[-1].get("hash", "—"), len(facts.audit)) if facts.audit else ("—", 0)


def audit_head_item(facts: JobFacts) -> tuple[str, str]:
    """The summary's line for the audit head, with why it is not the head `verify-audit` prints:
    the report is sealed into the manifest before job_finished is written (and a job sealed, then
    resumed before its publishing rename, has lines after that too)."""
    head, lines = audit_head(facts)
    return ("audit head sealed with this report",
            f"{head} (line {lines}; verify-audit names a later line: job_finished, and any line after it, is written after the report)")


CLOSEUP_MARGIN = 24  # px of photo around a region's feathered support
CLOSEUP_MAX_SIDE = 480  # px: a larger region is shown from its top left corner, at full resolution still


def closeup(src: str, file: str, box: list[int], caption: str) -> str:
    """`file` at its own resolution, cut to `box` (x0, y0, x1, y1) by the page, not resampled: the
    subtle skin edits a reviewer must judge do not survive a thumbnail."""
    x0, y0, x1, y1 = box
    return (f'<figure class="closeup" data-kind="closeup" data-file="{html_attr(file)}"><div class="crop" style="width:{x1 - x0}px;height:{y1 - y0}px">'
            f'<img src="{src}" alt="{html_attr(file)}" style="margin:{-y0}px 0 0 {-x0}px"></div><figcaption>{html_text(caption)}</figcaption></figure>')


def closeup_box(bbox: list[int]) -> list[int]:
    x0, y0, x1, y1 = bbox
    x0, y0 = max(0, x0 - CLOSEUP_MARGIN), max(0, y0 - CLOSEUP_MARGIN)
    return [x0, y0, min(x1 + CLOSEUP_MARGIN, x0 + CLOSEUP_MAX_SIDE), min(y1 + CLOSEUP_MARGIN, y0 + CLOSEUP_MAX_SIDE)]


def figure_html(src: str, file: str, kind: str, caption: list[str], css: str = "") -> str:
    """One image with its caption (HTML, already escaped). `kind` (data-kind) says what it is:
    prepared, candidate, render or chart."""
    classes = f"{kind} {css}".strip()
    return (f'<figure class="{html_attr(classes)}" data-kind="{html_attr(kind)}" data-file="{html_attr(file)}"><img src="{src}" alt="{html_attr(file)}">'
            f"<figcaption>{'<br>'.join(caption)}<br><span class=\"muted\">{html_text(file)}</span></figcaption></figure>")


def fmt_number(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_maybe(value: Any) -> str:
    return "—" if value is None else str(value)


def html_text(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=False)


def html_attr(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# ---------------------------------------------------------------------------- sections

class Section(NamedTuple):
    """One section of the page: `html(facts, job_src)` -> its HTML lines (`job_src(rel)`: the
    src attribute of one of the job's own files), and the charts it shows, {chart file: chart
    builder(facts) -> PNG bytes}."""

    html: Callable[[JobFacts, Callable[[str], str]], list[str]]
    charts: dict[str, Callable[[JobFacts], bytes]] = {}


# The report's sections by name (a kind lists those it shows, in order: engine.kinds.Kind.report):
# the shared ones here; the package adds each kind module's own (add_sections).
SECTIONS: dict[str, Section] = {
    "timeline": Section(_timeline),
    "settings": Section(lambda facts, job_src: _settings(facts)),
    "audit": Section(lambda facts, job_src: _audit(facts)),
}


def add_sections(sections: dict[str, Section]) -> None:
    """Add a kind module's sections (engine/report/__init__.py does, for the built-in kinds). A
    name already taken by another section is refused: a kind's `report` must mean one thing."""
    taken = sorted(name for name, section in sections.items() if SECTIONS.get(name, section) is not section)
    if taken:
        raise ValueError(f"report section(s) {', '.join(taken)} already defined")
    SECTIONS.update(sections)
