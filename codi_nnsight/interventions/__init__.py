"""Interventions on the continuous thoughts: transplant, steering, the thought-to-thought graph.

    from codi_nnsight.interventions import steer, thought_graph, transplant

Each builds a list of edited runs (`core.Row`) and runs them through the command's `Run` in one
nnsight trace per batch (`core.run_rows`, torch only in the trace body, so `remote=` works),
walking the call schedule; each returns a labeled `xarray.Dataset` of a result kind declared in
`codi_nnsight.contract` (layouts: docs/interventions.md). Names are imported lazily.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "transplant": "transplant",
    "steer": "steer",
    "thought_graph": "graph",
    "carried_answer": "chain",
    "run_rows": "core",
    "Edit": "core",
    "Row": "core",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
