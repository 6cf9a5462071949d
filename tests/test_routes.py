"""The route split (issue 31): total = feedback route + attention route + interaction, exactly.

Modes are named after what they block; the route split stacks three ordinary sweeps on a `route`
dim. Checked in float64 on the tiny models: the identity to 1e-12, each route against its own
sweep, the attention route against the independent eager reference, the invariants at the last
layer and the last thought, and the old names as aliases.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from test_patching import make_pairs

from codi_nnsight.errors import UserError
from codi_nnsight.patching import answer_tokens
from codi_nnsight.patching.config import SweepConfig
from codi_nnsight.patching.metrics import METRICS
from codi_nnsight.patching.routes import ADDITIVE_METRICS, DELTA_METRICS, ROUTES
from codi_nnsight.patching.summary import sweep_summary
from codi_nnsight.patching.sweep import patch_sweep, route_split

#: Exactness of the identity: float64 sums of three terms.
EXACT = 1e-12
#: Agreement with the eager reference / between different row layouts (float64, other kernels).
TOL = 1e-9


def _additive_names() -> list[str]:
    return [*ADDITIVE_METRICS, *(f"delta_{m}" for m in DELTA_METRICS)]


@pytest.fixture(scope="module")
def splits(tiny_models) -> dict[str, xr.Dataset]:
    """The route split of every tiny model (resid; qwen2 also the latent site)."""
    pairs = make_pairs()
    out = {f: route_split(m, pairs) for f, m in tiny_models.items()}
    out["qwen2-latent"] = route_split(tiny_models["qwen2"], pairs, component="latent")
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "qwen2-latent"])
def test_total_is_feedback_plus_attention_plus_interaction(splits, name):
    ds = splits[name]
    assert list(ds["route"].values) == list(ROUTES) == ["total", "feedback", "attention", "interaction"]
    assert ds.attrs["mode"] == "routes" and ds["kl"].dims[-1] == "route"
    assert json.loads(ds.attrs["route_modes"]) == {
        "total": "recurrent",
        "feedback": "block-thought-attention",
        "attention": "block-thought-feedback",
    }
    for var in _additive_names():
        x = ds[var]
        parts = x.sel(route="feedback") + x.sel(route="attention") + x.sel(route="interaction")
        diff = np.abs((x.sel(route="total") - parts).values)
        assert (diff[np.isfinite(diff)] <= EXACT).all(), var
        assert np.array_equal(np.isnan(x.sel(route="total").values), np.isnan(parts.values)), var
        assert x.attrs["interaction"] == "total - feedback - attention"
    # The change of the log-probability gap: total − baseline, per route; defined for every pair here.
    d = ds["delta_logprob_diff"]
    assert np.isfinite(d.values).all() and np.abs(d.sel(route="interaction").values).max() > 0
    assert np.allclose(d.sel(route="total"), ds["logprob_diff"].sel(route="total") - ds["baseline_logprob_diff"])
    # Not additive: no interaction.
    for var in ("kl", "l2", "top1_changed", "answer", "kept", "flipped", "logit_diff", "self_patch_kl"):
        assert np.isnan(ds[var].sel(route="interaction").values).all(), var
        assert ds[var].attrs.get("interaction", "NaN: not additive") == "NaN: not additive"
    assert int(ds.attrs["sanity_passed"]) == 1


def test_each_route_is_its_own_ordinary_sweep(tiny_models, splits):
    # The split runs the modes through the usual machinery: same batches, same kernels, same bits.
    model, ds = tiny_models["llama"], splits["llama"]
    for route, mode in json.loads(ds.attrs["route_modes"]).items():
        alone = patch_sweep(model, make_pairs(), positions="each", mode=mode)
        for m in METRICS:
            assert np.array_equal(ds[m.name].sel(route=route).values, alone[m.name].values, equal_nan=True), (route, m)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_route_invariants_at_the_last_layer_and_the_last_thought(tiny_models, splits, name):
    ds, model = splits[name], tiny_models[name]
    K, last = model.num_latent, model.n_layers - 1
    for var in ("delta_logprob_diff", "delta_logp_clean_answer", "delta_p_clean"):
        x = ds[var]
        # The last layer's output at thought p reaches the answer only as its fed-back embedding.
        at = x.sel(layer=last)
        assert np.nanmax(np.abs(at.sel(route="attention").values)) < TOL
        assert np.nanmax(np.abs((at.sel(route="feedback") - at.sel(route="total")).values)) < TOL
        # The last thought feeds nothing back: all of its effect is the attention route.
        at = x.isel(position=K - 1)
        assert np.nanmax(np.abs(at.sel(route="feedback").values)) < TOL
        # (not bitwise: the two sweeps' batches hold different rows, so other kernel blockings)
        assert np.nanmax(np.abs((at.sel(route="attention") - at.sel(route="total")).values)) < TOL
        assert np.nanmax(np.abs(at.sel(route="interaction").values)) < TOL
    # Elsewhere both routes carry something on these random models.
    d = ds["delta_logprob_diff"].sel(layer=0).isel(position=0)
    assert np.nanmax(np.abs(d.sel(route="feedback").values)) > 1e-6
    assert np.nanmax(np.abs(d.sel(route="attention").values)) > 1e-6


def test_the_attention_route_keeps_what_block_all_feedback_drops(tiny_models, splits):
    """The path "thought p -> a later thought attends to it -> that thought's feedback" is in the
    attention route; blocking every feedback (the old `no-feedback`) loses it."""
    model, ds = tiny_models["gpt2"], splits["gpt2"]
    K = model.num_latent
    all_fb = patch_sweep(model, make_pairs(), positions="each", mode="block-all-feedback")
    att = ds["logprob_diff"].sel(route="attention")
    narrow = all_fb["logprob_diff"]
    # Thought K-2: its only later thought is the last one, which feeds nothing back: the same.
    assert np.nanmax(np.abs((att - narrow).isel(position=K - 2).values)) < TOL
    # Earlier thoughts: later thoughts attend to them and feed back: that path is missing there.
    assert np.nanmax(np.abs((att - narrow).sel(layer=0).isel(position=0).values)) > 1e-4


@pytest.mark.parametrize("family,component", [("gpt2", "resid"), ("llama", "attn")])
def test_attention_route_matches_reference(tiny_models, references, family, component):
    # block-thought-feedback: thought p patched, latent p + 1 takes the baseline's input embedding,
    # everything else (later feedback included) recomputed — the slow, obvious way (batch 1, hooks).
    model, ref = tiny_models[family], references[family]
    pair = make_pairs()[1]
    K = model.num_latent
    ds = patch_sweep(model, [pair], component=component, positions="each", mode="block-thought-feedback")
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    source = ref.run(pair.clean.question, suffix=toks.suffix, component=component)
    base = ref.run(pair.corrupted.question, suffix=toks.suffix, component=component)
    lb = torch.log_softmax(base["logits"], -1)
    for li, L in enumerate(range(model.n_layers)):
        for p in range(K):
            out = ref.run(
                pair.corrupted.question,
                suffix=toks.suffix,
                component=component,
                patch={L: {p + 1: source["block_latent_outputs"][L][p]}},
                latent_override={p + 1: base["latents"][p + 1]} if p + 1 < K else None,
            )
            lp = torch.log_softmax(out["logits"], -1)
            expected = float((lp.exp() * (lp - lb)).sum())
            assert abs(float(ds["kl"].isel(pair=0, layer=li, position=p)) - expected) < TOL


def test_old_mode_names_are_aliases_with_a_future_warning(tiny_models):
    model, pairs = tiny_models["gpt2"], make_pairs()[:1]
    for old, new in (("frozen", "block-all-feedback"), ("no-feedback", "block-all-feedback")):
        with pytest.warns(FutureWarning, match=f"mode '{old}' is now called '{new}': mode names say what they block"):
            ds = patch_sweep(model, pairs, mode=old)
        assert ds.attrs["mode"] == new
        assert np.array_equal(ds["kl"].values, patch_sweep(model, pairs, mode=new)["kl"].values)
    with pytest.warns(FutureWarning, match="'feedback-only' is now called 'block-thought-attention'"):
        ds = patch_sweep(model, pairs, mode="feedback-only", positions="each")
    assert ds.attrs["mode"] == "block-thought-attention"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names warn about nothing
        for mode in ("recurrent", "block-all-feedback", "block-thought-feedback", "block-thought-attention"):
            assert SweepConfig(layers=[0], positions="each", mode=mode).mode == mode


def test_resume_treats_an_old_mode_name_as_the_same_mode():
    stored = {"mode": "no-feedback", "layers": [0]}
    assert SweepConfig.difference(stored, {"mode": "block-all-feedback", "layers": [0]}) is None
    assert SweepConfig.difference({"mode": "feedback-only"}, {"mode": "block-thought-attention"}) is None
    assert "mode" in SweepConfig.difference({"mode": "no-feedback"}, {"mode": "recurrent"})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"mode": "routes"},
            "--mode routes needs --positions each (it splits one patched thought's effect)",
        ),
        (
            {"mode": "routes", "positions": "each", "component": ["resid", "attn"]},
            "--mode routes takes one --component, not resid,attn",
        ),
        (
            {"mode": "block-thought-feedback"},
            "--mode block-thought-feedback needs --positions each (it blocks one patched thought's fed-back embedding)",
        ),
        (
            {"mode": "block-thought-attention"},
            "--mode block-thought-attention needs --positions each (it blocks one patched thought's keys and values)",
        ),
        (
            {"mode": "frozn"},
            "--mode 'frozn': expected one of recurrent, block-all-feedback, block-thought-feedback, "
            "block-thought-attention",
        ),
    ],
)
def test_route_and_mode_refusals_are_one_line(tiny_models, kwargs, message):
    with pytest.raises(UserError) as e:
        patch_sweep(tiny_models["gpt2"], make_pairs(), **kwargs)
    assert str(e.value) == message


def test_route_split_writes_one_file_and_refuses_to_replace_it(tiny_models, tmp_path):
    model, out = tiny_models["gpt2"], tmp_path / "routes.nc"
    ds = route_split(model, make_pairs()[:2], layers=[0], out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routes.nc"]  # the route parts are gone
    with xr.open_dataset(out) as f:
        back = f.load()
    assert list(back["route"].values) == list(ROUTES) and back.attrs["mode"] == "routes"
    assert np.array_equal(back["delta_logprob_diff"].values, ds["delta_logprob_diff"].values, equal_nan=True)
    assert "route split of the mean change of logprob_diff at layer 0, thought " in sweep_summary(back)
    with pytest.raises(UserError, match="file exists; add --force"):
        route_split(model, make_pairs()[:2], layers=[0], out=out)
    with pytest.raises(TypeError, match="route_split\\(\\) runs its own modes"):
        route_split(model, make_pairs()[:2], mode="recurrent")


def test_a_finished_route_part_is_reused_only_on_resume(tiny_models, tmp_path):
    model, out, pairs = tiny_models["gpt2"], tmp_path / "r.nc", make_pairs()[:2]
    part = patch_sweep(model, pairs, layers=[0], positions="each", out=tmp_path / "r.nc.total.nc")
    with pytest.raises(UserError) as e:
        route_split(model, pairs, layers=[0], out=out)
    assert str(e.value) == (
        f"{tmp_path / 'r.nc.total.nc'}: a finished route of an earlier run exists; rerun with --resume to use it, "
        "or delete it to start over"
    )
    ds = route_split(model, pairs, layers=[0], out=out, resume=True)
    assert np.array_equal(ds["kl"].sel(route="total").values, part["kl"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.nc"]
