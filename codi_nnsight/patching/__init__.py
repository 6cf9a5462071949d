"""Activation patching at the continuous thoughts, in the order the data flows:

`sites` (what can be patched) and `metrics` (what is measured) are the two tables everything
else reads; `options` and `config` describe one sweep; `plan` lays out the rows and patches of a
batch; `trace` runs it in one nnsight trace; `dataset` turns rows into the labeled Dataset;
`sanity` holds the invariants every sweep checks; `store` keeps finished batches on disk;
`sweep` is the public entry point, `patch_sweep`; `summary` says what a sweep found in a line.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

# Resolved on first use, so that light modules (`options`, `sites`) import without torch.
_EXPORTS = {
    "COMPONENTS": "sites",
    "SITES": "sites",
    "Site": "sites",
    "DIRECTIONS": "options",
    "MODES": "options",
    "POSITIONS": "options",
    "SweepConfig": "config",
    "parse_layers": "config",
    "METRICS": "metrics",
    "Metric": "metrics",
    "gold_value_prob": "metrics",
    "metric_function": "metrics",
    "answer_tokens": "plan",
    "plan_batch": "plan",
    "prompt_inputs": "plan",
    "SANITY_CHECKS": "sanity",
    "SanityCheck": "sanity",
    "patch_sweep": "sweep",
    "attribution_patching": "attribution",
    "compare_with_exact": "attribution",
    "verify_top": "attribution",
    "full_patch_check": "trace",
    "run_batch": "trace",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
