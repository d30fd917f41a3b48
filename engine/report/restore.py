"""The restore kind's report sections: the verdict and what the damage mask covers, then the
mask, the classical fill (when asked for) and every variant with its drift to the references.

Sections by name in `SECTIONS` (engine.kinds.restore's `report` lists them with the shared
page's); file names from engine.layout.
"""

from __future__ import annotations

from engine import layout
from engine.report.page import JobFacts, Section, audit_head_item, closeup, closeup_box, figure_html, fmt_number, html_text


def _restore_summary(facts: JobFacts) -> list[str]:
    info = facts.restore or {}
    cover = info.get("coverage") or {}
    items = [
        ("verdict", f"{info.get('verdict', 'not run')}: " + ("; ".join(info.get("reasons") or []) or "within every limit")),
        ("face covered by the mask", f"{fmt_number(cover.get('face_coverage'), 3)}"),
        ("features covered", f"{fmt_number(cover.get('feature_coverage'), 3)} (" + ", ".join(f"{k} {v:.2f}" for k, v in (cover.get("features") or {}).items()) + ")"),
        ("generative", "no: the TELEA fill alone (classical)" if info.get("generative") is False else "yes"),
        ("identity", info.get("identity") or "—"),
        ("seed spread (hallucination index)", fmt_number(info.get("seed_spread"))),
        audit_head_item(facts),
    ]
    out = ['<dl class="summary" id="summary">']
    out += [f"<dt>{html_text(key)}</dt><dd>{html_text(value)}</dd>" for key, value in items]
    return out + ["</dl>"]


def _restore_variants(facts: JobFacts, job_src) -> list[str]:
    info = facts.restore or {}
    out = ['<section id="restore-variants"><h2>Mask and variants</h2><div class="row">',
           figure_html(job_src(layout.RESTORE_OVERLAY), layout.RESTORE_OVERLAY, "mask", [html_text(f"the damage mask {info.get('mask')} over the photo")])]
    if info.get("classical_fill"):
        out.append(figure_html(job_src(info["classical_fill"]), info["classical_fill"], "classical", [html_text("TELEA fill: not generative")]))
    for row in info.get("variants", []):
        caption = [html_text(f"seed {row['seed']}: drift to the references {fmt_number(row['drift_to_references'])}"
                         + (" — FARTHER than the damaged photo" if row.get("farther_than_damaged") else "")),
                   html_text(f"{row['changed_outside_mask_px']} px changed outside the mask")]
        out.append(figure_html(job_src(row["file"]), row["file"], "variant", caption))
    return out + ["</div></section>"]


def _restore_closeups(facts: JobFacts, job_src) -> list[str]:
    """Before and after, at full resolution: the damaged photo as dropped beside the variant of
    least drift to the references (the first seed when none were given) and the classical fill,
    cut to the damage mask's box by the page, never resampled."""
    info = facts.restore or {}
    out = ['<section id="restore-closeups"><h2>Before and after, full resolution</h2>']
    if not info.get("mask_box"):
        return out + ["<p>Nothing to show: no mask box recorded (a job from before close-ups).</p></section>"]
    box = closeup_box(info["mask_box"])
    photo = f"{layout.INPUTS_DIR}/{info.get('photo', '')}"
    shown = [closeup(job_src(photo), photo, box, "the damaged photo as dropped")]
    if info.get("classical_fill"):
        shown.append(closeup(job_src(info["classical_fill"]), info["classical_fill"], box, "TELEA fill: not generative"))
    variants = info.get("variants", [])
    if variants:
        best = min(variants, key=lambda row: (row["drift_to_references"] if row.get("drift_to_references") is not None else 9.0, row["seed"]))
        shown.append(closeup(job_src(best["file"]), best["file"], box, f"seed {best['seed']}: drift to the references {fmt_number(best.get('drift_to_references'))}"))
    return out + ['<div class="row">' + "".join(shown) + "</div></section>"]


SECTIONS = {
    "restore_summary": Section(lambda facts, job_src: _restore_summary(facts)),
    "restore_closeups": Section(_restore_closeups),
    "restore_variants": Section(_restore_variants),
}
