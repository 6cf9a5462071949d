"""Transplant, steer and the thought graph against an independent plain-hook computation.

The reference is `reference.ReferenceCODI` (peft-wrapped LoRA unmerged, transformers' sdpa
attention, plain PyTorch forward hooks, batch 1, no nnsight): every intervened state is computed
here from the reference's own unedited run and written in with its hooks, and every metric is
recomputed from its outputs. float64 throughout; agreement to 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from readout_reference import ReadoutReference

from codi_nnsight.data.synthetic import make_toy_pairs
from codi_nnsight.interventions.graph import thought_graph
from codi_nnsight.interventions.steer import steer
from codi_nnsight.interventions.transplant import donor_question, transplant
from codi_nnsight.patching import answer_tokens
from codi_nnsight.patching.ablation import norm_scaled_sigma, seeded_normal

TOL = 1e-9
FAMILIES = ("gpt2", "llama")


def pairs3():
    return make_toy_pairs(3, seed=2)


def _kl(lp, lb):
    return float((lp.exp() * (lp - lb)).sum())


def _run(ref, question, suffix, k, layer, state, candidates=None):
    """The reference run with the state at latent k (the thought, or block `layer`'s output) set to `state`."""
    if layer is None:
        return ref.run(question, suffix=suffix, latent_override={k: state}, candidates=candidates)
    return ref.run(question, suffix=suffix, patch={layer: {k + 1: state}}, candidates=candidates)


def _site(res, k, layer):
    return res["latents"][k] if layer is None else res["block_latent_outputs"][layer][k]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [None, 1])
def test_transplant_matches_the_reference(tiny_models, references, family, layer):
    model, ref = tiny_models[family], references[family]
    pairs = pairs3()
    ds = transplant(model, pairs, layers=None if layer is None else [layer], donors=("twin", "next"))
    if layer is not None:
        ds = ds.sel(layer=layer)
    for i, pair in enumerate(pairs):
        a = pair.clean
        for donor in ("twin", "next"):
            b = donor_question(pairs, i, donor)
            toks = answer_tokens(model, a.answer, b.answer)
            base = ref.run(a.question, suffix=toks.suffix)
            donor_run = ref.run(b.question, suffix=toks.suffix)
            for k in range(model.num_latent):
                got = _run(
                    ref, a.question, toks.suffix, k, layer, _site(donor_run, k, layer), [toks.clean, toks.corrupted]
                )
                cell = ds.sel(pair=pair.pair_id, donor=donor, thought=k)
                lp, lb = torch.log_softmax(got["logits"], -1), torch.log_softmax(base["logits"], -1)
                assert abs(float(cell["kl"]) - _kl(lp, lb)) < TOL
                assert abs(float(cell["logp_recipient_answer"]) - float(got["candidate_logprobs"][0])) < TOL
                assert abs(float(cell["logp_donor_answer"]) - float(got["candidate_logprobs"][1])) < TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer,project", [(None, False), (2, False), (None, True)])
def test_steer_matches_the_reference(tiny_models, references, family, layer, project):
    model, ref = tiny_models[family], references[family]
    if layer is not None and layer >= model.n_layers:
        layer = model.n_layers - 1
    pairs = pairs3()
    d = model.codi.lm.config.hidden_size
    v = torch.as_tensor(np.random.default_rng(7).standard_normal(d))
    scales = [0.0, 0.5, -1.0] if not project else [1.0, 0.5]
    k = 1
    ds = steer(
        model,
        pairs,
        intermediate=0,
        thought=k,
        layer=layer,
        directions={"v": v.numpy()},
        scales=scales,
        project=project,
    )
    u = v / v.norm()
    for pair in pairs:
        a = pair.clean
        base = ref.run(a.question, suffix=answer_tokens(model, a.answer, a.answer).suffix)
        h = _site(base, k, layer)
        for s in scales:
            cell = ds.sel(pair=pair.pair_id, direction="v", scale=s)
            new = h - s * (h @ u) * u if project else h + s * h.norm() * u
            pred = float(cell["predicted_answer"])
            toks = answer_tokens(model, a.answer, pred if np.isfinite(pred) else a.answer)
            got = _run(ref, a.question, toks.suffix, k, layer, new, [toks.clean, toks.corrupted])
            b = ref.run(a.question, suffix=toks.suffix)
            lp, lb = torch.log_softmax(got["logits"], -1), torch.log_softmax(b["logits"], -1)
            assert abs(float(cell["kl"]) - _kl(lp, lb)) < TOL
            assert abs(float(cell["logp_answer"]) - float(got["candidate_logprobs"][0])) < TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [None, 0])
def test_thought_graph_matches_the_reference(tiny_models, references, family, layer):
    model, ref = tiny_models[family], references[family]
    lens = ReadoutReference(ref)
    pairs = pairs3()
    K = model.num_latent
    ds = thought_graph(model, pairs, interventions=("zero", "mean", "resample", "noise"), layer=layer, noise_scale=0.5)
    bases = [
        ref.run(p.clean.question, suffix=answer_tokens(model, p.clean.answer, p.clean.answer).suffix) for p in pairs
    ]
    states = torch.stack([torch.stack([_site(b, k, layer) for k in range(K)]) for b in bases])
    d = states.shape[-1]
    for i, pair in enumerate(pairs):
        toks = answer_tokens(model, pair.clean.answer, pair.clean.answer)
        base = bases[i]
        lb = torch.log_softmax(lens.lens(base["latents"]), -1)
        for kind in ("zero", "mean", "resample", "noise"):
            for k in range(K):
                if kind == "zero":
                    new = torch.zeros(d, dtype=torch.float64)
                elif kind == "mean":
                    new = states[:, k].mean(0)
                elif kind == "resample":
                    new = states[(i + 1) % len(pairs), k]
                else:
                    sigma = norm_scaled_sigma(float(states[:, k].norm(dim=-1).mean()), d, 0.5)
                    new = sigma * torch.as_tensor(seeded_normal(d, (0, int(pair.pair_id), k)))
                got = _run(ref, pair.clean.question, toks.suffix, k, layer, new)
                cell = ds.sel(pair=pair.pair_id, intervention=kind, source=k)
                lp = torch.log_softmax(lens.lens(got["latents"]), -1)
                for j in range(K):
                    if j <= k:
                        assert np.isnan(cell["state_l2"].sel(target=j))
                        continue
                    t, tb = got["latents"][j], base["latents"][j]
                    assert abs(float(cell["state_l2"].sel(target=j)) - float((t - tb).norm())) < TOL
                    cos = float(torch.nn.functional.cosine_similarity(t, tb, dim=0))
                    assert abs(float(cell["state_cos"].sel(target=j)) - cos) < TOL
                    assert abs(float(cell["lens_kl"].sel(target=j)) - _kl(lp[j], lb[j])) < TOL
                    top = float(lp[j].argmax() != lb[j].argmax())
                    assert float(cell["lens_top_changed"].sel(target=j)) == top
                la, lbase = torch.log_softmax(got["logits"], -1), torch.log_softmax(base["logits"], -1)
                assert abs(float(cell["kl"]) - _kl(la, lbase)) < TOL
