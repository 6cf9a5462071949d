"""Synthetic results Datasets that follow docs/results-schema.md (schema 2), for the analysis tests.

The metric names, long names and units are listed once, in :data:`METRIC_UNITS` (taken from the
metric registry ``codi_nnsight.patching.metrics`` when that module exists).
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

SCHEMA_2 = "codi-nnsight/results/2"
SCHEMA_1 = "codi-nnsight/results/1"

METRIC_UNITS: dict[str, tuple[str, str]] = {
    "kl": ("KL(patched || baseline) at the answer position", "nats"),
    "l2": ("RMS logit difference patched vs baseline", "logits"),
    "top1_changed": ("argmax (excluding [eot]) changed vs baseline", "1"),
    "logit_diff": ("logit(clean answer) - logit(corrupted answer), first token", "logits"),
    "recovery": ("(P - B) / (S - B) of logit_diff", "1"),
    "p_clean": ("probability of clean answer first token", "1"),
    "p_corrupted": ("probability of corrupted answer first token", "1"),
    "logp_clean_answer": ("teacher-forced log-prob of clean answer", "nats"),
    "logp_corrupted_answer": ("teacher-forced log-prob of corrupted answer", "nats"),
    "logprob_diff": ("logp_clean_answer - logp_corrupted_answer", "nats"),
    "logprob_recovery": ("(P - B) / (S - B) of logprob_diff", "1"),
    "answer": ("greedy-decoded answer after patching", "1"),
    "flipped": ("answer equals the source question's answer", "1"),
}
try:  # the lead's metric registry, when it exists, is the single source of names and units
    from codi_nnsight.patching import metrics as _registry  # type: ignore[attr-defined]

    _reg = getattr(_registry, "BY_NAME", None)  # name -> Metric(long_name, units, ...)
    if isinstance(_reg, dict) and set(METRIC_UNITS) <= set(_reg):
        METRIC_UNITS = {
            k: (str(getattr(v, "long_name", METRIC_UNITS[k][0])), str(getattr(v, "units", METRIC_UNITS[k][1])))
            for k, v in _reg.items()
            if k in METRIC_UNITS
        }
except ImportError:
    pass

#: schema-2 name -> schema-1 name of the renamed per-pair variables
RENAMED_TO_V1 = {
    "clean_prompted_answer": "clean_predicted",
    "corrupted_prompted_answer": "corrupted_predicted",
    "clean_prompted_correct": "clean_correct",
    "corrupted_prompted_correct": "corrupted_correct",
    "source_logit_diff": "target_logit_diff",
}
NEW_IN_V2 = ("logprob_diff", "logprob_recovery", "baseline_logprob_diff", "source_logprob_diff", "comparable")

COMPONENT_SCALE = {"resid": 1.0, "attn": 0.5, "mlp": 0.25, "latent": 1.0}


def make_results(
    n_pairs: int,
    n_layers: int,
    effect_layer: int | None = None,
    positions: int | None = None,
    components: list[str] | None = None,
    seed: int = 0,
    effect: float = 0.4,
    direction: str = "denoise",
    mode: str = "recurrent",
    n_equal: int = 0,
    n_same_first_token: int = 0,
) -> xr.Dataset:
    """A schema-2 results Dataset with gamma noise everywhere and a planted KL/recovery effect.

    ``effect_layer`` gets ``+effect`` nats of KL (scaled by 1/(1+position) and per component);
    noise has the same distribution (gamma(2, 0.05), mean 0.1) at every layer. The last
    ``n_equal`` pairs have equal clean and corrupted answers (``comparable`` 0, NaN comparison
    metrics); the ``n_same_first_token`` pairs before them have answers sharing their first token
    (NaN ``logit_diff`` / ``recovery``, defined log-prob metrics). ``direction`` "noise" swaps the
    roles: the baseline is the clean run and the source the corrupted one.
    """
    rng = np.random.default_rng(seed)
    dims = ["pair", "layer"]
    shape = [n_pairs, n_layers]
    coords: dict = {
        "pair": np.arange(100, 100 + n_pairs, dtype=np.int64),
        "layer": np.arange(n_layers, dtype=np.int64),
    }
    scale = np.zeros(shape)
    if effect_layer is not None:
        scale[:, effect_layer] = 1.0
    if positions is not None:
        dims.append("position")
        shape.append(positions)
        coords["position"] = np.arange(positions, dtype=np.int64)
        scale = scale[..., None] / (1.0 + np.arange(positions))
    if components is not None:
        dims.append("component")
        shape.append(len(components))
        coords["component"] = np.array(components, dtype=object)
        scale = scale[..., None] * np.array([COMPONENT_SCALE[c] for c in components])
    scale = np.broadcast_to(scale, shape)

    kl = rng.gamma(2.0, 0.05, size=shape) + effect * scale
    recovery = rng.normal(0.0, 0.1, size=shape) + 0.8 * scale
    sign = 1.0 if direction == "denoise" else -1.0  # denoise: baseline = corrupted run (clean answer loses)
    baseline = sign * (-2.0 + rng.normal(0, 0.3, n_pairs))
    source = sign * (2.0 + rng.normal(0, 0.3, n_pairs))
    bcast = (slice(None),) + (None,) * (len(shape) - 1)
    logit_diff = baseline[bcast] + recovery * (source - baseline)[bcast]
    answer_clean = rng.integers(1, 100, n_pairs).astype(float)
    answer_corrupted = answer_clean + rng.integers(1, 10, n_pairs)
    flipped = (rng.random(shape) < np.clip(recovery, 0.02, 0.98)).astype(float)
    source_answer, baseline_answer = (
        (answer_clean, answer_corrupted) if direction == "denoise" else (answer_corrupted, answer_clean)
    )
    answer = np.where(flipped == 1.0, source_answer[bcast], baseline_answer[bcast])
    p_clean = 1.0 / (1.0 + np.exp(-logit_diff))
    base_lp, src_lp = 1.5 * baseline, 1.5 * source
    logprob_diff = 1.5 * logit_diff
    metrics = {
        "kl": kl,
        "l2": 3.0 * np.sqrt(kl),
        "top1_changed": (kl > 0.3).astype(float),
        "logit_diff": logit_diff,
        "recovery": recovery.copy(),
        "p_clean": p_clean,
        "p_corrupted": 1.0 - p_clean,
        "logp_clean_answer": -1.0 + logprob_diff / 2,
        "logp_corrupted_answer": -1.0 - logprob_diff / 2,
        "logprob_diff": logprob_diff,
        "logprob_recovery": recovery.copy(),
        "answer": answer,
        "flipped": flipped,
    }
    per_pair = {
        "clean_prompted_answer": answer_clean.copy(),
        "corrupted_prompted_answer": answer_corrupted.copy(),
        "clean_prompted_correct": np.ones(n_pairs),
        "corrupted_prompted_correct": np.ones(n_pairs),
        "baseline_logit_diff": baseline,
        "source_logit_diff": source,
        "baseline_logprob_diff": base_lp,
        "source_logprob_diff": src_lp,
        "baseline_logp_clean_answer": -1.0 + base_lp / 2,
        "baseline_logp_corrupted_answer": -1.0 - base_lp / 2,
        "source_logp_clean_answer": -1.0 + src_lp / 2,
        "source_logp_corrupted_answer": -1.0 - src_lp / 2,
        "self_patch_kl": np.full(n_pairs, 1e-9),
        "self_patch_l2": np.full(n_pairs, 1e-6),
        "comparable": np.ones(n_pairs),
    }
    equal = np.arange(n_pairs - n_equal, n_pairs)
    same = np.arange(n_pairs - n_equal - n_same_first_token, n_pairs - n_equal)
    for idx in (same, equal):
        for name in ("logit_diff", "recovery"):
            metrics[name][idx] = np.nan
        for name in ("baseline_logit_diff", "source_logit_diff"):
            per_pair[name][idx] = np.nan
    answer_corrupted[equal] = answer_clean[equal]
    per_pair["corrupted_prompted_answer"][equal] = answer_clean[equal]
    per_pair["comparable"][equal] = 0.0
    for name in ("flipped", "logprob_diff", "logprob_recovery"):
        metrics[name][equal] = np.nan
    for name in ("baseline_logprob_diff", "source_logprob_diff"):
        per_pair[name][equal] = np.nan
    metrics["answer"][equal] = answer_clean[equal][(slice(None),) + (None,) * (len(shape) - 1)]
    data_vars = {
        name: (
            dims,
            np.asarray(v, dtype=np.float64),
            {"long_name": METRIC_UNITS[name][0], "units": METRIC_UNITS[name][1]},
        )
        for name, v in metrics.items()
    }
    data_vars.update({name: ("pair", np.asarray(v, dtype=np.float64)) for name, v in per_pair.items()})
    steps = rng.integers(1, 5, n_pairs).astype(np.int64)
    if n_pairs > 4:
        steps[0] = -1  # one pair with unknown step count, as in real pairs files
    coords.update(
        question_clean=("pair", np.array([f"Q{i}: {a:g} + 0?" for i, a in enumerate(answer_clean)], dtype=object)),
        question_corrupted=(
            "pair",
            np.array([f"Q{i}: {a:g} + 0?" for i, a in enumerate(answer_corrupted)], dtype=object),
        ),
        answer_clean=("pair", answer_clean),
        answer_corrupted=("pair", answer_corrupted),
        reasoning_steps=("pair", steps),
        difficulty=("pair", rng.random(n_pairs)),
    )
    comp = ",".join(components) if components else "resid"
    attrs = {
        "codi_nnsight_schema": SCHEMA_2,
        "model_name": "zen-E/CODI-gpt2",
        "model_config": json.dumps({"n_layer": n_layers, "num_latent": positions or 6}),
        "checkpoint_sha256": "ab" * 32,
        "mode": mode,
        "direction": direction,
        "component": comp,
        "positions": "each" if positions is not None else "all",
        "dtype": "float32",
        "device": "cpu",
        "seed": seed,
        "command": "codi-nnsight patch --pairs pairs.jsonl --out results.nc",
        "start_time": "2025-01-01T00:00:00+00:00",
        "end_time": "2025-01-01T00:10:00+00:00",
        "version_codi_nnsight": "0.1.0",
        "version_nnsight": "0.8.1",
        "version_torch": "2.13.0",
        "version_transformers": "5.24.0",
        "pairs_file": "pairs.jsonl",
        "pairs_sha256": "cd" * 32,
        "recovery_min_denominator": 0.5,
        "question_normalization": "strip",
        "sanity_self_patch_max_kl": 1.2e-7,
        "sanity_min_kl": 0.013,
        "sanity_full_patch_max_abs": 3.1e-6,
        "sanity_passed": 1,
        "sanity_details": json.dumps(
            {
                "self_patch": {"value": 1.2e-7, "threshold": 1e-6, "passed": True},
                "kl_nonnegative": {"value": 0.013, "threshold": -1e-7, "passed": True},
                "full_patch": {"value": 3.1e-6, "threshold": 1e-4, "pair_id": 100, "passed": True},
            }
        ),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def to_schema1(ds: xr.Dataset) -> xr.Dataset:
    """The same results as a schema-1 file would have held them (old names, ``frozen`` mode)."""
    old = ds.drop_vars([v for v in NEW_IN_V2 if v in ds.variables]).rename(
        {k: v for k, v in RENAMED_TO_V1.items() if k in ds.variables}
    )
    old.attrs = {k: v for k, v in ds.attrs.items() if k not in ("recovery_min_denominator", "question_normalization")}
    old.attrs["codi_nnsight_schema"] = SCHEMA_1
    old.attrs["mode"] = {"no-feedback": "frozen"}.get(ds.attrs["mode"], ds.attrs["mode"])
    return old


#: Per-layer mean KL of the default run (toy model, 24 demo pairs, `codi-nnsight patch`): an onset
#: between layers 1 and 2, then a slow, steady rise, with overlapping CIs at the top.
TOY_PROFILE = (0.0097, 0.35, 3.34, 3.72, 4.07, 4.12, 4.28, 4.53)


def make_rising_results(n_pairs: int = 24, seed: int = 0, profile: tuple[float, ...] = TOY_PROFILE) -> xr.Dataset:
    """:func:`make_results` with ``kl`` shaped like the default run: each pair scales the shared
    ``profile`` by its own factor (pairs differ a lot, so the CIs of neighbouring layers overlap),
    plus a little noise (so every step up is consistent across pairs, as in the real run)."""
    ds = make_results(n_pairs, len(profile), seed=seed).copy(deep=True)
    rng = np.random.default_rng(seed + 1)
    scale = rng.lognormal(0.0, 0.35, n_pairs)[:, None]
    steps = np.diff(np.asarray(profile), prepend=0.0)[None, :] * rng.uniform(0.6, 1.4, (n_pairs, len(profile)))
    ds["kl"].values[:] = scale * np.cumsum(steps, axis=1) + rng.gamma(2.0, 0.002, (n_pairs, len(profile)))
    return ds
