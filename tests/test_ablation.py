"""Ablations and early exit: against an independent batch-1 reference, and their defining invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_patching import make_pairs

from codi_nnsight.errors import UserError
from codi_nnsight.patching import answer_tokens, patch_sweep
from codi_nnsight.patching.ablation import early_exit

TOL = 1e-9


def _kl(patched, base):
    lp, lb = torch.log_softmax(patched["logits"], -1), torch.log_softmax(base["logits"], -1)
    return float((lp.exp() * (lp - lb)).sum())


@pytest.mark.parametrize("family,component", [("gpt2", "resid"), ("llama", "latent"), ("qwen2", "mlp")])
def test_zero_and_resample_ablations_match_the_reference(tiny_models, references, family, component):
    model, ref = tiny_models[family], references[family]
    pairs = make_pairs()
    K = model.num_latent
    layer = 0 if component == "latent" else model.n_layers - 1
    zero = patch_sweep(model, pairs, component=component, layers=[layer], positions="each", ablation="zero")
    resample = patch_sweep(model, pairs, component=component, layers=[layer], positions="each", ablation="resample")
    assert zero.attrs["direction"] == resample.attrs["direction"] == "noise"  # the clean run is ablated
    for i, pair in enumerate(pairs):
        toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
        comp = "resid" if component == "latent" else component
        base = ref.run(pair.clean.question, suffix=toks.suffix, component=comp)
        donor = ref.run(pairs[(i + 1) % len(pairs)].clean.question, suffix=toks.suffix, component=comp)
        d = base["logits"].new_zeros(base["latents"].shape[-1])
        for k in range(K):
            if component == "latent":
                z = ref.run(pair.clean.question, suffix=toks.suffix, latent_override={k: d})
                r = ref.run(pair.clean.question, suffix=toks.suffix, latent_override={k: donor["latents"][k]})
            else:
                z = ref.run(pair.clean.question, suffix=toks.suffix, component=comp, patch={layer: {k + 1: d}})
                r = ref.run(
                    pair.clean.question,
                    suffix=toks.suffix,
                    component=comp,
                    patch={layer: {k + 1: donor["block_latent_outputs"][layer][k]}},
                )
            assert abs(float(zero["kl"][i, 0, k]) - _kl(z, base)) < TOL
            assert abs(float(resample["kl"][i, 0, k]) - _kl(r, base)) < TOL


def test_mean_ablation_over_the_question_itself_is_a_no_op(tiny_models):
    model = tiny_models["llama"]
    for pair in make_pairs():
        for component in ("resid", "latent", "head"):
            ds = patch_sweep(
                model, [pair], component=component, positions="each", ablation="mean", reference=[pair.clean.question]
            )
            assert np.abs(ds["kl"].values).max() < 1e-10, component
            assert (ds["kept"].values == ds["kept"].values.flat[0]).all()


def test_noise_ablation_keeps_the_norm_and_is_seeded(tiny_models):
    from codi_nnsight.patching import plan_batch
    from codi_nnsight.patching.ablation import ablation_values
    from codi_nnsight.patching.config import SweepConfig

    model = tiny_models["gpt2"]
    pairs = make_pairs()
    cfg = SweepConfig(layers=[0], component="latent", positions="each", ablation="noise")
    cfg.validate(model)
    values = ablation_values(model, cfg, pairs, seed=0)
    values.pair_seeds = [int(p.pair_id) for p in pairs]
    plan = plan_batch(model, pairs, cfg, ablation_values=values)
    norms = [x.norm(dim=-1) for patches in plan.extra_plan.values() for kind, _, _, x in patches if kind == "norm"]
    assert norms and all(torch.allclose(n, torch.ones_like(n)) for n in norms)  # unit directions, scaled in-trace
    a = patch_sweep(model, pairs, component="latent", positions="each", ablation="noise", batch_size=1)
    b = patch_sweep(model, pairs, component="latent", positions="each", ablation="noise", batch_size=3)
    c = patch_sweep(model, pairs, component="latent", positions="each", ablation="noise", seed=1)
    assert np.allclose(a["kl"].values, b["kl"].values, atol=1e-12, rtol=0)  # batch size does not matter
    assert not np.allclose(a["kl"].values, c["kl"].values)  # the seed does
    zero = patch_sweep(model, pairs, component="latent", positions="each", ablation="zero")
    assert not np.allclose(a["kl"].values, zero["kl"].values)


def test_ablation_errors(tiny_models):
    model = tiny_models["gpt2"]
    with pytest.raises(UserError, match="--ablation 'drop': expected one of zero, mean, resample, noise"):
        patch_sweep(model, make_pairs(), ablation="drop")
    with pytest.raises(UserError, match="the resample ablation needs at least 2 pairs"):
        patch_sweep(model, make_pairs()[:1], ablation="resample")


def test_early_exit_at_k_equals_the_full_run_and_counts_down(tiny_models):
    model = tiny_models["llama"]
    pairs = make_pairs()
    K = model.num_latent
    ds = early_exit(model, pairs)
    assert ds["answer"].dims == ("pair", "variant", "n_latent") and list(ds["n_latent"].values) == list(range(K + 1))
    full = patch_sweep(model, pairs, layers=[0])
    # Decoded answers of two sweeps: argmax top-2 gaps are >= 6e-5 here (measured), the logits agree to TOL.
    assert np.array_equal(
        ds["answer"].sel(variant="clean", n_latent=K).values, full["clean_prompted_answer"].values, equal_nan=True
    )
    assert np.allclose(
        ds["logp_answer"].sel(variant="clean", n_latent=K).values,
        full["source_logp_clean_answer"].values,
        atol=TOL,
        rtol=0,
    )
    # Fewer thoughts change what the model predicts.
    assert not np.allclose(ds["logp_answer"].sel(n_latent=0).values, ds["logp_answer"].sel(n_latent=K).values)
    with pytest.raises(UserError, match=f"--steps: {K + 1} out of range 0..{K}"):
        early_exit(model, pairs, steps=[K + 1])
