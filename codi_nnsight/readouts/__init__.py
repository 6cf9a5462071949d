"""Readouts: analyses that read what each continuous thought holds (logit and tuned lens, attention, probes).

    from codi_nnsight.readouts import attention_readout, gold_intermediates, logit_lens
    from codi_nnsight.readouts.probe import probe  # (`readouts.probe` is the module's name)

Every readout runs the real CODI loop in one nnsight trace per batch (torch only in the trace
body, so `remote=` works) and returns a labeled `xarray.Dataset`; layouts and definitions are in
docs/readouts.md. Names are imported lazily so `import codi_nnsight.readouts` stays light.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "gold_intermediates": "gold",
    "logit_lens": "lens",
    "attention_readout": "attention",
    "top_question_tokens": "attention",
    "TunedLens": "tuned",
    "train_tuned_lens": "tuned",
    "save_tuned_lens": "tuned",
    "load_tuned_lens": "tuned",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
