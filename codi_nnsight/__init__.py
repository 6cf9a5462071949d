"""codi-nnsight: find where a continuous chain-of-thought (CODI) model reasons.

    from codi_nnsight import load_model, load_pairs, patch_sweep
    model = load_model()                       # the bundled toy CODI (or a codi.json / preset)
    ds = patch_sweep(model, load_pairs("data/demo_pairs.json"))

Subpackages follow the data flow: `data` (pairs) → `model` (CODI under nnsight) → `patching`
(sweeps) and `readouts` → the results Dataset → `analysis` (statistics, figures, report);
`testing` holds tiny models for tests, `toy` the bundled toy model's training code.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Names resolve on first use: `codi-nnsight --help` must not pay for importing torch and nnsight.
_EXPORTS = {
    "UserError": "codi_nnsight.errors",
    "CODIModel": "codi_nnsight.model.wrapper",
    "load_model": "codi_nnsight.model.wrapper",
    "PairSet": "codi_nnsight.data.pairs",
    "load_pairs": "codi_nnsight.data.pairs",
    "patch_sweep": "codi_nnsight.patching.sweep",
}

__all__ = ["CODIModel", "PairSet", "UserError", "__version__", "load_model", "load_pairs", "patch_sweep"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'codi_nnsight' has no attribute {name!r}")
