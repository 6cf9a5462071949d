"""Analysis of codi-nnsight results Datasets: statistics, figures and reports.

Everything here works from the results ``xr.Dataset`` alone (see ``docs/results-schema.md``);
no model code is imported. Schema-1 files are read with their variables renamed to schema 2.
"""

from .compare import compare_models, comparison_summary, write_comparison
from .io import SUPPORTED_SCHEMAS, ResultsError, load, upgrade, validate
from .readouts import (
    is_readout,
    lens_top1_rates,
    plot_attention_tokens,
    plot_lens_ranks,
    plot_probe,
    readout_summary,
    write_readout_report,
)
from .report import clear_report_files, format_layer_table, write_report
from .sequence import plot_sequence, region_means, sequence_finding, thought_view
from .stats import (
    NEGLIGIBLE,
    bh_adjust,
    by,
    compare,
    critical_layers,
    excluded_pairs,
    layer_similarity,
    layer_summary,
    layer_tests,
    peak_layer,
    recovery_ratio,
)

__all__ = [
    "NEGLIGIBLE",
    "SUPPORTED_SCHEMAS",
    "ResultsError",
    "bh_adjust",
    "by",
    "clear_report_files",
    "compare",
    "compare_models",
    "comparison_summary",
    "critical_layers",
    "excluded_pairs",
    "format_layer_table",
    "layer_similarity",
    "layer_summary",
    "layer_tests",
    "load",
    "peak_layer",
    "recovery_ratio",
    "upgrade",
    "validate",
    "is_readout",
    "lens_top1_rates",
    "plot_attention_tokens",
    "plot_lens_ranks",
    "plot_probe",
    "readout_summary",
    "write_comparison",
    "plot_sequence",
    "region_means",
    "sequence_finding",
    "thought_view",
    "write_readout_report",
    "write_report",
]
