"""Run reports: one self-contained HTML page comparing runs' training curves, with the PNGs beside it.

Each run is a run directory (``metrics.jsonl``, ``summary.json``). Every panel overlays the runs, one color per
run throughout; the seeds of a variant (runs named ``<variant>-s<seed>``, as ``cegppo sweep`` names them) share
one color and are drawn as their mean with a min–max band, unless ``per_seed`` asks for each run. A metric that a run did not log (an older run without quadrant metrics) is left out of that run's
curves, and a panel no run logged becomes a note; a report never fails for missing metrics.
"""

from cegppo.report.page import Report, final_and_best, write_report
from cegppo.report.panels import Panel, build_panels
from cegppo.report.runs import Run, load_run

__all__ = ["Panel", "Report", "Run", "build_panels", "final_and_best", "load_run", "write_report"]
