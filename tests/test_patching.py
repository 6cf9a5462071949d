"""Patching sweeps against an independent batch-1 reference built from plain PyTorch hooks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from codi_nnsight.data.pairs import Pair, PairSet, Question
from codi_nnsight.errors import UserError
from codi_nnsight.patching.sweep import patch_sweep
from codi_nnsight.patching.trace import answer_tokens, parse_layers

TOL = 1e-9


def make_pairs() -> PairSet:
    qs = [("Sam has 4 cats and 3 dogs. How many pets?", 7, "Sam has 5 cats and 3 dogs. How many pets?", 8),
          ("A bag has 12 nuts; 5 are eaten. How many remain?", 7,
           "A bag has 12 nuts; 6 are eaten. How many remain?", 6),
          ("What is 9 times 3?", 27, "What is 9 times 4 plus 10?", 46)]
    return PairSet.from_pairs([Pair(i, Question(c, a, {"reasoning_steps": i + 1}), Question(x, b, {}))
                               for i, (c, a, x, b) in enumerate(qs)])


def reference_metrics(ref, model, pair, component, layer, position, mode, direction):
    """kl, l2, top1_changed for one variant, computed the slow, obvious way."""
    src, tgt = (pair.clean, pair.corrupted) if direction == "denoise" else (pair.corrupted, pair.clean)
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    K = ref.num_latent
    source = ref.run(src.question, suffix=toks.suffix, component=component)
    base = ref.run(tgt.question, suffix=toks.suffix, component=component)
    steps = [k for k in range(K) if position in (-1, k)]
    if component == "latent":
        override = {k: source["latents"][k] for k in steps}
        if mode == "frozen":
            override.update({k: base["latents"][k] for k in range(K) if k not in steps})
        patched = ref.run(tgt.question, suffix=toks.suffix, latent_override=override)
    else:
        patch = {layer: {k + 1: source["block_latent_outputs"][layer][k] for k in steps}}
        override = {k: base["latents"][k] for k in range(K)} if mode == "frozen" else None
        patched = ref.run(tgt.question, suffix=toks.suffix, patch=patch, component=component,
                          latent_override=override)
    lp, lb = torch.log_softmax(patched["logits"], -1), torch.log_softmax(base["logits"], -1)
    kl = float((lp.exp() * (lp - lb)).sum())
    l2 = float((patched["logits"] - base["logits"]).pow(2).mean().sqrt())
    top1 = float(patched["logits"].argmax() != base["logits"].argmax())
    return kl, l2, top1


CASES = list(itertools.product(["resid", "attn", "mlp", "latent"], ["all", "each"],
                               ["recurrent", "frozen"], ["denoise", "noise"]))


@pytest.mark.parametrize("component,positions,mode,direction", CASES)
def test_sweep_matches_reference(tiny_models, references, component, positions, mode, direction):
    family = "llama" if CASES.index((component, positions, mode, direction)) % 2 else "gpt2"
    model, ref = tiny_models[family], references[family]
    pairs = make_pairs()[:1] if positions == "each" else make_pairs()[:2]
    ds = patch_sweep(model, pairs, component=component, positions=positions, mode=mode,
                     direction=direction, batch_size=2)
    layers = [0] if component == "latent" else list(range(model.n_layers))
    assert list(ds["layer"].values) == layers
    for i, pair in enumerate(pairs):
        for li, L in enumerate(layers):
            for p in (range(model.num_latent) if positions == "each" else [-1]):
                idx = dict(pair=i, layer=li) | ({"position": p} if positions == "each" else {})
                kl, l2, top1 = reference_metrics(ref, model, pair, component, L, p, mode, direction)
                assert abs(float(ds["kl"].isel(idx)) - kl) < TOL
                assert abs(float(ds["l2"].isel(idx)) - l2) < TOL
                assert float(ds["top1_changed"].isel(idx)) == top1
    assert ds.attrs["sanity_passed"] == 1


def test_batched_equals_one_pair_at_a_time(tiny_models):
    model = tiny_models["llama"]
    pairs = make_pairs()
    together = patch_sweep(model, pairs, batch_size=3)
    for n in (1, 2):
        apart = patch_sweep(model, pairs, batch_size=n)
        for name in ("kl", "l2", "logit_diff", "p_clean", "logp_clean_answer", "logp_corrupted_answer"):
            a, b = together[name].values, apart[name].values
            assert np.allclose(a, b, atol=TOL, rtol=0, equal_nan=True), name


def test_metrics_invariants_and_recovery(tiny_models):
    model = tiny_models["gpt2"]
    ds = patch_sweep(model, make_pairs(), batch_size=3)
    assert (ds["kl"].values >= -1e-12).all()
    assert (np.abs(ds["self_patch_kl"].values) <= 1e-12).all()
    # recovery is (patched - baseline) / (source - baseline) of logit_diff, per pair
    ld, b, t = ds["logit_diff"], ds["baseline_logit_diff"], ds["target_logit_diff"]
    expected = (ld - b) / (t - b)
    assert np.allclose(ds["recovery"].values, expected.values, equal_nan=True)
    # logit_diff is NaN exactly where both answers start with the same token
    for i, pair in enumerate(make_pairs()):
        toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
        assert np.isnan(ds["logit_diff"].values[i]).all() == (toks.clean[0] == toks.corrupted[0])
    assert set(np.unique(ds["flipped"].values)) <= {0.0, 1.0}


def test_source_logprob_metrics_match_reference(tiny_models, references):
    model, ref = tiny_models["gpt2"], references["gpt2"]
    pair = make_pairs()[0]
    ds = patch_sweep(model, [pair], layers=[1])
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    src = ref.run(pair.clean.question, suffix=toks.suffix, patch=None,
                  candidates=[toks.clean, toks.corrupted])
    base = ref.run(pair.corrupted.question, suffix=toks.suffix)
    source_stats = model.codi(**model.prepare([pair.clean.question], suffix_ids=torch.tensor(toks.suffix)))
    assert (source_stats["logits"][0] - src["logits"]).abs().max() < TOL
    lb = torch.log_softmax(base["logits"], -1)
    assert abs(float(ds["baseline_logit_diff"][0]) - float(base["logits"][toks.clean[0]]
                                                           - base["logits"][toks.corrupted[0]])) < TOL \
        or toks.clean[0] == toks.corrupted[0]
    assert ds["p_clean"].shape == (1, 1)
    assert float(ds["p_clean"][0, 0]) > 0 and float(lb.exp().sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("text,expected", [("0-2,4", [0, 1, 2, 4]), ("3", [3]), (None, [0, 1, 2, 3, 4])])
def test_parse_layers(text, expected):
    assert parse_layers(text, 5) == expected


@pytest.mark.parametrize("kwargs,message", [
    ({"layers": [5]}, "--layers: layer 5 out of range (model has 2 layers, 0-1)"),
    ({"layers": []}, "--layers: empty layer list"),
    ({"component": "heads"}, "--component 'heads': expected one of resid, attn, mlp, latent"),
    ({"mode": "frozn"}, "--mode 'frozn': expected one of recurrent, frozen"),
])
def test_bad_sweep_arguments(tiny_models, kwargs, message):
    with pytest.raises(UserError) as e:
        patch_sweep(tiny_models["gpt2"], make_pairs(), **kwargs)
    assert str(e.value) == message


def test_parse_layers_errors():
    with pytest.raises(UserError, match="--layers: cannot read 'x'"):
        parse_layers("1,x", 4)
    with pytest.raises(UserError, match="--layers: empty layer list"):
        parse_layers("", 4)


def test_full_patch_check_catches_a_broken_patch(tiny_models, monkeypatch):
    from codi_nnsight.patching import trace as patching

    model = tiny_models["llama"]
    pairs = make_pairs()
    ok = patching.full_patch_check(model, pairs)
    assert ok["pair_id"] == 0 and ok["max_abs"] < TOL
    # A patch that misses the question tokens must be caught (the check can fail).
    broken = patching.full_patch_check(model, pairs, skip_question=True)
    assert broken["max_abs"] > 1e-3
