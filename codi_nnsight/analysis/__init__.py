"""Analysis of codi-nnsight results Datasets: statistics, figures and reports.

Everything here works from the results ``xr.Dataset`` alone (see ``docs/results-schema.md``);
no model code is imported.
"""

from .io import ResultsError, load, validate
from .report import format_layer_table, write_report
from .stats import (
    bh_adjust,
    by,
    compare,
    critical_layers,
    layer_similarity,
    layer_summary,
    layer_tests,
    peak_layer,
)

__all__ = [
    "ResultsError",
    "bh_adjust",
    "by",
    "compare",
    "critical_layers",
    "format_layer_table",
    "layer_similarity",
    "layer_summary",
    "layer_tests",
    "load",
    "peak_layer",
    "validate",
    "write_report",
]
