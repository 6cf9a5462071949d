"""Attribution patching: AtP is the derivative of the patch (checked on the independent reference), and
how well it ranks the exact sweep's sites on the toy model and a tiny random checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codi_nnsight.data.pairs import Pair, PairSet, Question
from codi_nnsight.patching import answer_tokens
from codi_nnsight.patching.attribution import (
    attribution_patching,
    attribution_sweeps,
    compare_with_exact,
    keeping_grad,
    verify_top,
)
from codi_nnsight.patching.sites import head_dim
from codi_nnsight.patching.sweep import patch_sweep

PAIR = Pair(
    0,
    Question("A bag has 12 nuts; 5 are eaten. How many remain?", 7, {}),
    Question("A bag has 12 nuts; 6 are eaten. How many remain?", 6, {}),
)
COMPONENTS = ("resid", "attn", "mlp", "latent", "head")


def reference_metric(ref, toks, question, component, layer, k, vector, head=None):
    """logprob_diff of the reference run of `question` with the site set to `vector` (batch 1, hooks)."""
    cands = [toks.clean, toks.corrupted]
    if component == "latent":
        run = ref.run(question, suffix=toks.suffix, candidates=cands, latent_override={k: vector})
    else:
        patch = {layer: {k + 1: vector}}
        run = ref.run(question, suffix=toks.suffix, candidates=cands, component=component, patch=patch, head=head)
    return float(run["candidate_logprobs"][0] - run["candidate_logprobs"][1])


# GPT-2 runs in float64 throughout: the central difference agrees to 1e-5. transformers' Llama
# RMSNorm computes in float32 whatever the dtype, so the metric is smooth only to ~1e-8 nats and a
# small-ε difference is noise (at ε = 1e-2 already ~2e-5): there the derivative is the ε → 0
# intercept of a fit D(ε) = D0 + c2·ε² + c4·ε⁴ to central differences at ε = 0.01 … 0.08.
@pytest.mark.parametrize("family,eps,rel", [("gpt2", 1e-4, 1e-5), ("llama", None, 1e-3)])
def test_atp_is_the_derivative_of_the_patch(tiny_models, references, family, eps, rel):
    # (metric(a + ε·Δ) − metric(a − ε·Δ)) / 2ε on the independent reference → AtP as ε → 0.
    model, ref = tiny_models[family], references[family]
    toks = answer_tokens(model, PAIR.clean.answer, PAIR.corrupted.answer)
    atp = attribution_sweeps(model, [PAIR], COMPONENTS, metrics=("logprob_diff",))
    hd = head_dim(model)
    cases = [("resid", 0, 0), ("resid", model.n_layers - 1, 1), ("attn", 1, 0), ("mlp", 0, 1), ("latent", 0, 2)]
    cases += [("head", 1, 1)]
    for component, layer, k in cases:
        src = ref.run(PAIR.clean.question, suffix=toks.suffix, component=component)
        base = ref.run(PAIR.corrupted.question, suffix=toks.suffix, component=component)
        key = "latents" if component == "latent" else "block_latent_outputs"
        a_src = src[key][k] if component == "latent" else src[key][layer][k]
        a_base = base[key][k] if component == "latent" else base[key][layer][k]
        delta = a_src - a_base
        head = None
        if component == "head":
            head = slice(hd, 2 * hd)
            mask = torch.zeros_like(delta)
            mask[head] = 1
            delta = delta * mask

        def central(e, a_base=a_base, delta=delta, component=component, layer=layer, k=k, head=head):
            q = PAIR.corrupted.question
            up = reference_metric(ref, toks, q, component, layer, k, a_base + e * delta, head)
            down = reference_metric(ref, toks, q, component, layer, k, a_base - e * delta, head)
            return (up - down) / (2 * e)

        if eps is not None:
            fd = central(eps)
        else:
            grid = np.array([0.01, 0.02, 0.03, 0.05, 0.08])
            fd = float(np.polyfit(grid**2, [central(e) for e in grid], 2)[-1])
        ds = atp[component]
        idx = {"pair": 0, "position": k} | ({"layer": layer} if component != "latent" else {"layer": 0})
        if component == "head":
            idx["head"] = 1
        got = float(ds["atp_logprob_diff"].isel(idx))
        assert abs(fd) > 1e-6, (component, layer, k)  # a site that matters, so the check means something
        assert got == pytest.approx(fd, rel=rel, abs=1e-9), (component, layer, k)


def test_zero_delta_gives_zero_and_the_switch_is_restored(tiny_models):
    model = tiny_models["qwen2"]
    q = PAIR.clean.question
    same = PairSet.from_pairs([Pair(0, Question(q, 7, {}), Question(q, 8, {}))])
    parts = attribution_sweeps(model, same, COMPONENTS)
    for c, ds in parts.items():
        for m in ("atp_logprob_diff", "atp_logit_diff"):
            assert np.array_equal(ds[m].values, np.zeros_like(ds[m].values)), (c, m)
    assert model.codi.keep_grad is False
    inputs = model.prepare([q], max_new_tokens=0)
    assert model.codi(**inputs)["logits"].is_inference()  # switch off: inference mode, as before
    with keeping_grad(model):
        # Autograd on (no inference tensors); the parameters are frozen, as NDIF's are, so the graph
        # only starts where attribution makes the activations require grad.
        assert not model.codi(**inputs)["logits"].is_inference()
    assert model.codi.keep_grad is False


@pytest.mark.parametrize("component,positions", [("resid", "each"), ("head", "each"), ("latent", "all")])
def test_layout_matches_the_exact_sweep(tiny_models, component, positions):
    model = tiny_models["llama"]
    pairs = PairSet.from_pairs([PAIR])
    atp = attribution_patching(model, pairs, component=component, positions=positions)
    exact = patch_sweep(model, pairs, component=component, positions=positions)
    assert atp["atp_logprob_diff"].dims == exact["kl"].dims
    for d in exact["kl"].dims:
        assert np.array_equal(atp[d].values, exact[d].values), d
    assert np.allclose(atp["baseline_logprob_diff"], exact["baseline_logprob_diff"], atol=1e-9)
    assert np.allclose(atp["source_logprob_diff"], exact["source_logprob_diff"], atol=1e-9)
    stacked = attribution_patching(model, pairs, component=["resid", "mlp"])
    assert stacked["atp_logprob_diff"].dims == ("pair", "layer", "position", "component")


def test_positions_all_is_the_sum_over_positions(tiny_models):
    model = tiny_models["gpt2"]
    each = attribution_patching(model, [PAIR], component="attn")
    total = attribution_patching(model, [PAIR], component="attn", positions="all")
    assert np.allclose(each["atp_logprob_diff"].sum("position"), total["atp_logprob_diff"], atol=1e-12)


def test_atp_ranks_the_exact_sweep_on_the_toy_model():
    # On the toy model AtP must rank the sites (Spearman over (pair, site) > 0.3) and find the exact
    # sweep's top site; the measured figures are in README.md.
    from codi_nnsight.cli import default_pairs
    from codi_nnsight.data.pairs import load_pairs
    from codi_nnsight.model import load_model

    model = load_model(dtype="float64", device="cpu")
    pairs = load_pairs(default_pairs())
    parts = attribution_sweeps(model, pairs, ("resid", "latent"), batch_size=24)
    for c in ("resid", "latent"):
        exact = patch_sweep(model, pairs, component=c, positions="each", batch_size=24)
        cmp = compare_with_exact(parts[c], exact)[c]
        assert all(np.isfinite(v) for v in cmp.values()), cmp
        assert cmp["spearman_pairs"] > 0.3, cmp
        a = np.abs(parts[c]["atp_logprob_diff"].mean("pair")).values
        e = np.abs((exact["logprob_diff"] - exact["baseline_logprob_diff"]).mean("pair")).values
        assert np.unravel_index(a.argmax(), a.shape) == np.unravel_index(e.argmax(), e.shape)


def test_compare_and_verify_top_on_a_tiny_random_checkpoint(tiny_models):
    model = tiny_models["llama"]
    pairs = PairSet.from_pairs(
        [PAIR, Pair(1, Question("What is 9 times 3?", 27, {}), Question("What is 9 times 4?", 36, {}))]
    )
    atp = attribution_patching(model, pairs, component="resid")
    checked = verify_top(model, pairs, atp, 2)
    assert len(checked.layers) == 2 and list(checked.exact["layer"].values) == checked.layers
    assert list(checked.atp["layer"].values) == checked.layers
    cmp = checked.comparison["resid"]
    assert np.isfinite(cmp["spearman"]) and np.isfinite(cmp["spearman_pairs"]) and np.isfinite(cmp["top_k_recall"])
    assert cmp["n_sites"] == 2 * model.num_latent


def test_remote_local_simulation_equals_local(tiny_models):
    # The request asks for autograd itself (keep_grad=True), so the same code runs on a server.
    from codi_nnsight.patching.attribution import attribution_patching

    model = tiny_models["llama"]
    pairs = PairSet.from_pairs([PAIR])
    local = attribution_patching(model, pairs, component="resid")
    simulated = attribution_patching(model, pairs, component="resid", remote="local")
    for name in ("atp_logprob_diff", "atp_logit_diff"):
        assert np.allclose(local[name].values, simulated[name].values, atol=1e-12, rtol=0, equal_nan=True)
    assert not model.codi.keep_grad  # nothing left switched on in this process


def _hooked_atp(model, toks, drop=None):
    """Plain-torch AtP of every `resid` site, block `drop` cut from the backward by a forward hook.

    Independent of nnsight: forward hooks on the decoder blocks record their outputs at the latent
    calls (block `drop` first returns y.detach() + (x − x.detach()), x its input: the same numbers,
    no gradient through its attention and MLP), and `torch.autograd.grad` differentiates
    logprob_diff. Returns (n_layers, K) float64.
    """
    extra = {"suffix_ids": torch.tensor(toks.suffix), "max_new_tokens": 0}
    n = max(len(toks.clean), len(toks.corrupted))
    cands = torch.full((1, 2, n), -1, dtype=torch.long)
    cands[0, 0, : len(toks.clean)] = torch.tensor(toks.clean)
    cands[0, 1, : len(toks.corrupted)] = torch.tensor(toks.corrupted)
    extra["candidates"] = cands
    K = model.num_latent

    def run(question, cut):
        seen, calls, handles = {}, {}, []
        for L, block in enumerate(model.codi.layers):
            if L == cut:

                def drop_hook(mod, args, out):
                    x = args[0]
                    y = out[0] if isinstance(out, tuple) else out
                    new = y.detach() + (x - x.detach())
                    return (new, *out[1:]) if isinstance(out, tuple) else new

                handles.append(block.register_forward_hook(drop_hook))

            def record(mod, args, out, L=L):
                i = calls[L] = calls.get(L, -1) + 1
                if 1 <= i <= K:
                    seen[(L, i - 1)] = out[0] if isinstance(out, tuple) else out

            handles.append(block.register_forward_hook(record))
        try:
            out = model.codi(**model.prepare([question], **extra))
        finally:
            for h in handles:
                h.remove()
        return seen, out["candidate_logprobs"][0, 0] - out["candidate_logprobs"][0, 1]

    src, _ = run(PAIR.clean.question, None)
    # The plain reference takes the graph the textbook way, from parameters that require grad; the
    # package's models load frozen (as NDIF's do), so they are unfrozen for this run only.
    model.codi.requires_grad_(True)
    try:
        with keeping_grad(model):
            tgt, metric = run(PAIR.corrupted.question, drop)
            keys = list(tgt)
            grads = torch.autograd.grad(metric, [tgt[k] for k in keys], allow_unused=True)
    finally:
        model.codi.requires_grad_(False)
    res = np.zeros((model.n_layers, K))
    for key, g in zip(keys, grads):
        if g is not None:
            res[key] = float(((src[key][:, -1] - tgt[key][:, -1].detach()) * g[:, -1]).sum())
    return res


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_graddrop_equals_plain_torch_hooks(tiny_models, family):
    # atpstar = sign(AtP) · Σ_l |AtP with block l cut| / (L − 1), each term from plain torch hooks.
    model = tiny_models[family]
    toks = answer_tokens(model, PAIR.clean.answer, PAIR.corrupted.answer)
    parts = attribution_sweeps(model, [PAIR], ("resid", "attn", "latent"), metrics=("logprob_diff",), method="atp*")
    plain = _hooked_atp(model, toks)
    dropped = [_hooked_atp(model, toks, drop=L) for L in range(model.n_layers)]
    assert np.abs(plain - dropped[0]).max() > 1e-6  # the cut changes the gradient: the check means something
    expected = np.sign(plain) * np.sum(np.abs(dropped), axis=0) / (model.n_layers - 1)
    ds = parts["resid"]
    assert np.allclose(ds["atp_logprob_diff"].values[0], plain, rtol=1e-9, atol=1e-13)
    assert np.allclose(ds["atpstar_logprob_diff"].values[0], expected, rtol=1e-9, atol=1e-13)
    assert ds["atpstar_logprob_diff"].dims == ds["atp_logprob_diff"].dims
    assert ds.attrs["atp_method"] == "atp*"
    # Cutting block l leaves the attention output of block l no path to the metric: its term is 0,
    # so for the last block's attention the score is |AtP with every earlier block cut| / (L − 1).
    attn = parts["attn"]
    assert np.all(np.isfinite(attn["atpstar_logprob_diff"].values))
    plain_only = attribution_sweeps(model, [PAIR], ("resid",), metrics=("logprob_diff",))["resid"]
    assert np.array_equal(plain_only["atp_logprob_diff"].values, ds["atp_logprob_diff"].values)
    assert "atpstar_logprob_diff" not in plain_only


def test_graddrop_remote_local_equals_local(tiny_models):
    model = tiny_models["qwen2"]
    pairs = PairSet.from_pairs([PAIR])
    comps = ["resid", "mlp", "latent"]
    local = attribution_patching(model, pairs, component=comps, method="atp*")
    simulated = attribution_patching(model, pairs, component=comps, method="atp*", remote="local")
    assert local["atpstar_logit_diff"].dims == ("pair", "layer", "position", "component")
    for name in ("atp_logprob_diff", "atpstar_logprob_diff", "atpstar_logit_diff"):
        assert np.allclose(local[name].values, simulated[name].values, atol=1e-12, rtol=0, equal_nan=True)
    assert not model.codi.keep_grad
