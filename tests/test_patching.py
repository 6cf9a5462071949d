"""Patching sweeps against an independent batch-1 reference built from plain PyTorch hooks."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import FAMILIES

from codi_nnsight.data.pairs import Pair, PairSet, Question
from codi_nnsight.errors import UserError
from codi_nnsight.patching import answer_tokens, parse_layers
from codi_nnsight.patching import plan as plan_mod
from codi_nnsight.patching.metrics import RECOVERY_MIN_DENOMINATOR
from codi_nnsight.patching.sweep import patch_sweep
from codi_nnsight.patching.trace import run_batch

TOL = 1e-9


def make_pairs() -> PairSet:
    qs = [
        ("Sam has 4 cats and 3 dogs. How many pets?", 7, "Sam has 5 cats and 3 dogs. How many pets?", 8),
        ("A bag has 12 nuts; 5 are eaten. How many remain?", 7, "A bag has 12 nuts; 6 are eaten. How many remain?", 6),
        ("What is 9 times 3?", 27, "What is 9 times 4 plus 10?", 46),
    ]
    return PairSet.from_pairs(
        [Pair(i, Question(c, a, {"reasoning_steps": i + 1}), Question(x, b, {})) for i, (c, a, x, b) in enumerate(qs)]
    )


def reference_runs(ref, model, pair, component, layer, position, mode, direction, candidates=False):
    """Source, baseline and patched runs of one variant, the slow, obvious way (batch 1, hooks)."""
    src, tgt = (pair.clean, pair.corrupted) if direction == "denoise" else (pair.corrupted, pair.clean)
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    cands = [toks.clean, toks.corrupted] if candidates else None
    K = ref.num_latent
    source = ref.run(src.question, suffix=toks.suffix, component=component, candidates=cands)
    base = ref.run(tgt.question, suffix=toks.suffix, component=component, candidates=cands)
    steps = [k for k in range(K) if position in (-1, k)]
    if component == "latent":
        override = {k: source["latents"][k] for k in steps}
        if mode != "recurrent":
            override.update({k: base["latents"][k] for k in range(K) if k not in steps})
        patched = ref.run(tgt.question, suffix=toks.suffix, latent_override=override, candidates=cands)
    else:
        patch = {layer: {k + 1: source["block_latent_outputs"][layer][k] for k in steps}}
        override = {k: base["latents"][k] for k in range(K)} if mode != "recurrent" else None
        patched = ref.run(
            tgt.question,
            suffix=toks.suffix,
            patch=patch,
            component=component,
            latent_override=override,
            candidates=cands,
        )
    return source, base, patched, toks


def reference_metrics(ref, model, pair, component, layer, position, mode, direction):
    """kl, l2, top1_changed for one variant, computed from the reference runs."""
    _, base, patched, _ = reference_runs(ref, model, pair, component, layer, position, mode, direction)
    lp, lb = torch.log_softmax(patched["logits"], -1), torch.log_softmax(base["logits"], -1)
    kl = float((lp.exp() * (lp - lb)).sum())
    l2 = float((patched["logits"] - base["logits"]).pow(2).mean().sqrt())
    eot = model.codi.eot_id  # top-1 over the ids greedy decoding can emit
    top1 = float(patched["logits"][:eot].argmax() != base["logits"][:eot].argmax())
    return kl, l2, top1


CASES = list(
    itertools.product(
        ["resid", "attn", "mlp", "latent"], ["all", "each"], ["recurrent", "no-feedback"], ["denoise", "noise"]
    )
)


@pytest.mark.parametrize("component,positions,mode,direction", CASES)
def test_sweep_matches_reference(tiny_models, references, component, positions, mode, direction):
    # index % 3 against the direction's index % 2: every family meets both directions.
    family = FAMILIES[CASES.index((component, positions, mode, direction)) % 3]
    model, ref = tiny_models[family], references[family]
    pairs = make_pairs()[:1] if positions == "each" else make_pairs()[:2]
    ds = patch_sweep(
        model, pairs, component=component, positions=positions, mode=mode, direction=direction, batch_size=2
    )
    layers = [0] if component == "latent" else list(range(model.n_layers))
    assert list(ds["layer"].values) == layers
    for i, pair in enumerate(pairs):
        for li, L in enumerate(layers):
            for p in range(model.num_latent) if positions == "each" else [-1]:
                idx = dict(pair=i, layer=li) | ({"position": p} if positions == "each" else {})
                kl, l2, top1 = reference_metrics(ref, model, pair, component, L, p, mode, direction)
                assert abs(float(ds["kl"].isel(idx)) - kl) < TOL
                assert abs(float(ds["l2"].isel(idx)) - l2) < TOL
                assert float(ds["top1_changed"].isel(idx)) == top1  # argmax top-2 gaps >= 1.9e-4 here, logits TOL
    assert ds.attrs["sanity_passed"] == 1


def answer_metrics(run, toks):
    """Every answer metric of one reference run, computed independently of the package."""
    logits, logp = run["logits"], torch.log_softmax(run["logits"], -1)
    c, x = toks.clean[0], toks.corrupted[0]
    return {
        "logit_diff": float("nan") if c == x else float(logits[c] - logits[x]),
        "p_clean": float(logp[c].exp()),
        "p_corrupted": float(logp[x].exp()),
        "logp_clean_answer": float(run["candidate_logprobs"][0]),
        "logp_corrupted_answer": float(run["candidate_logprobs"][1]),
        "logprob_diff": float(run["candidate_logprobs"][0] - run["candidate_logprobs"][1]),
    }


@pytest.mark.parametrize("family,direction", list(itertools.product(FAMILIES, ["denoise", "noise"])))
def test_every_metric_matches_an_independent_computation(tiny_models, references, family, direction):
    # A mutation guard: swapping two metric columns, or computing one from the wrong row, fails here.
    model, ref = tiny_models[family], references[family]
    pair, layer = make_pairs()[0], model.n_layers - 2
    ds = patch_sweep(model, [pair], layers=[layer], direction=direction)
    source, base, patched, toks = reference_runs(
        ref, model, pair, "resid", layer, -1, "recurrent", direction, candidates=True
    )
    want_p, want_b, want_s = (answer_metrics(r, toks) for r in (patched, base, source))
    for name, value in want_p.items():
        assert float(ds[name][0, 0]) == pytest.approx(value, abs=TOL, nan_ok=True), name
        assert float(ds[f"baseline_{name}"][0]) == pytest.approx(want_b[name], abs=TOL, nan_ok=True), name
        assert float(ds[f"source_{name}"][0]) == pytest.approx(want_s[name], abs=TOL, nan_ok=True), name
    for name, key in (("recovery", "logit_diff"), ("logprob_recovery", "logprob_diff")):
        denom = want_s[key] - want_b[key]
        expected = (want_p[key] - want_b[key]) / denom if abs(denom) >= RECOVERY_MIN_DENOMINATOR else float("nan")
        assert float(ds[name][0, 0]) == pytest.approx(expected, abs=1e-7, nan_ok=True), name
    assert np.isfinite(ds["logprob_diff"].values).all()  # the pair's answers differ: always defined


def odd_pairs() -> PairSet:
    """Pairs at the edges: equal answers, identical questions, negative answers, a long answer."""
    qs = [
        ("What is 9 times 3?", 27, "What is 9 times 4 plus 10?", 46),
        ("Ann has 6 pens and gives 6 away. How many now?", 0, "Ann has 7 pens and gives 7 away. How many now?", 0),
        ("What is 3 - 8?", -5, "What is 3 - 10?", -7),
        ("What is 2+2?", 4, "What is 2+2?", 4),
        ("What is 1000 times 1000?", 1000000, "What is 1000 times 999?", 999000),
    ]
    return PairSet.from_pairs([Pair(i, Question(c, a, {}), Question(x, b, {})) for i, (c, a, x, b) in enumerate(qs)])


@pytest.mark.parametrize(
    "family,direction", [("gpt2", "denoise"), ("llama", "noise"), ("qwen2", "denoise"), ("gpt2", "noise")]
)
def test_every_variable_is_independent_of_batch_size(tiny_models, family, direction):
    model = tiny_models[family]
    pairs = list(make_pairs()) + list(odd_pairs())
    pairs = PairSet.from_pairs([Pair(i, p.clean, p.corrupted) for i, p in enumerate(pairs)])
    runs = [patch_sweep(model, pairs, direction=direction, batch_size=n) for n in (1, 3, len(pairs))]
    for other in runs[1:]:
        assert set(other.data_vars) == set(runs[0].data_vars)
        for name in runs[0].data_vars:
            a, b = runs[0][name].values, other[name].values
            if name in ("answer", "flipped") or "prompted" in name or name == "comparable":
                # Decoded from greedy argmaxes whose top-2 gaps are >= 4e-4 here (measured), far above
                # the 1e-12 that batch shapes move the logits: equal across batch sizes.
                assert np.array_equal(a, b, equal_nan=True), name
            else:
                assert np.allclose(a, b, atol=1e-12, rtol=0, equal_nan=True), name


def test_pairs_with_equal_answers_have_no_flip_or_recovery(tiny_models):
    ds = patch_sweep(tiny_models["llama"], odd_pairs(), batch_size=5)
    equal = ds["answer_clean"].values == ds["answer_corrupted"].values
    assert list(equal) == [False, True, False, True, False]
    assert list(ds["comparable"].values) == [1.0, 0.0, 1.0, 0.0, 1.0]
    for name in ("flipped", "recovery", "logprob_recovery", "logprob_diff", "logit_diff"):
        assert np.isnan(ds[name].values[equal]).all(), name
    assert np.isfinite(ds["flipped"].values[~equal]).all()
    # Identical questions: patching changes nothing at all.
    assert np.abs(ds["kl"].sel(pair=3).values).max() < TOL


def test_negative_answers_keep_a_defined_logprob_diff(tiny_models):
    ds = patch_sweep(tiny_models["gpt2"], odd_pairs(), batch_size=5)
    neg = ds.sel(pair=2)  # -5 vs -7: both answers start with "-"
    assert np.isnan(neg["logit_diff"].values).all()
    assert np.isfinite(neg["logprob_diff"].values).all()
    assert np.isfinite(neg["baseline_logprob_diff"].values) and np.isfinite(neg["source_logprob_diff"].values)


def test_recovery_is_nan_on_tiny_denominators(tiny_models, monkeypatch):
    from codi_nnsight.patching import metrics

    ds = patch_sweep(tiny_models["gpt2"], make_pairs(), batch_size=3)
    denom = np.abs(ds["source_logprob_diff"] - ds["baseline_logprob_diff"]).values
    small = denom < RECOVERY_MIN_DENOMINATOR
    assert np.isnan(ds["logprob_recovery"].values[small]).all()
    assert np.isfinite(ds["logprob_recovery"].values[~small]).all()
    assert ds.attrs["recovery_min_denominator"] == RECOVERY_MIN_DENOMINATOR
    monkeypatch.setattr(metrics, "RECOVERY_MIN_DENOMINATOR", float(denom.max()) + 1)
    assert np.isnan(patch_sweep(tiny_models["gpt2"], make_pairs(), batch_size=3)["logprob_recovery"]).all()


def test_question_normalization_is_official_by_default(tiny_dirs):
    from codi_nnsight.model import load_model

    q = "  Sam has 4  cats and 3 dogs. How many pets? "
    official = load_model(tiny_dirs["gpt2"], dtype="float64")
    raw = load_model(tiny_dirs["gpt2"], dtype="float64", question_normalization="none")
    assert official.encode_question(q) == official.encode_question("Sam has 4 cats and 3 dogs. How many pets?")
    assert raw.encode_question(q) != official.encode_question(q)
    pairs = PairSet.from_pairs([Pair(0, Question(q, 7, {}), Question(q.replace("4", "5"), 8, {}))])
    assert patch_sweep(official, pairs, layers=[0]).attrs["question_normalization"] == "official"
    assert patch_sweep(raw, pairs, layers=[0]).attrs["question_normalization"] == "none"
    with pytest.raises(UserError, match="question normalization 'nfc': expected one of official, none"):
        load_model(tiny_dirs["gpt2"], question_normalization="nfc")


def test_frozen_is_the_old_name_of_no_feedback(tiny_models):
    model = tiny_models["llama"]
    with pytest.warns(FutureWarning, match="now called 'block-all-feedback'"):
        old = patch_sweep(model, make_pairs()[:1], mode="frozen")
    new = patch_sweep(model, make_pairs()[:1], mode="block-all-feedback")
    assert old.attrs["mode"] == "block-all-feedback"
    assert np.array_equal(old["kl"].values, new["kl"].values)  # one mode, same data: the same kernels run


def test_no_feedback_is_not_a_direct_effect(tiny_models):
    # The patched activation still reaches the answer through attention: resid at layer 0 moves it.
    model = tiny_models["llama"]
    ds = patch_sweep(model, make_pairs(), mode="no-feedback", positions="each")
    assert float(ds["kl"].sel(layer=0).max()) > 1e-6
    # resid at the last layer has no route onwards but the (held) feedback: exactly no effect.
    last = ds["kl"].sel(layer=model.n_layers - 1).values
    assert np.abs(last).max() < TOL


def test_resid_at_last_layer_equals_latent_at_the_next_position(tiny_models):
    model = tiny_models["gpt2"]
    pairs = make_pairs()[:2]
    resid = patch_sweep(model, pairs, layers=[model.n_layers - 1], positions="each")
    latent = patch_sweep(model, pairs, component="latent", positions="each")
    K = model.num_latent
    a = resid["kl"].isel(layer=0, position=slice(0, K - 1)).values
    b = latent["kl"].isel(layer=0, position=slice(1, K)).values
    assert np.allclose(a, b, atol=TOL, rtol=0)
    assert np.abs(resid["kl"].isel(layer=0, position=K - 1).values).max() < TOL


@pytest.mark.parametrize(
    "family,positions,direction", [("gpt2", "all", "denoise"), ("llama", "each", "noise"), ("qwen2", "all", "noise")]
)
def test_head_patching_matches_reference(tiny_models, references, family, positions, direction):
    from codi_nnsight.patching.sites import head_dim, n_heads

    model, ref = tiny_models[family], references[family]
    pair = make_pairs()[0]
    ds = patch_sweep(model, [pair], component="head", positions=positions, direction=direction)
    H, hd, K = n_heads(model), head_dim(model), model.num_latent
    assert ds["kl"].dims == ("pair", "layer", "head") + (("position",) if positions == "each" else ())
    assert list(ds["head"].values) == list(range(H))
    src, tgt = (pair.clean, pair.corrupted) if direction == "denoise" else (pair.corrupted, pair.clean)
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    source = ref.run(src.question, suffix=toks.suffix, component="head")
    base = ref.run(tgt.question, suffix=toks.suffix, component="head")
    lb = torch.log_softmax(base["logits"], -1)
    for L in range(model.n_layers):
        for h in range(H):
            for p in range(K) if positions == "each" else [-1]:
                steps = [k for k in range(K) if p in (-1, k)]
                patch = {L: {k + 1: source["block_latent_outputs"][L][k] for k in steps}}
                out = ref.run(
                    tgt.question, suffix=toks.suffix, component="head", patch=patch, head=slice(h * hd, (h + 1) * hd)
                )
                lp = torch.log_softmax(out["logits"], -1)
                idx = dict(layer=L, head=h) | ({"position": p} if positions == "each" else {})
                assert abs(float(ds["kl"].isel(pair=0, **idx)) - float((lp.exp() * (lp - lb)).sum())) < TOL


def test_all_heads_together_equal_the_attention_output(tiny_models):
    # Patching every head's slice of the output projection's input is patching the attention output.
    from codi_nnsight.patching.config import SweepConfig

    model = tiny_models["llama"]
    pairs = make_pairs()[:2]
    attn = patch_sweep(model, pairs, component="attn")
    cfg = SweepConfig(layers=list(range(model.n_layers)), component="head")
    cfg.validate(model)
    plan = plan_mod.plan_batch(model, pairs, cfg)
    # Merge the per-head patches of each variant row into one patch of every head.
    for key, patches in plan.extra_plan.items():
        dst, src = plan.layer_plan.get(key, (torch.tensor([], dtype=torch.long),) * 2)
        rows = {(int(d), int(s_)) for kind, _, ds_, ss in patches for d, s_ in zip(ds_, ss) if kind == "copy"}
        plan.layer_plan[key] = (
            torch.cat([dst, torch.tensor([d for d, _ in sorted(rows)])]),
            torch.cat([src, torch.tensor([s_ for _, s_ in sorted(rows)])]),
        )
    plan.extra_plan = {}
    columns = run_batch(model, plan, cfg).columns
    kl = columns[:, 0]
    for i in range(len(pairs)):
        rows = plan.variant_rows[i]
        # every head variant row of layer L now carries all heads: each equals the attn patch of layer L
        for (L, _, _), row in zip(plan.variants, rows):
            assert abs(kl[row] - float(attn["kl"].isel(pair=i).sel(layer=L))) < TOL


def test_metric_table_and_schema_doc_agree():
    from pathlib import Path

    from codi_nnsight.patching.dataset import per_pair_names
    from codi_nnsight.patching.metrics import METRICS

    doc = (Path(__file__).parent.parent / "docs" / "results-schema.md").read_text().split("## Schema 1")[0]
    first_cells = re.findall(r"^\| ([^|]*`[^|]*) \|", doc, flags=re.M)
    named = {n for cell in first_cells for n in re.findall(r"`([a-z_0-9]+)`", cell)}
    assert {m.name for m in METRICS} <= named
    assert set(per_pair_names()) <= named
    undocumented = named - {m.name for m in METRICS} - set(per_pair_names())
    # dims, and the coordinates of a `--positions sequence` axis (tests/test_sequence_positions.py)
    coords = {"pair", "layer", "head", "position", "component", "position_kind", "token", "changed", "patched"}
    assert undocumented <= coords, undocumented


def test_sanity_check_with_nan_fails_and_stacked_files_agree_with_themselves(tiny_models):
    from codi_nnsight.patching.sanity import merge_sanity, sanity_attrs

    ok = sanity_attrs(
        {"self_patch": 0.0, "kl_nonnegative": 0.0, "full_patch": 0.0, "full_patch_pair_id": 1}, torch.float64
    )
    nan = sanity_attrs(
        {"self_patch": float("nan"), "kl_nonnegative": 0.0, "full_patch": 0.0, "full_patch_pair_id": 1}, torch.float64
    )
    assert ok["sanity_passed"] == 1 and nan["sanity_passed"] == 0
    skipped = sanity_attrs(
        {"self_patch": 0.0, "kl_nonnegative": 0.0, "full_patch": float("nan"), "full_patch_pair_id": None},
        torch.float64,
    )
    assert skipped["sanity_passed"] == 1 and "skipped" in json.loads(skipped["sanity_details"])["full_patch"]
    merged = merge_sanity([ok, nan], torch.float64)
    assert merged["sanity_passed"] == 0 and np.isnan(merged["sanity_self_patch_max_kl"])
    ds = patch_sweep(tiny_models["gpt2"], make_pairs()[:2], component=["resid", "latent"])
    details = json.loads(ds.attrs["sanity_details"])
    assert details["kl_nonnegative"]["value"] == ds.attrs["sanity_min_kl"] == float(ds["kl"].min())
    assert ds["answer"].dims == ds["kl"].dims == ("pair", "layer", "component")


@pytest.mark.parametrize("text,expected", [("0-2,4", [0, 1, 2, 4]), ("3", [3]), (None, [0, 1, 2, 3, 4])])
def test_parse_layers(text, expected):
    assert parse_layers(text, 5) == expected


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layers": [5]}, "--layers: layer 5 out of range (model has 2 layers, 0-1)"),
        ({"layers": []}, "--layers: empty layer list"),
        ({"component": "heads"}, "--component 'heads': expected one of resid, attn, mlp, latent, head"),
        ({"component": ["resid", "head"]}, "--component head adds a head dimension: sweep it on its own"),
        (
            {"mode": "frozn"},
            "--mode 'frozn': expected one of recurrent, block-all-feedback, block-thought-feedback, "
            "block-thought-attention",
        ),
    ],
)
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


@pytest.mark.parametrize(
    "family,kwargs",
    [("llama", {}), ("gpt2", {"direction": "noise", "component": "mlp"}), ("qwen2", {"ablation": "zero"})],
)
def test_batch_carries_the_full_patch_check(tiny_models, monkeypatch, family, kwargs):
    # The default configurations run the check inside the batch holding its pair: no second trace,
    # the same pair as the separate check, an exact patch, and the other rows unchanged.
    from codi_nnsight.patching import sweep as sweep_mod
    from codi_nnsight.patching import trace as patching
    from codi_nnsight.patching.config import SweepConfig

    model, pairs = tiny_models[family], make_pairs()
    separate = patching.full_patch_check(model, pairs)
    monkeypatch.setattr(sweep_mod, "full_patch_check", lambda *a, **k: pytest.fail("separate check trace"))
    by_batch = {bs: patch_sweep(model, pairs, batch_size=bs, **kwargs) for bs in (1, 3)}
    for ds in by_batch.values():
        assert json.loads(ds.attrs["sanity_details"])["full_patch"]["pair_id"] == separate["pair_id"] == 0
        assert ds.attrs["sanity_full_patch_max_abs"] < TOL
    xr.testing.assert_allclose(by_batch[1].drop_attrs(), by_batch[3].drop_attrs(), rtol=1e-9, atol=1e-12)
    # Row by row, a batch that carries the check computes what one without it does.
    patching_kwargs = {k: v for k, v in kwargs.items() if k != "ablation"}  # (ablations need reference values)
    cfg = SweepConfig(layers=list(range(model.n_layers)), **patching_kwargs)
    cfg.validate(model)
    plain = plan_mod.plan_batch(model, pairs, cfg)
    carried = plan_mod.plan_batch(model, pairs, cfg, full_patch=0)
    a, b = run_batch(model, plain, cfg), run_batch(model, carried, cfg)
    n = len(plain.row_pair)
    assert a.full_patch_max_abs is None and b.full_patch_max_abs < TOL
    assert len(carried.row_pair) == n + 1 and carried.full_patch_row == n
    np.testing.assert_allclose(b.columns[:n], a.columns, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(b.generated[:n], a.generated)  # argmax top-2 gaps >= 6e-3 here, logits 1e-12


def test_carried_full_patch_check_catches_a_broken_patch(tiny_models):
    # Leaving the question's tokens unpatched in the carried check must be caught, as in the separate one.
    from codi_nnsight.patching.config import SweepConfig

    model, pairs = tiny_models["llama"], make_pairs()
    cfg = SweepConfig(layers=list(range(model.n_layers)))
    plan = plan_mod.plan_batch(model, pairs, cfg, full_patch=0)
    del plan.full_patch_plan[plan.schedule.prefill_calls - 1]
    assert run_batch(model, plan, cfg).full_patch_max_abs > 1e-3


@pytest.mark.parametrize("kwargs", [{"mode": "no-feedback"}, {"component": "latent"}])
def test_configurations_that_patch_prj_run_the_check_on_its_own(tiny_models, monkeypatch, kwargs):
    from codi_nnsight.patching import sweep as sweep_mod
    from codi_nnsight.patching.config import SweepConfig

    model, pairs = tiny_models["gpt2"], make_pairs()
    cfg = SweepConfig(layers=[0] if kwargs.get("component") == "latent" else [0, 1], **kwargs)
    assert not plan_mod.carries_full_patch(cfg)
    with pytest.raises(ValueError, match="cannot carry the full-patch check"):
        plan_mod.plan_batch(model, pairs, cfg, full_patch=0)
    calls = []
    real = sweep_mod.full_patch_check
    monkeypatch.setattr(sweep_mod, "full_patch_check", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds = patch_sweep(model, pairs, layers=cfg.layers, **kwargs)
    assert calls == [1] and ds.attrs["sanity_full_patch_max_abs"] < TOL


def test_resumed_sweep_runs_the_check_whose_batch_was_already_done(tiny_models, tmp_path, monkeypatch):
    from codi_nnsight.patching import sweep as sweep_mod

    model, pairs, out = tiny_models["llama"], make_pairs(), tmp_path / "r.nc"
    real = sweep_mod.run_batch
    seen = {"n": 0}

    def stop_after_first(*a, **k):
        seen["n"] += 1
        if seen["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "run_batch", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        patch_sweep(model, pairs, batch_size=1, out=out)  # pair 0, which carries the check, is stored
    monkeypatch.setattr(sweep_mod, "run_batch", real)
    calls = []
    real_check = sweep_mod.full_patch_check
    monkeypatch.setattr(sweep_mod, "full_patch_check", lambda *a, **k: calls.append(1) or real_check(*a, **k))
    ds = patch_sweep(model, pairs, batch_size=1, out=out, resume=True)
    assert calls == [1] and json.loads(ds.attrs["sanity_details"])["full_patch"]["pair_id"] == 0
    assert ds.attrs["sanity_full_patch_max_abs"] < TOL


def test_head_sweep_report_draws_the_layer_by_head_heatmap(tiny_models, tmp_path):
    from codi_nnsight import analysis

    ds = patch_sweep(tiny_models["gpt2"], make_pairs(), component="head")
    analysis.write_report(ds, tmp_path / "rep")
    assert (tmp_path / "rep" / "figures" / "head_heatmap_kl.png").stat().st_size > 0
    assert "by layer × attention head" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("family,component", [("gpt2", "resid"), ("llama", "attn"), ("qwen2", "latent")])
def test_feedback_route_matches_reference(tiny_models, references, family, component):
    # feedback-only: the target keeps its own states at position p and takes only the fed-back
    # embedding of the fully patched run (its input embedding of latent p + 1).
    model, ref = tiny_models[family], references[family]
    pair = make_pairs()[1]
    K = model.num_latent
    layers = [0] if component == "latent" else list(range(model.n_layers))
    ds = patch_sweep(model, [pair], component=component, positions="each", mode="feedback-only")
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    comp = "resid" if component == "latent" else component
    source = ref.run(pair.clean.question, suffix=toks.suffix, component=comp)
    base = ref.run(pair.corrupted.question, suffix=toks.suffix, component=comp)
    lb = torch.log_softmax(base["logits"], -1)
    for li, L in enumerate(layers):
        for p in range(K):
            if component == "latent":
                full = ref.run(pair.corrupted.question, suffix=toks.suffix, latent_override={p: source["latents"][p]})
            else:
                full = ref.run(
                    pair.corrupted.question,
                    suffix=toks.suffix,
                    component=comp,
                    patch={L: {p + 1: source["block_latent_outputs"][L][p]}},
                )
            if p + 1 < K:
                out = ref.run(
                    pair.corrupted.question, suffix=toks.suffix, latent_override={p + 1: full["latents"][p + 1]}
                )
                lp = torch.log_softmax(out["logits"], -1)
                expected = float((lp.exp() * (lp - lb)).sum())
            else:
                expected = 0.0  # the last latent feeds nothing back
            assert abs(float(ds["kl"].isel(pair=0, layer=li, position=p)) - expected) < TOL


def test_route_invariants(tiny_models):
    model = tiny_models["llama"]
    pairs = make_pairs()
    K, last = model.num_latent, model.n_layers - 1
    runs = {
        m: patch_sweep(model, pairs, positions="each", mode=m) for m in ("recurrent", "no-feedback", "feedback-only")
    }
    kl = {m: ds["kl"] for m, ds in runs.items()}
    # The last layer's output reaches later positions only as the fed-back embedding.
    assert np.allclose(kl["feedback-only"].sel(layer=last), kl["recurrent"].sel(layer=last), atol=TOL, rtol=0)
    assert np.abs(kl["no-feedback"].sel(layer=last).values).max() < TOL
    # The last latent feeds nothing back: all of its effect is the attention route.
    assert np.abs(kl["feedback-only"].isel(position=K - 1).values).max() < TOL
    assert np.allclose(kl["no-feedback"].isel(position=K - 1), kl["recurrent"].isel(position=K - 1), atol=TOL, rtol=0)
    # Elsewhere both routes carry something on this model.
    assert float(kl["feedback-only"].sel(layer=0).isel(position=0).max()) > 1e-6
    with pytest.raises(UserError, match="--mode block-thought-attention needs --positions each"):
        patch_sweep(model, pairs, mode="feedback-only")


def test_auto_batch_size_from_memory_or_the_remote_row_budget(tiny_models):
    from codi_nnsight.patching.sweep import REMOTE_ROWS, auto_batch_size

    model = tiny_models["llama"]
    assert auto_batch_size(model, 10, 40, remote="http://127.0.0.1:1") == REMOTE_ROWS // 10
    assert auto_batch_size(model, 10, 40, remote="local") == auto_batch_size(model, 10, 40)  # runs here
    local = [auto_batch_size(model, rows, 40) for rows in (5, 50, 500, 5000)]
    assert local == sorted(local, reverse=True) and local[-1] == 1 and local[0] >= 1
