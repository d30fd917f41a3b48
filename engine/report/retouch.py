"""The retouch kind's report sections: what was swept (region sets, strengths x seeds, the
landmarks' check), the region masks, each region set's sweep grid, and every variant with its
measures and verdict.

Sections by name in `SECTIONS` (engine.kinds.retouch's `report` lists them with the shared
page's); file names from engine.layout.
"""

from __future__ import annotations

from engine import layout
from engine.report.page import JobFacts, Section, audit_head_item, closeup, closeup_box, figure_html, fmt_number, html_text


def _retouch_summary(facts: JobFacts) -> list[str]:
    info = facts.retouch or {}
    marks = info.get("landmarks") or {}
    regions = info.get("regions") or []
    items = [
        ("variants", f"{len(info.get('variants', []))}: {info.get('accepted', 0)} accepted, {info.get('rejected', 0)} rejected"),
        ("region sets", ", ".join(info.get("region_sets", [])) or "none applicable"),
        ("not applicable", "; ".join(f"{r['region']}: {r['reason']}" for r in regions if not r.get("applicable")) or "none"),
        ("landmarks", f"106 points, checked by {marks.get('check') or 'nothing'}: disagreement {fmt_number(marks.get('disagreement_iod'), 3)} IOD"
                      + (" — UNCERTAIN, check the masks by eye" if marks.get("uncertain") else "")),
        ("strengths x seeds", f"{info.get('strengths')} x {info.get('seeds')}, {info.get('compositing')} compositing"),
        audit_head_item(facts),
    ]
    out = ['<dl class="summary" id="summary">']
    out += [f"<dt>{html_text(key)}</dt><dd>{html_text(value)}</dd>" for key, value in items]
    return out + ["</dl>"]


def _retouch_masks(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="retouch-masks"><h2>Region masks</h2>']
    info = facts.retouch
    if not info:
        return out + [f"<p>No retouch record ({layout.RETOUCH_INFO}).</p></section>"]
    overlay = layout.RETOUCH_OVERLAY
    out.append('<div class="row">' + figure_html(job_src(overlay), overlay, "mask", [html_text("every region's feathered alpha over the photo")]) + "</div>")
    out.append('<table id="regions"><tr><th>region</th><th>applicable</th><th>drawn px</th><th>kept (skin, unprotected)</th><th>why not</th></tr>')
    for region in info.get("regions", []):
        out.append(f"<tr><td>{html_text(region['region'])}</td><td>{'yes' if region['applicable'] else 'no'}</td><td>{region['drawn_px']}</td>"
                   f"<td>{fmt_number(region['kept'], 2)}</td><td>{html_text(region['reason'])}</td></tr>")
    return out + ["</table></section>"]


def _retouch_closeups(facts: JobFacts, job_src) -> list[str]:
    """Before and after, at full resolution: for each region set, its accepted variant of least
    drift (when none was accepted, its variant of least drift, marked rejected with why: what was
    refused is evidence too), each of its regions beside the same pixels of the photo as dropped."""
    out = ['<section id="retouch-closeups"><h2>Before and after, full resolution</h2>']
    info = facts.retouch or {}
    boxes = {region["region"]: region.get("bbox") for region in info.get("regions", [])}
    photo = f"{layout.INPUTS_DIR}/{info.get('photo', '')}"
    shown = 0
    for name in info.get("region_sets", []):
        variants = [row for row in info.get("variants", []) if "+".join(row["region_set"]) == name]
        if not variants:
            continue
        pool = [row for row in variants if row["accepted"]] or variants
        best = min(pool, key=lambda row: (row["drift"] if row["drift"] is not None else 9.0, row["strength"], row["seed"]))
        verdict = "accepted" if best["accepted"] else "none accepted; the least drift, rejected: " + "; ".join(best["reasons"])
        out.append(f"<h3>{html_text(name)}: strength {best['strength']:g}, seed {best['seed']}, drift {fmt_number(best['drift'])} "
                   f"<span class=\"muted\">({html_text(verdict)})</span></h3>")
        for region in best["region_set"]:
            if not boxes.get(region):
                continue
            box = closeup_box(boxes[region])
            out.append('<div class="row">' + closeup(job_src(photo), photo, box, f"{region}: the photo as dropped")
                       + closeup(job_src(best["file"]), best["file"], box, f"{region}: {best['file']}") + "</div>")
            shown += 1
    if not shown and info.get("region_sets"):
        out.append("<p>Nothing to show: no region recorded where it is (a job from before close-ups).</p>")
    return out + ["</section>"]


def _retouch_grids(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="retouch-grids"><h2>Sweeps: strength rows x seed columns</h2>']
    for name in (facts.retouch or {}).get("region_sets", []):
        grid = layout.retouch_grid(name)
        out.append(figure_html(job_src(grid), grid, "grid", [html_text(f"{name}: drift, texture kept and ΔE2000 under each variant; red: rejected")]))
    return out + ["</section>"]


def _retouch_variants(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="retouch-variants"><h2>Variants</h2>',
           '<table id="variants"><tr><th>region set</th><th>strength</th><th>seed</th><th>steps</th><th>drift</th><th>dlib distance</th><th>texture kept</th>'
           "<th>ΔE2000</th><th>landmark shift (IOD)</th><th>outside the mask</th><th>verdict</th></tr>"]
    for row in (facts.retouch or {}).get("variants", []):
        verdict = "accepted" if row["accepted"] else "rejected: " + "; ".join(row["reasons"])
        texture = fmt_number(row["texture_ratio"], 2) + ("" if row["texture_measurable"] else " (not judged)")
        out.append(f"<tr><td>{html_text('+'.join(row['region_set']))}</td><td>{row['strength']:g}</td><td>{row['seed']}</td><td>{row['denoising_steps']}</td>"
                   f"<td>{fmt_number(row['drift'])}</td><td>{fmt_number(row.get('identity2_distance'))}</td><td>{html_text(texture)}</td><td>{fmt_number(row['delta_e'], 2)}</td>"
                   f"<td>{fmt_number(row['landmark_shift_iod'], 3)}</td><td>{row['changed_outside_mask_px']} px changed</td><td>{html_text(verdict)}</td></tr>")
    out.append("</table>")
    accepted = [row for row in (facts.retouch or {}).get("variants", []) if row["accepted"]]
    if accepted:
        out.append('<div class="row">' + "".join(figure_html(job_src(row["file"]), row["file"], "variant",
                                                              [html_text(f"{'+'.join(row['region_set'])} s {row['strength']:g} seed {row['seed']}")])
                                               for row in accepted) + "</div>")
    return out + ["</section>"]


SECTIONS = {
    "retouch_summary": Section(lambda facts, job_src: _retouch_summary(facts)),
    "retouch_masks": Section(_retouch_masks),
    "retouch_closeups": Section(_retouch_closeups),
    "retouch_grids": Section(_retouch_grids),
    "retouch_variants": Section(_retouch_variants),
}
