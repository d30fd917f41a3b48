"""The replicate kind's report sections: the seed candidates (each group beside the control,
drift under each, the locked seed and faces not found marked), the drift chart, the renders per
pass, the second identity model's distances and where it disagrees with ArcFace, and the
training phases with their loss chart (the evaluate kind shows that one too).

Sections by name in `SECTIONS` (engine.kinds.replicate's `report` lists them with the shared
page's); file names from engine.layout; the verify groups named by engine.kinds.sections.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import numpy as np

from engine import layout
from engine.kinds.sections import CONTROL_GROUP, IDENTITY_METHODS
from engine.layout import DRIFT_CHART, LOSS_CHART
from engine.report.page import (JobFacts, Section, audit_head_item, axis_top, figure_html, fmt_maybe, fmt_number, html_attr, html_text, legend, new_figure,
                                no_face_marks, png)

PASS_ORDER = {"anchor": 0, "scene": 1, "rescue": 2, "realism": 1}


def _by_verify_group(table: dict[str, str]) -> dict[str, str]:
    """A presentation table keyed by seed discovery's group names, which engine.kinds.sections owns (its
    identity methods and the control): refused at import when the two part ways."""
    groups = {*IDENTITY_METHODS, CONTROL_GROUP}
    if set(table) != groups:
        raise ValueError(f"the report's verify-group table names {sorted(table)}, engine.kinds.sections' groups are {sorted(groups)}")
    return table


VERIFY_GROUP_COLOURS = _by_verify_group({"lora": "tab:blue", CONTROL_GROUP: "tab:gray", "faceid": "tab:orange", "lora+faceid": "tab:green"})
VERIFY_GROUP_TITLES = _by_verify_group({"lora": "LoRA", CONTROL_GROUP: "control", "faceid": "FaceID", "lora+faceid": "LoRA + FaceID"})
VERIFY_GROUP_HEADINGS = _by_verify_group({"lora": "with LoRA", CONTROL_GROUP: "control (no LoRA)", "faceid": "FaceID (no LoRA)",
                                          "lora+faceid": "LoRA + FaceID"})
# verify.json from before [identity] names no groups: it rendered the LoRA and the control.
GROUPS_BEFORE_IDENTITY = ("lora", CONTROL_GROUP)


# ---------------------------------------------------------------------------- charts

def _verify_groups(verify: dict[str, Any] | None) -> list[str]:
    """The groups seed discovery rendered (GROUPS_BEFORE_IDENTITY when verify.json names none)."""
    return list((verify or {}).get("groups") or GROUPS_BEFORE_IDENTITY)


def drift_chart_png(facts: JobFacts) -> bytes:
    """Seed candidates (LoRA vs control) and renders per pass, ArcFace drift against the
    lock threshold; and the second model's distances against its tolerances."""

    def draw():
        figure = new_figure(12, 10, top=0.8, bottom=1.3, right=3.2)  # the legends' longest label: "lora+faceid: no face found (no drift)"
        seeds_axis, renders_axis, second_axis = figure.subplots(3, 1)
        threshold = facts.threshold
        candidates = (facts.verify or {}).get("candidates", [])
        locked_seed = (facts.verify or {}).get("locked_seed")
        groups = _verify_groups(facts.verify)
        top = axis_top([c[g]["drift"] for c in candidates for g in groups] + [r["drift"] for r in facts.rows])
        positions = np.arange(len(candidates), dtype=float)
        offsets = np.linspace(-0.15, 0.15, len(groups)) if len(groups) > 1 else [0.0]
        for offset, group in zip(offsets, groups):
            colour = VERIFY_GROUP_COLOURS.get(group, "tab:purple")
            found = [(p + offset, c[group]["drift"]) for p, c in zip(positions, candidates) if c[group]["drift"] is not None]
            missing = [p + offset for p, c in zip(positions, candidates) if c[group]["drift"] is None]
            if found:
                seeds_axis.scatter(*zip(*found), color=colour, marker="o", label=f"{group}: ArcFace drift", zorder=3)
            if missing:
                no_face_marks(seeds_axis, missing, colour, f"{group}: no face found (no drift)")
        seeds_axis.set_xticks(positions, [f"{c['seed']}{' (locked)' if c['seed'] == locked_seed else ''}" for c in candidates],
                              rotation=45 if len(candidates) > 12 else 0)
        seeds_axis.set_xlabel("seed")
        # the titles sit above the no-face strip (no_face_marks), not on it
        seeds_axis.set_title("Seed candidates: " + " vs ".join(VERIFY_GROUP_TITLES.get(g, g) for g in groups) + " (no adapter)", pad=18)
        render_rows = [r for r in facts.rows if r.get("kind") == "render"]
        render_positions = np.arange(len(render_rows), dtype=float)
        found = [(p, r["drift"]) for p, r in zip(render_positions, render_rows) if r["drift"] is not None]
        missing = [p for p, r in zip(render_positions, render_rows) if r["drift"] is None]
        if found:
            renders_axis.scatter(*zip(*found), color="tab:blue", marker="o", label="ArcFace drift", zorder=3)
        if missing:
            no_face_marks(renders_axis, missing, "tab:red", "no face found (no drift)")
        renders_axis.set_xticks(render_positions, [_render_label(r) for r in render_rows], rotation=45 if len(render_rows) > 8 else 0, fontsize=8)
        renders_axis.set_title("Renders per pass", pad=18)
        for axis in (seeds_axis, renders_axis):
            if threshold is not None:
                axis.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"lock threshold {threshold:g}")
            axis.set_ylim(0.0, top)
            axis.set_ylabel("drift (1 - cosine)")
            axis.set_xlim(-0.6, max(len(axis.get_xticks()), 1) - 0.4)
            axis.grid(axis="y", alpha=0.3)
            legend(axis)
        _draw_second_model(second_axis, facts)
        if facts.demo:
            figure.suptitle("demo model: random weights, renders are noise", color="tab:red")
        return figure

    return png(draw)


def _draw_second_model(axis, facts: JobFacts) -> None:
    from engine.identity.second import STRICT_TOLERANCE, TOLERANCE

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
    legend(axis)


def loss_chart_png(facts: JobFacts) -> bytes:
    """All phases on one axis, each relative to its own start (phase exits marked with reason and
    step), then one panel per phase with its raw loss on its own scale. Phases train with different
    loss functions (MSE, Huber, Charbonnier): their raw values share no scale, and drawn on one axis
    a phase change looked like a jump up or down."""
    phases = (facts.train or {}).get("phases", [])

    def draw():
        panels = max(1, len(phases))
        rows = 1 + (panels + 1) // 2
        figure = new_figure(11, 3.2 * rows, right=2.1, top=0.5, bottom=0.6, hspace=0.5)  # the legend: "FINAL_FINE (charbonnier)"
        grid = figure.add_gridspec(rows, 2)
        overview = figure.add_subplot(grid[0, :])
        colours = [f"C{i % 10}" for i in range(len(phases))]
        for colour, phase in zip(colours, phases):
            points = [(step, loss) for name, step, _, loss, _ in facts.loss if name == phase["name"]]
            probes = [probe for name, _, _, _, probe in facts.loss if name == phase["name"] and probe is not None]
            start = probes[0] if probes else (points[0][1] if points else None)  # the phase's first probe loss, else its first step's
            if points and start:
                overview.plot([step for step, _ in points], [loss / start for _, loss in points], color=colour, linewidth=1.2,
                              label=f"{phase['name']} ({phase['loss']})")
            if phase.get("steps"):
                overview.axvline(phase["last_step"], color=colour, linestyle="--", linewidth=0.8)
                overview.annotate(f"{phase['name']}: {phase['exit_reason']} @ {phase['last_step']}", xy=(phase["last_step"], 0.98),
                                  xycoords=("data", "axes fraction"), rotation=90, ha="right", va="top", fontsize=7, color=colour)
        overview.set_title("Training loss of every phase, relative to the phase's first probe loss (dashed: phase exit, reason, step)")
        overview.set_xlabel("step")
        overview.set_ylabel("loss ÷ phase start")
        overview.axhline(1.0, color="tab:gray", linewidth=0.6)
        overview.grid(alpha=0.3)
        if phases:
            legend(overview)
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

    return png(draw)


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


# ---------------------------------------------------------------------------- sections

def _summary(facts: JobFacts) -> list[str]:
    selection = (facts.drift_report or {}).get("seed_selection") or {key: (facts.verify or {}).get(key) for key in
                                                                      ("status", "reason", "best_seed", "best_drift", "locked_seed", "threshold")}
    second = (facts.drift_report or {}).get("identity2") or {}
    items = [
        ("seed selection", f"{selection.get('status') or 'not run'}: {selection.get('reason') or ''}"),
        ("locked seed", fmt_maybe(selection.get("locked_seed"))),
        ("best seed / drift", f"{fmt_maybe(selection.get('best_seed'))} / {fmt_number(selection.get('best_drift'))}"),
        ("lock threshold (ArcFace drift)", fmt_maybe(selection.get("threshold"))),
        ("images scored (a face found)", f"{sum(1 for row in facts.rows if row.get('face_found'))} of {len(facts.rows)} rendered"),
        ("faces not found", str((facts.drift_report or {}).get("faces_not_found", "—"))),
        ("second model disagreements", _second_summary(second)),
        audit_head_item(facts),
    ]
    out = ['<dl class="summary" id="summary">']
    out += [f"<dt>{html_text(key)}</dt><dd>{html_text(value)}</dd>" for key, value in items]
    out.append("</dl>")
    return out


def _second_summary(second: dict[str, Any]) -> str:
    if not second:
        return "not recorded"
    if not second.get("available"):
        return f"not measured: {second.get('reason')}"
    if not second.get("measured"):
        return f"nothing measured: {second.get('note', 'no face')}"
    return f"{second['disagreements']} of {second['measured']} measured images"


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
    out.append(f"<p>Prompt <code>{html_text(verify['prompt'])}</code>, {verify['steps']} steps, CFG {verify['guidance']:g}, "
               f"{verify['resolution']} px; batches {html_text(json.dumps(verify['batch_layout']))}. Seeds are ranked by ArcFace drift of "
               f"the {html_text(VERIFY_GROUP_TITLES.get(method, method))} render; the best is locked when its drift is at most {verify['threshold']:g}. "
               f"{html_text(verify['status'])}: {html_text(verify['reason'])}. Faces not found: {html_text(not_found)}.</p>")
    if verify.get("faceid_note"):
        out.append('<p class="warning" id="faceid-note">' + html_text(verify["faceid_note"]) + "</p>")
    out.append(credentials_line([rows.get((f"verify_{group}", candidate["seed"]), {}) for candidate in verify["candidates"] for group in groups]))
    # One block per seed (its groups side by side), wrapping: a table row per seed left the seed
    # column empty beside tall images.
    out.append('<div class="seeds" id="seed-table">')
    for candidate in verify["candidates"]:
        seed = candidate["seed"]
        marks = []
        if seed == verify.get("locked_seed"):
            marks.append('<span class="badge locked">LOCKED</span>')
        elif seed == verify.get("best_seed"):
            marks.append('<span class="badge best">rendered from (not locked)</span>')
        if seed in rank:
            marks.append(f'<span class="muted">rank {rank[seed]}</span>')
        figures = []
        for group in groups:
            result = candidate[group]
            row = rows.get((f"verify_{group}", seed), {})
            css = "locked" if group == method and seed == verify.get("locked_seed") else ""
            figures.append(_scored_figure(job_src(result["file"]), result["file"], "candidate", css, VERIFY_GROUP_HEADINGS.get(group, group),
                                          result["drift"], result["face_found"], row))
        out.append(f'<div class="seed" data-seed="{seed}"><h4>seed {seed} {" ".join(marks)}</h4><div class="row">{"".join(figures)}</div></div>')
    return out + ["</div></section>"]


def _drift(facts: JobFacts) -> list[str]:
    caption = ("ArcFace drift (1 − cosine to the reference embedding) of every seed candidate, each group beside the control, and of every render "
               "pass; dashed red: the lock threshold; ×: no face found (never scored as 0 or 1). Bottom: the second model's distance "
               "(red: disagrees with ArcFace).")
    return ['<section id="drift"><h2>3. Drift chart</h2>',
            figure_html(html_attr(quote(DRIFT_CHART)), DRIFT_CHART, "chart", [html_text(caption)], "drift"), "</section>"]


def _renders(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="renders"><h2>4. Renders per pass</h2>']
    renders = [row for row in facts.rows if row.get("kind") == "render"]
    if not renders:
        return out + [f"<p>No renders ({layout.DRIFT_REPORT_JSON}).</p></section>"]
    selection = (facts.drift_report or {}).get("seed_selection", {})
    out.append(f"<p>Rendered from seed {fmt_maybe(selection.get('best_seed'))} ({html_text(selection.get('status'))}).</p>")
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in renders:
        groups.setdefault((row["render"], row["output"]), []).append(row)
    out.append(credentials_line(renders))
    for (entry, output), passes in sorted(groups.items()):
        first = passes[0]
        negative = passes[-1].get("negative_prompt")
        shown_negative = f"; negative: {html_text(negative or '(none)')}" if negative is not None else ""
        out.append(f"<h3>render {entry}, output {output} <span class=\"muted\">{html_text(first['mode'])}: {html_text(passes[-1]['prompt'])}"
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
    out.append(f"<p>{html_text(second['model'])}: {html_text(second['distance'])}. Reference: {html_text(second['reference'])}. "
               f"Same person by dlib's tolerance at most {second['tolerance']:g}, by a strict one at most {second['strict_tolerance']:g}. "
               f"Used for seed selection: {'yes' if second.get('used_for_seed_selection') else 'no'} (measured after the seed was locked).</p>")
    out.append(f"<p>Disagreement: {html_text(second['disagreement_rule'])}.</p>")
    if not second.get("available"):
        return out + [f'<p class="demo">Not measured: {html_text(second.get("reason"))}</p></section>']
    note = f"; {second['note']}" if second.get("note") else ""
    out.append(f"<p>Measured {second.get('measured', 0)} of {len(facts.rows)} images{html_text(note)}.</p>")
    flagged = [row for row in facts.rows if row.get("models_disagree")]
    if flagged:
        out.append('<table id="disagreements"><tr><th>image</th><th>ArcFace drift</th><th>dlib distance</th><th>reading</th></tr>')
        threshold = facts.threshold
        for row in flagged:
            if threshold is not None and row["drift"] <= threshold:
                reading = f"ArcFace: within the lock threshold {threshold:g}; dlib: another person (> {second['tolerance']:g})"
            else:
                reading = f"ArcFace: beyond the lock threshold {fmt_maybe(threshold)}; dlib: same person even by the strict {second['strict_tolerance']:g}"
            out.append(f"<tr><td>{html_text(row['file'])}</td><td>{fmt_number(row['drift'])}</td><td>{fmt_number(row['identity2_distance'])}</td>"
                       f"<td>{html_text(reading)}</td></tr>")
        out.append("</table>")
    else:
        out.append('<p id="disagreements">No image where the two models disagree.</p>')
    return out + ["</section>"]


def _training(facts: JobFacts) -> list[str]:
    out = ['<section id="training"><h2>6. Training</h2>']
    out.append(figure_html(html_attr(quote(LOSS_CHART)), LOSS_CHART, "chart",
                            [html_text("Loss of every training phase; each phase ends when its probe loss has converged (or diverges), at its step cap, or at the job's total cap. "
                                      "Top: every phase relative to its own start (the phases use different loss functions, so raw values do not compare); "
                                      "below: each phase's raw step and probe loss.")], "loss"))
    train = facts.train
    if not train:
        return out + [f"<p>No training record ({layout.TRAIN_INFO}).</p></section>"]
    if train.get("main_trained") is False:
        out.append(f"<p>{html_text(train.get('why'))}.</p>")
    out.append(f"<p>Caption <code>{html_text(train['caption'])}</code>, rank {train['rank']}, {train['resolution']} px, "
               f"{train['total_steps']} of at most {train['max_steps']} steps"
               f"{_resumes(facts)}.</p>")
    files = train.get("lora_files") or {}
    if files:
        out.append(f'<p id="lora-files">The LoRA, trigger word <code>{html_text(train.get("trigger"))}</code> (put it in the prompt): '
                   f'<code>{html_text(files.get("diffusers"))}</code> for diffusers (<code>pipe.load_lora_weights</code>); '
                   f'<code>{html_text(files.get("kohya"))}</code>, the same LoRA in kohya\'s format, for AUTOMATIC1111/Forge, ComfyUI, '
                   "InvokeAI and Fooocus (its metadata names this job, the subject, the trigger word and the base model's sha256).</p>")
    out.append('<table id="phases"><tr><th>phase</th><th>lr</th><th>alpha</th><th>loss</th><th>optimizer</th><th>steps</th>'
               "<th>exit reason</th><th>at step</th><th>probe loss</th><th>improvement bound / allowed</th><th>slope p-value</th></tr>")
    for phase in train["phases"]:
        summary = phase.get("summary") or {}
        bound = (f"{fmt_number(summary.get('improvement_upper'), 4)} / {fmt_number(summary.get('allowed'), 4)}"
                 if summary.get("allowed") is not None else "—")
        out.append(f"<tr><td>{html_text(phase['name'])}</td><td>{phase['lr']:g}</td><td>{phase['alpha']:g}</td><td>{html_text(phase['loss'])}</td>"
                   f"<td>{html_text(phase['optimizer'])}</td><td>{phase['steps']}</td><td>{html_text(phase['exit_reason'])}</td>"
                   f"<td>{phase['last_step']}</td><td>{fmt_number(summary.get('probe_loss'), 4)}</td><td>{bound}</td>"
                   f"<td>{fmt_number(summary.get('p_value'), 3)}</td></tr>")
    return out + ["</table></section>"]


def _resumes(facts: JobFacts) -> str:
    """The text ', resumed from step 50, 100', from the audit log's train_resumed lines
    (train.json keeps no run history, so that a resumed job's files equal an uninterrupted one's)."""
    steps = [str(line.get("step")) for line in facts.audit if line.get("event") == "train_resumed"]
    return f", resumed from step {', '.join(steps)}" if steps else ""


def _scored_figure(src: str, file: str, kind: str, css: str, title: str, drift: float | None, face_found: bool, row: dict[str, Any]) -> str:
    caption = [f"<b>{html_text(title)}</b>"]
    if face_found:
        caption.append(f"ArcFace drift <b>{fmt_number(drift)}</b>")
    else:
        caption.append('<span class="badge noface">no face found</span>')
        css += " noface"
    if row.get("identity2_distance") is not None:
        caption.append(f"dlib distance {fmt_number(row['identity2_distance'])} ({html_text(row.get('identity2_verdict'))})")
    if row.get("models_disagree"):
        caption.append('<span class="badge disagree">models disagree</span>')
    return figure_html(src, file, kind, caption, css)


def credentials_line(rows: list[dict[str, Any]]) -> str:
    """The C2PA Content Credentials of a section's images, said once: one status for all of them,
    or each distinct status with the images that have it."""
    statuses: dict[str, list[str]] = {}
    for row in rows:
        if row.get("credentials"):
            statuses.setdefault(str(row["credentials"]), []).append(str(row.get("file", "")))
    if not statuses:
        return ""
    if len(statuses) == 1:
        [(status, files)] = statuses.items()
        return f'<p class="muted credentials">C2PA Content Credentials of these {len(files)} images: {html_text(status)}</p>'
    parts = [f"{html_text(status)}: {html_text(', '.join(files))}" for status, files in sorted(statuses.items())]
    return '<p class="muted credentials">C2PA Content Credentials: ' + "; ".join(parts) + "</p>"


SECTIONS = {
    "summary": Section(lambda facts, job_src: _summary(facts)),
    "seeds": Section(_seeds),
    "drift": Section(lambda facts, job_src: _drift(facts), {DRIFT_CHART: drift_chart_png}),
    "renders": Section(_renders),
    "second_model": Section(lambda facts, job_src: _second_model(facts)),
    "training": Section(lambda facts, job_src: _training(facts), {LOSS_CHART: loss_chart_png}),
}
