"""report.html: the job's evidence for a person to look at (engine.report.page, the shared page)."""

from engine.report.page import *  # noqa: F401,F403 - the pure move's stand-in; the split names its public names
from engine.report.page import (DRIFT_CHART, LOSS_CHART, REPORT_FILE, SECTIONS, JobFacts, Regenerated, build_report,  # noqa: F401
                                evaluate_groups_png, evaluate_heatmap_png, evaluate_no_face_png, evaluate_prompts_png, regenerate_report,
                                write_report)
