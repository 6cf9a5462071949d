"""Metrics as functions (`patch_sweep(metrics={name: fn})`): the same numbers as the built-in
metrics they recompute, their identity in the Dataset and the run fingerprint, the shipped
gold-intermediate probability against a plain-hook reference and the logit lens, and one-line
refusals before any work."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re

import numpy as np
import pytest
import torch
import xarray as xr

from codi_nnsight.data.pairs import Pair, PairSet, Question
from codi_nnsight.errors import UserError
from codi_nnsight.patching import answer_tokens
from codi_nnsight.patching.config import SweepConfig
from codi_nnsight.patching.metrics import gold_value_prob, metric_function
from codi_nnsight.patching.plan import plan_batch
from codi_nnsight.patching.sweep import patch_sweep
from codi_nnsight.patching.trace import full_patch_pair
from codi_nnsight.readouts.common import value_first_token
from codi_nnsight.readouts.lens import logit_lens

#: float64 throughout; the reference runs batch 1 through other kernels (sdpa, no padding).
TOL = 1e-10


def gold_pairs() -> PairSet:
    """Pairs whose questions carry gold chains (`steps`), one corrupted question without any."""

    def q(a: int, b: int, steps: bool = True) -> Question:
        meta = {"steps": [f"{a}+{b}={a + b}", f"{a + b}*2={2 * (a + b)}"]} if steps else {}
        return Question(f"Sam has {a} cats and {b} dogs. How many legs and tails?", 2 * (a + b), meta)

    return PairSet.from_pairs([Pair(0, q(3, 4), q(5, 4)), Pair(1, q(6, 2), q(6, 7)), Pair(2, q(2, 9), q(4, 9, False))])


def kl_again(v):
    """KL recomputed from the per-row inputs, exactly as the built-in metric."""
    return (v["logp"].exp() * (v["logp"] - v["base_logp"])).sum(-1)


@metric_function(per_run=True, units="probability")
def p_clean_again(v):
    """probability of the clean answer's first token, recomputed"""
    return v["logp"].gather(1, v["first"][:, :1]).squeeze(1).exp()


@pytest.mark.parametrize("positions", ["all", "each"])
def test_a_function_equal_to_a_builtin_metric_gives_identical_numbers(tiny_models, positions):
    model = tiny_models["llama"]
    ds = patch_sweep(model, gold_pairs(), positions=positions, metrics={"kl2": kl_again, "pc": p_clean_again})
    # The same kernels on the same tensors: bit-identical, per variant and per unpatched run.
    assert ds["kl2"].dims == ds["kl"].dims
    assert np.array_equal(ds["kl2"].values, ds["kl"].values)
    assert np.array_equal(ds["pc"].values, ds["p_clean"].values)
    for run in ("baseline", "source"):
        assert np.array_equal(ds[f"{run}_pc"].values, ds[f"{run}_p_clean"].values)
    assert "baseline_kl2" not in ds  # not per_run
    assert ds["pc"].attrs["long_name"] == "probability of the clean answer's first token, recomputed"
    assert ds["pc"].attrs["units"] == "probability"
    # ... and a sweep without functions is the sweep it always was.
    plain = patch_sweep(model, gold_pairs(), positions=positions)
    for name in plain.data_vars:
        assert np.array_equal(plain[name].values, ds[name].values, equal_nan=True), name
    assert not any(k.startswith("metric_fn_") for k in plain.attrs)
    assert set(ds.data_vars) - set(plain.data_vars) == {"kl2", "pc", "baseline_pc", "source_pc"}


def test_name_and_source_hash_are_in_the_attrs_and_the_fingerprint(tiny_models, tmp_path):
    out = tmp_path / "r.nc"
    patch_sweep(tiny_models["gpt2"], gold_pairs(), out=out, metrics={"kl2": kl_again})
    digest = hashlib.sha256(inspect.getsource(kl_again).encode()).hexdigest()
    with xr.open_dataset(out) as ds:
        attrs = ds["kl2"].attrs
        assert attrs["function"] == f"{__name__}:kl_again"
        assert attrs["function_source_sha256"] == digest
        assert attrs["function_bound"] == "{}"
        identity = f"{__name__}:kl_again source_sha256={digest}"
        assert ds.attrs["metric_fn_kl2"] == identity
        assert json.loads(ds.attrs["run_fingerprint"])["metric_fn_kl2"] == identity
    # A closure's values are part of what it computes: recorded too.
    shipped = patch_sweep(tiny_models["gpt2"], gold_pairs(), metrics={"p1": gold_value_prob(1)})
    assert json.loads(shipped["p1"].attrs["function_bound"]) == {"closure": {"k": 1, "key": "gold", "value": 1}}
    assert shipped["p1"].attrs["function"] == (
        "codi_nnsight.patching.metrics:gold_value_prob.<locals>.gold_value_prob_at_thought"
    )


CALLS = {"n": 0}


def fails_on_the_second_batch(v):
    CALLS["n"] += 1
    if CALLS["n"] == 2:
        raise UserError("stop here")
    return v["logits"][:, 0]


def test_resume_with_a_changed_function_body_is_refused(tiny_models, tmp_path):
    model, pairs, out = tiny_models["gpt2"], gold_pairs(), tmp_path / "r.nc"
    CALLS["n"] = 0
    with pytest.raises(UserError, match="stop here; the finished pairs are kept in"):
        patch_sweep(model, pairs, batch_size=1, out=out, metrics={"m": fails_on_the_second_batch})

    def changed(v):
        return v["logits"][:, 1]

    with pytest.raises(UserError) as e:
        patch_sweep(model, pairs, batch_size=1, out=out, resume=True, metrics={"m": changed})
    stored = f"{__name__}:fails_on_the_second_batch source_sha256="
    stored += hashlib.sha256(inspect.getsource(fails_on_the_second_batch).encode()).hexdigest()
    now = f"{__name__}:test_resume_with_a_changed_function_body_is_refused.<locals>.changed source_sha256="
    now += hashlib.sha256(inspect.getsource(changed).encode()).hexdigest()
    assert str(e.value) == (
        f"{out}.partial: partial run has a different configuration (metric_fn_m differ; e.g. metric_fn_m: "
        f"stored {stored!r}, now {now!r}); refusing to mix results"
    )
    with pytest.raises(UserError, match=r"metric_fn_m differ; e\.g\. metric_fn_m: stored .*, now None"):
        patch_sweep(model, pairs, batch_size=1, out=out, resume=True)  # dropping it is another run too
    ds = patch_sweep(model, pairs, batch_size=1, out=out, resume=True, metrics={"m": fails_on_the_second_batch})
    assert np.isfinite(ds["m"].values).all()


def lens_prob(ref, thought: torch.Tensor, token: int) -> float:
    """softmax(lm_head(final_norm(thought)))[token] on the reference model's own modules; NaN: no token."""
    if token < 0:
        return float("nan")
    inner = ref.lm.get_base_model()
    norm = inner.transformer.ln_f if ref.family == "gpt2" else inner.model.norm
    logits = inner.lm_head(norm(thought)).to(torch.float64)
    return float(torch.softmax(logits, -1)[token])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gold_value_probability_equals_a_plain_hook_reference(tiny_models, references, family):
    model, ref, pairs = tiny_models[family], references[family], gold_pairs()
    layer = model.n_layers - 1
    fns = {"p0": gold_value_prob(0), "p1": gold_value_prob(1), "q1": gold_value_prob(1, thought=2, of="source")}
    ds = patch_sweep(model, pairs, layers=[layer], positions="each", metrics=fns)
    K, checked = model.num_latent, 0
    for i, pair in enumerate(pairs):  # denoise: the clean run's block output patched into the corrupted run
        toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
        source = ref.run(pair.clean.question, suffix=toks.suffix)
        base = ref.run(pair.corrupted.question, suffix=toks.suffix)
        gold = {
            name: [value_first_token(model, float(s.split("=")[-1])) for s in q.meta.get("steps", [])]
            for name, q in (("clean", pair.clean), ("corrupted", pair.corrupted))
        }
        tok = {name: g + [-1] * (2 - len(g)) for name, g in gold.items()}
        for p in range(K):
            patch = {layer: {p + 1: source["block_latent_outputs"][layer][p]}}
            thoughts = ref.run(pair.corrupted.question, suffix=toks.suffix, patch=patch)["latents"]
            want = {
                "p0": lens_prob(ref, thoughts[0], tok["corrupted"][0]),
                "p1": lens_prob(ref, thoughts[1], tok["corrupted"][1]),
                "q1": lens_prob(ref, thoughts[2], tok["clean"][1]),
            }
            for name, value in want.items():
                got = float(ds[name].sel(pair=i, layer=layer, position=p))
                assert got == pytest.approx(value, abs=TOL, nan_ok=True), (name, i, p)
                checked += np.isfinite(value)
        for run, result, who in (("baseline", base, "corrupted"), ("source", source, "clean")):
            want = lens_prob(ref, result["latents"][1], tok[who][1])
            assert float(ds[f"{run}_p1"].sel(pair=i)) == pytest.approx(want, abs=TOL, nan_ok=True), (run, i)
    assert checked >= 12  # most values are defined (one corrupted question has no chain: NaN)
    assert np.isnan(ds["p1"].sel(pair=2).values).all() and np.isfinite(ds["q1"].sel(pair=2).values).all()
    # Patching thought p's block output moves only the thoughts after it.
    p1 = ds["p1"].sel(layer=layer).values
    base = np.broadcast_to(ds["baseline_p1"].values[:, None], p1[:, 1:].shape)
    np.testing.assert_allclose(p1[:, 1:], base, rtol=0, atol=1e-14)  # rows of one batch: kernels may differ by rows


@pytest.mark.parametrize("component", ["resid", "latent"])
def test_gold_value_probability_of_unpatched_runs_is_the_logit_lens(tiny_models, component):
    model, pairs = tiny_models["qwen2"], gold_pairs()
    fns = {f"p{k}": gold_value_prob(k) for k in range(2)} | {"t2": gold_value_prob(0, thought=2)}
    ds = patch_sweep(model, pairs, component=component, positions="each", metrics=fns)
    lens = logit_lens(model, pairs)["prj_intermediate_prob"]  # step index k = thought k (step "bot" = 0)
    for name, value, k in (("p0", 0, 0), ("p1", 1, 1), ("t2", 0, 2)):
        for run, variant in (("baseline", "corrupted"), ("source", "clean")):
            want = lens.isel(step=k).sel(variant=variant, intermediate=value).values
            np.testing.assert_allclose(ds[f"{run}_{name}"].values, want, rtol=0, atol=TOL)
        # A patch after thought k leaves it as the baseline's: a block output at latent p feeds
        # thought p + 1 on, a fed-back thought p (`latent`) is thought p itself.
        after = ds[name].isel(position=slice(k + (component == "latent"), None))
        np.testing.assert_allclose(after.values, np.broadcast_to(want_b(ds, name, after), after.shape), atol=TOL)


def want_b(ds: xr.Dataset, name: str, like: xr.DataArray) -> np.ndarray:
    """`baseline_<name>` broadcast to the dims of `like` (pair first)."""
    return ds[f"baseline_{name}"].values.reshape((-1,) + (1,) * (like.ndim - 1))


@pytest.mark.parametrize("mode", ["recurrent", "block-thought-feedback"])
def test_batch_size_one_equals_batched(tiny_models, mode):
    model = tiny_models["gpt2"]
    fns = {"p1": gold_value_prob(1), "s2": gold_value_prob(1, thought=2, of="source"), "kl2": kl_again}
    # In recurrent mode the batch holding the full-patch check's pair reads thought 0 inside the
    # loop (after the question's call), every other batch before it: batch 3 holds all pairs, so
    # batch 1 against batch 3 compares the two ways too.
    assert full_patch_pair(model, list(gold_pairs())) is not None
    runs = [patch_sweep(model, gold_pairs(), positions="each", mode=mode, batch_size=n, metrics=fns) for n in (1, 3)]
    for name in ("p1", "baseline_p1", "source_p1", "s2", "kl2"):
        np.testing.assert_allclose(runs[0][name].values, runs[1][name].values, rtol=0, atol=1e-12)


def test_stacked_components_carry_metric_functions(tiny_models, tmp_path):
    model = tiny_models["gpt2"]
    ds = patch_sweep(
        model, gold_pairs(), component=["resid", "mlp"], out=tmp_path / "c.nc", metrics={"p1": gold_value_prob(1)}
    )
    assert ds["p1"].dims == ("pair", "layer", "component")
    one = patch_sweep(model, gold_pairs(), component="mlp", metrics={"p1": gold_value_prob(1)})
    np.testing.assert_array_equal(ds["p1"].sel(component="mlp").values, one["p1"].values)


def test_the_route_split_and_ablations_carry_metric_functions(tiny_models):
    model, fns = tiny_models["gpt2"], {"p1": gold_value_prob(1), "kl2": kl_again}
    routes = patch_sweep(model, gold_pairs(), mode="routes", positions="each", metrics=fns)
    assert routes["p1"].dims == routes["kl"].dims == ("pair", "layer", "position", "route")
    assert np.array_equal(routes["kl2"].values, routes["kl"].values, equal_nan=True)
    assert np.isnan(routes["p1"].sel(route="interaction").values).all()
    total = patch_sweep(model, gold_pairs(), positions="each", metrics=fns)
    np.testing.assert_array_equal(routes["p1"].sel(route="total").values, total["p1"].values)
    # A resample ablation adds donor rows (their own gold unknown): batch-independent all the same.
    by = [patch_sweep(model, gold_pairs(), ablation="resample", batch_size=n, metrics=fns) for n in (1, 3)]
    np.testing.assert_allclose(by[0]["p1"].values, by[1]["p1"].values, rtol=0, atol=1e-12)


def rows_of_one_pair_batch(model, pairs, layers) -> int:
    """Rows of the first batch of a batch-size-1 sweep (the full-patch row included, if it carries it)."""
    cfg = SweepConfig(layers=layers)
    full = 0 if full_patch_pair(model, list(pairs)) == 0 else None
    return len(plan_batch(model, [pairs[0]], cfg, full_patch=full).row_pair)


def from_exec(name: str):
    ns: dict = {}
    exec("def f(v):\n    return v['logits'][:, 0]\n", {"__name__": name}, ns)
    return ns["f"]


@metric_function(needs=("attention",))
def wants_attention(v):
    return v["logits"][:, 0]


@pytest.mark.parametrize(
    "metrics,message",
    [
        ({"kl": kl_again}, "metrics['kl']: 'kl' is already a built-in metric; choose another name"),
        (
            {"comparable": kl_again},
            "metrics['comparable']: 'comparable' is already a per-pair variable of every sweep; choose another name",
        ),
        ({"layer": kl_again}, "metrics['layer']: 'layer' is already a dimension of the results; choose another name"),
        (
            {"delta_p_clean": kl_again},
            "metrics['delta_p_clean']: 'delta_p_clean' is already a variable of the route split; choose another name",
        ),
        (
            {"pc": p_clean_again, "baseline_pc": kl_again},
            "metrics['baseline_pc']: 'baseline_pc' is already a variable of metric 'pc'; choose another name",
        ),
        (
            {"p_clean_x": p_clean_again, "source_p_clean_x": kl_again},
            "metrics['source_p_clean_x']: 'source_p_clean_x' is already a variable of metric 'p_clean_x'; "
            "choose another name",
        ),
        (
            {"baseline_pc": kl_again, "pc": p_clean_again},
            "metrics['pc']: its variable 'baseline_pc' is already a variable of metric 'baseline_pc'; "
            "choose another name",
        ),
        ({"2x": kl_again}, "metrics: name '2x' is not a variable name (letters, digits and _, not a digit first)"),
        (
            {"m": functools.partial(kl_again)},
            "metrics['m']: expected a Python function (def or lambda) of the per-row inputs, got partial",
        ),
        (
            {"m": from_exec("scratch")},
            "metrics['m']: cannot read the source of scratch:f (could not get source code); define it in a "
            "file or a notebook cell, so the results can record its source hash",
        ),
        ({"m": wants_attention}, "metrics['m']: needs 'attention' is not one of thoughts, gold"),
        ({"p": gold_value_prob(3)}, "gold_value_prob: thought 3 out of range (the model has 3 thoughts, 0-2)"),
        ([kl_again], "metrics=[" + repr(kl_again) + "]: expected a dict {name: function}"),
    ],
)
def test_bad_metric_functions_are_one_line_before_any_work(tiny_models, tmp_path, metrics, message):
    out = tmp_path / "r.nc"
    with pytest.raises(UserError) as e:
        patch_sweep(tiny_models["gpt2"], gold_pairs(), out=out, metrics=metrics)
    assert str(e.value) == message
    assert not out.exists() and not (tmp_path / "r.nc.partial").exists()


def test_names_that_merely_look_like_others_are_fine(tiny_models):
    fns = {"p_clean2": p_clean_again, "baseline": kl_again, "p": p_clean_again, "source_x": kl_again}
    ds = patch_sweep(tiny_models["gpt2"], gold_pairs(), layers=[0], metrics=fns)
    assert {"p_clean2", "baseline_p_clean2", "baseline", "p", "baseline_p", "source_x"} <= set(ds.data_vars)


def test_a_function_of_the_wrong_shape_is_one_line_naming_it(tiny_models):
    model, pairs = tiny_models["gpt2"], gold_pairs()
    rows = rows_of_one_pair_batch(model, pairs, [0])
    cases = [
        (lambda v: v["logits"].sum(), "a tensor of shape ()"),
        (lambda v: v["logits"][:, :2], f"a tensor of shape ({rows}, 2)"),
        (lambda v: 0.5, "float"),
    ]
    for fn, got in cases:
        with pytest.raises(UserError) as e:
            patch_sweep(model, pairs, layers=[0], batch_size=1, metrics={"bad": fn})
        assert str(e.value) == (
            f"metric 'bad' ({__name__}:test_a_function_of_the_wrong_shape_is_one_line_naming_it.<locals>.<lambda>) "
            f"returned {got}; expected a torch tensor of shape ({rows},): one value per row"
        )


def test_gold_value_prob_arguments_are_checked():
    for call, message in (
        (lambda: gold_value_prob(-1), "gold_value_prob: value=-1: expected an int >= 0"),
        (lambda: gold_value_prob(1, thought=True), "gold_value_prob: thought=True: expected an int >= 0"),
        (lambda: gold_value_prob(1, of="clean"), "gold_value_prob: of='clean': expected 'own' or 'source'"),
    ):
        with pytest.raises(UserError, match=re.escape(message) + "$"):
            call()


def test_metric_functions_run_on_ray_workers(tiny_models):
    pytest.importorskip("ray")
    model = tiny_models["gpt2"]
    scale = 2.0

    def doubled_kl(v):  # a closure defined here: cloudpickle ships it by value
        return scale * (v["logp"].exp() * (v["logp"] - v["base_logp"])).sum(-1)

    fns = {"kl_x2": doubled_kl, "p1": gold_value_prob(1)}
    here = patch_sweep(model, gold_pairs(), batch_size=1, metrics=fns)
    there = patch_sweep(model, gold_pairs(), batch_size=1, metrics=fns, workers=2)
    for name in ("kl_x2", "p1", "baseline_p1"):
        np.testing.assert_array_equal(there[name].values, here[name].values)
    assert json.loads(there["kl_x2"].attrs["function_bound"]) == {"closure": {"scale": 2.0}}


def test_metric_functions_survive_nnsights_remote_serialization(tiny_models):
    # remote="local": the request is serialized as for NDIF and run here, so the functions (and the
    # thought readout they use) travel inside the trace as they would to a server.
    model, fns = tiny_models["gpt2"], {"p1": gold_value_prob(1), "kl2": kl_again}
    here = patch_sweep(model, gold_pairs(), positions="each", metrics=fns)
    local = patch_sweep(model, gold_pairs(), positions="each", metrics=fns, remote="local")
    for name in ("p1", "baseline_p1", "kl2"):
        np.testing.assert_allclose(local[name].values, here[name].values, rtol=0, atol=1e-12)


def test_metric_option_reads_the_cli_forms(tmp_path, tiny_models):
    from codi_nnsight.patching.metrics import metric_option, metric_options

    assert metric_options(()) is None
    with pytest.raises(UserError, match=r"^--metric-fn: name 'p' is given twice$"):
        metric_options(["p=codi_nnsight.patching.metrics:gold_value_prob(1)"] * 2)

    name, fn = metric_option("p1=codi_nnsight.patching.metrics:gold_value_prob(1, thought=2, of='source')")
    assert name == "p1" and fn.__qualname__ == "gold_value_prob.<locals>.gold_value_prob_at_thought"
    assert [c.cell_contents for c in fn.__closure__] == [2, "source_gold", 1]  # k, key, value
    file = tmp_path / "my_metrics.py"
    file.write_text("def margin(v):\n    return v['logits'].max(-1).values - v['base_logits'].max(-1).values\n")
    name, fn = metric_option(f"m={file}:margin")
    ds = patch_sweep(tiny_models["gpt2"], gold_pairs(), layers=[0], metrics={name: fn})
    assert ds["m"].attrs["function"] == "codi_metric_my_metrics:margin"
    assert ds["m"].attrs["function_source_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    usage = (
        "expected NAME=MODULE:FUNCTION or NAME=FILE.py:FUNCTION "
        "(e.g. p1=codi_nnsight.patching.metrics:gold_value_prob(1))"
    )
    for text, message in (
        ("p1", f"--metric-fn 'p1': {usage}"),
        ("p1=gold_value_prob(1)", f"--metric-fn 'p1=gold_value_prob(1)': {usage}"),
        (
            "m=no_such_module_x:f",
            "--metric-fn 'm=no_such_module_x:f': cannot load no_such_module_x "
            "(ModuleNotFoundError: No module named 'no_such_module_x')",
        ),
        (f"m={tmp_path}/none.py:f", f"--metric-fn 'm={tmp_path}/none.py:f': no file {tmp_path}/none.py"),
        (f"m={file}:nope", f"--metric-fn 'm={file}:nope': {file} has no function 'nope'"),
        (
            "p=codi_nnsight.patching.metrics:gold_value_prob(k)",
            "--metric-fn 'p=codi_nnsight.patching.metrics:gold_value_prob(k)': the arguments of gold_value_prob "
            "must be literals",
        ),
    ):
        with pytest.raises(UserError) as e:
            metric_option(text)
        assert str(e.value) == message


def test_gold_value_probability_on_a_coconut_model_is_its_logit_lens(tmp_path):
    # Coconut feeds the last hidden state back as it is: the thought is that state, read by the lens.
    from codi_nnsight.data.synthetic import make_synthetic_pairs
    from codi_nnsight.model.coconut_checkpoint import CoconutConfig, build_coconut
    from codi_nnsight.model.wrapper import CODIModel
    from codi_nnsight.testing.tiny_coconut import write_tiny_coconut

    path = write_tiny_coconut(tmp_path, family="qwen2", fmt="meta", n_layers=2, kv_heads=2, num_latent=3, seed=3)
    module, tok, _ = build_coconut(CoconutConfig.from_json(path), dtype=torch.float64)
    model, pairs = CODIModel(module, tokenizer=tok, config=None), make_synthetic_pairs(3, seed=11)
    ds = patch_sweep(model, pairs, positions="each", metrics={"p1": gold_value_prob(1), "p2": gold_value_prob(2)})
    lens = logit_lens(model, pairs)["prj_intermediate_prob"]
    for name, k in (("p1", 1), ("p2", 2)):
        want = lens.isel(step=k).sel(variant="corrupted", intermediate=k).values
        assert np.isfinite(want).sum() >= 2
        np.testing.assert_allclose(ds[f"baseline_{name}"].values, want, rtol=0, atol=TOL)


def test_cli_metric_fn_stores_the_function_and_refuses_a_bad_spec(tiny_dirs, tmp_path):
    import xarray as xr
    from click.testing import CliRunner

    from codi_nnsight.cli import main

    out = tmp_path / "r.nc"
    base = ["patch", "--model", tiny_dirs["gpt2"], "--dtype", "float64", "--limit", "2", "--positions", "each"]
    spec = "p1=codi_nnsight.patching.metrics:gold_value_prob(1)"
    r = CliRunner().invoke(main, [*base, "--out", str(out), "--metric-fn", spec])
    assert r.exit_code == 0, r.output
    with xr.open_dataset(out) as ds:
        assert ds["p1"].dims == ("pair", "layer", "position")
        assert ds["p1"].attrs["function_source_sha256"] and "gold_value_prob" in ds["p1"].attrs["function"]
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "s.nc"), "--metric-fn", "kl=os:getcwd"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "s.nc").exists()
