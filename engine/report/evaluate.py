"""The evaluate kind's report sections: the grid (groups x prompts x seeds), each group tested
against the control, its four charts, the contact sheets and the per-prompt table; and face
mining's candidates with their chart (the `mine` stage runs in an evaluate job).

Sections by name in `SECTIONS` (engine.kinds.evaluate's `report` lists them with the shared
page's and the replicate kind's `training`); file names from engine.layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from engine import layout
from engine.layout import EVALUATE_CHARTS, MINE_CHART
from engine.report.page import (JobFacts, Section, audit_head_item, axis_top, figure_html, fmt_number, html_attr, html_text, legend, new_figure,
                                no_face_marks, png)

GROUP_COLOURS = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
DECISION_COLOURS = {"accepted": "tab:green", "rejected_group": "tab:orange", "rejected_anchor": "tab:red", "no_face": "tab:gray"}


# ---------------------------------------------------------------------------- the grid

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
    legend(axis)


def evaluate_prompts_png(facts: JobFacts) -> bytes:
    """Mean drift per prompt x group (error bars: one standard deviation over the faces found);
    a (group, prompt) without any face has no bar, and says so."""

    def draw():
        info, groups, prompts = _grid(facts)
        figure = new_figure(11, 4.5)
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
        axis.set_ylim(0.0, axis_top([row.get("mean") for row in rows.values()] + [info.get("threshold")]))
        _per_prompt_axis(axis, len(prompts), "mean drift (1 - cosine)")
        _evaluate_title(figure, facts, "Average drift per prompt and group (faces found only)")
        return figure

    return png(draw)


def evaluate_no_face_png(facts: JobFacts) -> bytes:
    """Faces not found per prompt x group, out of the seeds rendered."""

    def draw():
        info, groups, prompts = _grid(facts)
        figure = new_figure(11, 4)
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

    return png(draw)


def evaluate_groups_png(facts: JobFacts) -> bytes:
    """Each group's drifts over every cell with a face: box and points."""

    def draw():
        info, groups, _ = _grid(facts)
        figure = new_figure(11, 4.5)
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
        axis.set_ylim(0.0, axis_top([d for drifts in values for d in drifts] + [info.get("threshold")]))
        axis.set_ylabel("drift (1 - cosine)")
        axis.grid(axis="y", alpha=0.3)
        legend(axis)
        _evaluate_title(figure, facts, "Drift per group (every cell with a face)")
        return figure

    return png(draw)


def evaluate_heatmap_png(facts: JobFacts) -> bytes:
    """A prompt x seed heatmap per group (one colour scale); cells without a face are grey and crossed."""

    def draw():
        info, groups, prompts = _grid(facts)
        seeds = list(info.get("seeds", []))
        if not (groups and prompts and seeds):
            figure = new_figure(11, 2)
            figure.text(0.5, 0.5, f"no grid recorded ({layout.EVALUATE_INFO})", ha="center", va="center")
            return figure
        panels = len(groups)
        figure = new_figure(11, 1.2 + panels * (0.45 * max(len(prompts), 1) + 0.9), right=1.4, hspace=0.9)
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

    return png(draw)


def _evaluate_summary(facts: JobFacts) -> list[str]:
    info, _, prompts = _grid(facts)
    groups = info.get("groups", [])
    items = [
        ("grid", f"{len(groups)} groups x {len(prompts)} prompts x {len(info.get('seeds', []))} seeds = {info.get('cells_total', 0)} cells"),
        ("faces not found", f"{info.get('faces_not_found', 0)} of {info.get('cells_total', 0)} cells (counted, never scored)"),
        ("groups", "; ".join(f"{g['name']}: {g['source']}" + (f" ({g['extra_training_steps']} training steps of its own)" if g.get("extra_training_steps") else "")
                             for g in groups) or "none"),
        audit_head_item(facts),
    ]
    out = ['<dl class="summary" id="summary">'] + [f"<dt>{html_text(key)}</dt><dd>{html_text(value)}</dd>" for key, value in items] + ["</dl>"]
    if info.get("faceid_note"):
        out.append('<p class="warning" id="faceid-note">' + html_text(info["faceid_note"]) + "</p>")
        out.append('<table id="by-group"><tr><th>group</th><th>ArcFace drift, mean</th><th>dlib distance, mean</th><th>faces found</th></tr>')
        for row in info.get("by_group", []):
            out.append(f"<tr><td>{html_text(row['group'])}</td><td>{fmt_number(row['mean'])}</td><td>{fmt_number(row.get('identity2_mean'))}</td>"
                       f"<td>{row['faces_found']} / {row['cells']}</td></tr>")
        out.append("</table>")
    tests = info.get("tests", [])
    if tests:
        out.append('<section id="evaluate-tests"><h2>Each group against the control</h2><p>' + html_text(info.get("test_rule", "")) + "</p>")
        out.append('<table id="tests"><tr><th>group</th><th>pairs</th><th>excluded (no face)</th><th>median difference</th><th>closer / farther / equal</th>'
                   "<th>p</th><th>p (Holm)</th><th>method</th></tr>")
        for test in tests:
            p_value = _p(test["p_value"]) if test["p_value"] is not None else html_text(test.get("reason") or "—")
            out.append(f"<tr><td>{html_text(test['group'])}</td><td>{test['n']}</td><td>{test['excluded']}</td><td>{fmt_number(test['median_difference'])}</td>"
                       f"<td>{test['closer']} / {test['farther']} / {test['equal']}</td><td>{p_value}</td><td>{_p(test.get('p_holm'))}</td>"
                       f"<td>{html_text(test.get('method') or '—')}</td></tr>")
        out.append("</table></section>")
    return out


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _evaluate_charts(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="evaluate-charts"><h2>Charts</h2>']
    captions = {"prompts": "average drift per prompt and group, one standard deviation as error bar; faces found only",
                "no_face": "faces not found per prompt and group", "groups": "each group's drifts", "heatmap": "every cell: prompt x seed per group"}
    for key, rel in EVALUATE_CHARTS.items():
        out.append(figure_html(html_attr(quote(rel)), rel, "chart", [html_text(captions[key])], "evaluate-" + key))
    return out + ["</section>"]


def _evaluate_sheets(facts: JobFacts, job_src) -> list[str]:
    out = ['<section id="evaluate-sheets"><h2>Contact sheets: prompt rows x seed columns</h2>']
    for group in _grid(facts)[1]:
        sheet = layout.evaluate_sheet(group)
        out.append(figure_html(job_src(sheet), sheet, "sheet", [html_text(f"{group}: drift under each cell, NO FACE in red")]))
    return out + ["</section>"]


def _evaluate_table(facts: JobFacts) -> list[str]:
    info, _, prompts = _grid(facts)
    out = ['<section id="evaluate-table"><h2>Per group and prompt</h2><ol class="prompts">']
    out += [f"<li value=\"{i}\">p{i}: {html_text(prompt)}</li>" for i, prompt in enumerate(prompts)]
    out.append('</ol><table id="by-prompt"><tr><th>group</th><th>prompt</th><th>faces found</th><th>not found</th><th>mean</th><th>median</th><th>sd</th>'
               "<th>locked share</th></tr>")
    for row in info.get("by_prompt", []):
        out.append(f"<tr><td>{html_text(row['group'])}</td><td>p{row['prompt_index']}</td><td>{row['faces_found']}</td><td>{row['faces_not_found']}</td>"
                   f"<td>{fmt_number(row['mean'])}</td><td>{fmt_number(row['median'])}</td><td>{fmt_number(row['sd'])}</td><td>{fmt_number(row['locked_share'], 2)}</td></tr>")
    return out + ["</table></section>"]


# ---------------------------------------------------------------------------- face mining

def mine_chart_png(facts: JobFacts) -> bytes:
    """Each candidate's mean drift to the group and drift to the anchor, by decision, with the
    bound at the time; candidates without a face marked above the plot."""

    def draw():
        info = facts.mine or {}
        candidates = info.get("candidates", [])
        figure = new_figure(11, 4.5)
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
            no_face_marks(axis, missing, "tab:gray", "no face found")
        pruned = [p for p, c in zip(positions, candidates) if c.get("pruned_at") is not None]
        for p in pruned:
            axis.axvline(p, color="tab:purple", alpha=0.3, linewidth=3)
        axis.set_xlim(-0.6, max(len(candidates), 1) - 0.4)
        axis.set_ylim(0.0, axis_top([c.get("mean_drift_to_group") for c in candidates] + [c.get("anchor_drift") for c in candidates] + [anchor]))
        axis.set_xlabel("candidate, in the order judged (● mean drift to the group, ▲ drift to the anchor; purple band: pruned later)")
        axis.set_ylabel("drift (1 - cosine)")
        axis.grid(axis="y", alpha=0.3)
        legend(axis)
        _evaluate_title(figure, facts, "Mining: every candidate against the group and the anchor")
        return figure

    return png(draw)


def _mine(facts: JobFacts, job_src) -> list[str]:
    info = facts.mine
    out = ['<section id="mine"><h2>Face mining, anchored to the subject</h2>']
    if not info:
        return out + ["<p>No mining in this job ([mine] enabled = false).</p></section>"]
    decisions = ", ".join(f"{k} {v}" for k, v in sorted(info.get("decisions", {}).items())) or "none"
    out.append(f"<p>{html_text(info.get('stop_reason'))}: {len(info.get('members', []))} members from {len(info.get('candidates', []))} candidates "
               f"({html_text(decisions)}; {info.get('pruned', 0)} pruned later). Group centroid's drift to the reference: "
               f"{fmt_number(info.get('centroid_drift_to_reference'))}.</p>")
    out.append(figure_html(html_attr(quote(MINE_CHART)), MINE_CHART, "chart", [html_text("each candidate against the bound at the time and the anchor")], "mine"))
    members = info.get("member_files", [])
    if members:
        out.append('<div class="row">' + "".join(figure_html(job_src(file), file, "member", [html_text(Path(file).stem)]) for file in members) + "</div>")
    return out + ["</section>"]


SECTIONS = {
    "evaluate_summary": Section(lambda facts, job_src: _evaluate_summary(facts)),
    "evaluate_charts": Section(_evaluate_charts, {EVALUATE_CHARTS["prompts"]: evaluate_prompts_png, EVALUATE_CHARTS["no_face"]: evaluate_no_face_png,
                                                  EVALUATE_CHARTS["groups"]: evaluate_groups_png, EVALUATE_CHARTS["heatmap"]: evaluate_heatmap_png}),
    "evaluate_sheets": Section(_evaluate_sheets),
    "evaluate_table": Section(lambda facts, job_src: _evaluate_table(facts)),
    "mine": Section(_mine, {MINE_CHART: mine_chart_png}),
}
