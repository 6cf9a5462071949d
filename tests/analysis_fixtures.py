"""Synthetic results Datasets that follow docs/results-schema.md, for the analysis tests."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

METRIC_UNITS = {
    "kl": ("KL(patched || baseline) at the answer position", "nats"),
    "l2": ("RMS logit difference patched vs baseline", "logits"),
    "top1_changed": ("argmax changed vs baseline", "1"),
    "logit_diff": ("logit(clean answer) - logit(corrupted answer)", "logits"),
    "recovery": ("fraction of logit_diff recovered", "1"),
    "p_clean": ("probability of clean answer first token", "1"),
    "p_corrupted": ("probability of corrupted answer first token", "1"),
    "logp_clean_answer": ("teacher-forced log-prob of clean answer", "nats"),
    "logp_corrupted_answer": ("teacher-forced log-prob of corrupted answer", "nats"),
    "answer": ("greedy-decoded answer after patching", "1"),
    "flipped": ("answer equals the source run's true answer", "1"),
}

COMPONENT_SCALE = {"resid": 1.0, "attn": 0.5, "mlp": 0.25, "latent": 1.0}


def make_results(
    n_pairs: int,
    n_layers: int,
    effect_layer: int | None = None,
    positions: int | None = None,
    components: list[str] | None = None,
    seed: int = 0,
    effect: float = 0.4,
) -> xr.Dataset:
    """A results Dataset with gamma noise everywhere and a planted KL/recovery effect.

    ``effect_layer`` gets ``+effect`` nats of KL (scaled by 1/(1+position) and per component);
    noise has the same distribution (gamma(2, 0.05), mean 0.1) at every layer.
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
    baseline = -2.0 + rng.normal(0, 0.3, n_pairs)
    target = 2.0 + rng.normal(0, 0.3, n_pairs)
    bcast = (slice(None),) + (None,) * (len(shape) - 1)
    logit_diff = baseline[bcast] + recovery * (target - baseline)[bcast]
    answer_clean = rng.integers(1, 100, n_pairs).astype(float)
    answer_corrupted = answer_clean + rng.integers(1, 10, n_pairs)
    flipped = (rng.random(shape) < np.clip(recovery, 0.02, 0.98)).astype(float)
    answer = np.where(flipped == 1.0, answer_clean[bcast], answer_corrupted[bcast])
    p_clean = 1.0 / (1.0 + np.exp(-logit_diff))
    metrics = {
        "kl": kl,
        "l2": 3.0 * np.sqrt(kl),
        "top1_changed": (kl > 0.3).astype(float),
        "logit_diff": logit_diff,
        "recovery": recovery,
        "p_clean": p_clean,
        "p_corrupted": 1.0 - p_clean,
        "logp_clean_answer": np.log(p_clean) - 1.0,
        "logp_corrupted_answer": np.log(1.0 - p_clean) - 1.0,
        "answer": answer,
        "flipped": flipped,
    }
    data_vars = {
        name: (dims, np.asarray(v, dtype=np.float64),
               {"long_name": METRIC_UNITS[name][0], "units": METRIC_UNITS[name][1]})
        for name, v in metrics.items()
    }
    data_vars.update(
        clean_predicted=("pair", answer_clean.copy()),
        corrupted_predicted=("pair", answer_corrupted.copy()),
        clean_correct=("pair", np.ones(n_pairs)),
        corrupted_correct=("pair", np.ones(n_pairs)),
        baseline_logit_diff=("pair", baseline),
        target_logit_diff=("pair", target),
    )
    steps = rng.integers(1, 5, n_pairs).astype(np.int64)
    if n_pairs > 4:
        steps[0] = -1  # one pair with unknown step count, as in real pairs files
    coords.update(
        question_clean=("pair", np.array([f"Q{i}: {a:g} + 0?" for i, a in
                                          enumerate(answer_clean)], dtype=object)),
        question_corrupted=("pair", np.array([f"Q{i}: {a:g} + 0?" for i, a in
                                              enumerate(answer_corrupted)], dtype=object)),
        answer_clean=("pair", answer_clean),
        answer_corrupted=("pair", answer_corrupted),
        reasoning_steps=("pair", steps),
        difficulty=("pair", rng.random(n_pairs)),
    )
    comp = ",".join(components) if components else "resid"
    attrs = {
        "codi_nnsight_schema": "codi-nnsight/results/1",
        "model_name": "zen-E/CODI-gpt2",
        "model_config": json.dumps({"n_layer": n_layers, "num_latent": positions or 6}),
        "checkpoint_sha256": "ab" * 32,
        "mode": "recurrent",
        "direction": "denoise",
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
        "sanity_self_patch_max_kl": 1.2e-7,
        "sanity_min_kl": 0.013,
        "sanity_full_patch_max_abs": 3.1e-6,
        "sanity_passed": 1,
        "sanity_details": json.dumps({"self_patch": {"max_kl": 1.2e-7, "passed": True},
                                      "full_patch": {"max_abs": 3.1e-6, "passed": True}}),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)
