"""codi-nnsight: find where a continuous chain-of-thought (CODI) model reasons.

    from codi_nnsight import load_model, load_pairs, patch_sweep
    model = load_model()                       # the bundled toy CODI (or a codi.json / preset)
    ds = patch_sweep(model, load_pairs("data/demo_pairs.json"))

Subpackages follow the data flow: `data` (pairs) → `model` (CODI under nnsight) → `patching`
(sweeps) and `readouts` → the results Dataset → `analysis` (statistics, figures, report);
`testing` holds tiny models for tests, `toy` the bundled toy model's training code.
"""

from __future__ import annotations

from ._lazy import lazy_getattr

__version__ = "0.1.0"

# Names resolve on first use: `codi-nnsight --help` must not pay for importing torch and nnsight.
_EXPORTS = {
    "UserError": "errors",
    "CODIModel": "model.wrapper",
    "load_model": "model.wrapper",
    "PairSet": "data.pairs",
    "load_pairs": "data.pairs",
    "patch_sweep": "patching.sweep",
}

__all__ = ["CODIModel", "PairSet", "UserError", "__version__", "load_model", "load_pairs", "patch_sweep"]


__getattr__ = lazy_getattr(__name__, _EXPORTS)
