"""report.html: the job's evidence for a person to look at, made from the job folder alone.

engine.report.page is the shared page (reading the job folder, the page's frame, the sections
every kind may show, the chart canvas, the HTML helpers); engine.report.<kind> holds one kind's
sections and charts. Importing the package adds each kind module's sections to the page's
registry, so that a kind's `report` (engine.kinds.Kind.report) finds them by name; the page
imports no kind module (no import cycle inside the package).
"""

from engine.layout import DRIFT_CHART, EVALUATE_CHARTS, LOSS_CHART, MINE_CHART, ORIGINAL_PATTERN, REPORT_FILE  # noqa: F401
from engine.report import evaluate, replicate, restore, retouch
from engine.report.evaluate import evaluate_groups_png, evaluate_heatmap_png, evaluate_no_face_png, evaluate_prompts_png, mine_chart_png  # noqa: F401
from engine.report.page import SECTIONS, JobFacts, Regenerated, Section, add_sections, build_report, regenerate_report, write_report  # noqa: F401
from engine.report.replicate import drift_chart_png, loss_chart_png  # noqa: F401

for _kind in (replicate, retouch, restore, evaluate):
    add_sections(_kind.SECTIONS)
