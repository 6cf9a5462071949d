"""codi-nnsight: find where a continuous chain-of-thought (CODI) model reasons.

    import codi_nnsight as cn
    model = cn.load_model()                    # the bundled toy CODI (or a codi.json / preset)
    ds = cn.patch_sweep(model, cn.demo_pairs(), positions="each")
    print(ds.codi.summary()); ds.codi.plot(); ds.codi.report("report")

Every command has a Python twin here: `load_model`, `load_pairs` / `demo_pairs` (`--pairs`, the
bundled demo pairs by default), `evaluate_pairs`, `patch_sweep` (`patch`), `ablate`
(`patch --ablation`), `attribute`, `early_exit`, `logit_lens`, `attention_readout`, `probe`,
`train_tuned_lens` / `load_tuned_lens`, `transplant`, `steer`, `thought_graph`, `report`;
`codi_nnsight.analysis` holds the statistics.
Every Dataset gets the `codi` accessor (`summary`, `plot`, `report`) once the package is imported.

Subpackages follow the data flow: `data` (pairs) → `model` (CODI under nnsight) → `patching`
(sweeps) and `readouts` → the results Dataset → `analysis` (statistics, figures, report);
`testing` holds tiny models for tests, `toy` the bundled toy model's training code.
"""

from __future__ import annotations

import os as _os

# torch's OpenMP threads spin while they wait, which starves a shared or busy core (the README's
# commands ran 3-4x slower under load). The policy is read once, when torch starts its thread pool,
# so it is set here, before the package imports torch; a value the user set is kept, and a process
# that imported torch before this package keeps whatever torch started with.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from types import ModuleType

from ._lazy import after_import, lazy_dir, lazy_getattr

__version__ = "0.1.0"

# Names resolve on first use: `codi-nnsight --help` must not pay for importing torch and nnsight.
# "module" exports the module's own name; "module:attr" another name for module.attr.
_EXPORTS = {
    "UserError": "errors",
    # the model
    "CODIModel": "model.wrapper",
    "load_model": "model.wrapper",
    "CODIConfig": "model.config",
    "PRESETS": "model.config",
    # pairs
    "Pair": "data.pairs",
    "PairSet": "data.pairs",
    "DEMO_PAIRS": "api",
    "demo_pairs": "api",
    "load_pairs": "api",
    "make_toy_pairs": "data.synthetic",
    "make_synthetic_pairs": "data.synthetic",
    # evaluate
    "evaluate_pairs": "model.inference",
    "accuracy_summary": "model.inference",
    "filter_pairs": "model.inference",
    # patch, ablate, attribute, early-exit
    "patch_sweep": "patching.sweep",
    "ablate": "api",
    "attribute": "patching.attribution:attribution_patching",
    "compare_with_exact": "patching.attribution",
    "verify_top": "patching.attribution",
    "early_exit": "patching.ablation",
    "gold_value_prob": "patching.metrics",
    "metric_function": "patching.metrics",
    # readouts
    "logit_lens": "readouts.lens",
    "attention_readout": "readouts.attention",
    "top_question_tokens": "readouts.attention",
    "gold_intermediates": "readouts.gold",
    "probe": "readouts.probe",
    "TunedLens": "readouts.tuned",
    "train_tuned_lens": "readouts.tuned",
    "save_tuned_lens": "readouts.tuned",
    "load_tuned_lens": "readouts.tuned",
    # interventions on thoughts
    "transplant": "interventions.transplant",
    "steer": "interventions.steer",
    "thought_graph": "interventions.graph",
    # results
    "report": "api",
    "analysis": ".",
    # parts for writing your own traces (docs/tutorials/04_your_own_traces.ipynb)
    "answer_tokens": "patching.plan",
    "output_tensor": "patching.sites",
    "decode": "model.inference",
}

__all__ = sorted([*_EXPORTS, "__version__"])


__getattr__ = lazy_getattr(__name__, _EXPORTS)
__dir__ = lazy_dir(globals(), _EXPORTS)


def _register_accessor(_: ModuleType) -> None:
    from . import accessor  # noqa: F401  # registering `ds.codi` is the import's effect


# `ds.codi` on every Dataset, without importing xarray here (0.4 s): now if it is loaded, else
# right after it is.
after_import("xarray", _register_accessor)
