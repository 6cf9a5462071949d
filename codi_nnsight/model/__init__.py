"""The CODI model: its description, family table, checkpoint loading, module and nnsight wrapper.

`config` (the `codi.json`), `families` (where each architecture keeps its parts), `schedule`
(which call is which latent step), `module` (the CODI procedure as one `torch.nn.Module`),
`checkpoint` (strict loading of official checkpoints), `wrapper` (`CODIModel`, the nnsight
`Remotable`), `inference` (greedy answers), `remote` (running traces on NDIF).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

# Resolved on first use, so that light modules (`families`, `config`) import without torch.
_EXPORTS = {
    "CODIConfig": "config",
    "resolve_model_spec": "config",
    "CODIModel": "wrapper",
    "load_model": "wrapper",
    "Family": "families",
    "FAMILIES": "families",
    "CallSchedule": "schedule",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
