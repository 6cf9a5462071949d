"""Tests for codi_nnsight.analysis statistics, loading and figures (synthetic Datasets)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import make_results, to_schema1
from matplotlib.figure import Figure
from scipy import stats as sps

from codi_nnsight import analysis
from codi_nnsight.analysis import plots

NR = 400  # bootstrap resamples in tests: enough for stable CIs, fast


@pytest.fixture(scope="module")
def planted() -> xr.Dataset:
    return make_results(30, 8, effect_layer=3)


@pytest.fixture(scope="module")
def flat() -> xr.Dataset:
    return make_results(30, 8, seed=1)


@pytest.fixture(scope="module")
def grid() -> xr.Dataset:
    return make_results(16, 5, effect_layer=2, positions=3, components=["resid", "attn", "mlp"])


# ------------------------------------------------------------------------------ layer_summary
def test_layer_summary_matches_numpy(planted: xr.Dataset) -> None:
    s = analysis.layer_summary(planted, "kl")  # default 2000 resamples
    kl = planted["kl"].values
    assert s["mean"].dims == ("layer",)
    np.testing.assert_allclose(s["mean"], kl.mean(axis=0))
    np.testing.assert_allclose(s["std"], kl.std(axis=0, ddof=1))
    np.testing.assert_allclose(s["sem"], kl.std(axis=0, ddof=1) / np.sqrt(30))
    np.testing.assert_allclose(s["median"], np.median(kl, axis=0))
    assert (s["n"] == 30).all()
    assert (s["ci_low"] <= s["mean"]).all() and (s["mean"] <= s["ci_high"]).all()
    assert s["mean"].attrs["units"] == "nats"
    assert s.attrs["model_name"] == planted.attrs["model_name"]
    # true means: 0.1 (gamma(2, 0.05)) everywhere, 0.5 at the planted layer
    truth = np.where(s["layer"] == 3, 0.5, 0.1)
    covered = (s["ci_low"].values <= truth) & (truth <= s["ci_high"].values)
    assert covered[3]
    assert covered.sum() >= 6


def test_layer_summary_nan_and_degenerate() -> None:
    ds = make_results(10, 4).copy(deep=True)
    kl = ds["kl"].values
    kl[:, 0] = np.nan  # all NaN
    kl[1:, 1] = np.nan  # a single value
    kl[:, 2] = 0.25  # constant
    kl[:3, 3] = np.nan  # partial NaN
    s = analysis.layer_summary(ds, "kl", n_resamples=NR)
    assert s["n"].values.tolist() == [0, 1, 10, 7]
    assert np.isnan(s["mean"][0]) and np.isnan(s["ci_low"][0])
    assert s["ci_low"][1] == s["ci_high"][1] == s["mean"][1] == kl[0, 1]
    assert np.isnan(s["std"][1])
    assert s["ci_low"][2] == s["ci_high"][2] == pytest.approx(0.25)
    assert s["mean"][3] == pytest.approx(np.nanmean(kl[:, 3]))


def test_layer_summary_reproducible_and_subset_invariant(planted: xr.Dataset) -> None:
    a = analysis.layer_summary(planted, n_resamples=NR, seed=3)
    b = analysis.layer_summary(planted, n_resamples=NR, seed=3)
    xr.testing.assert_identical(a, b)
    sub = analysis.layer_summary(planted.sel(layer=[5]), n_resamples=NR, seed=3)
    assert sub["ci_low"].item() == a["ci_low"].sel(layer=5).item()


def test_layer_summary_unknown_metric(planted: xr.Dataset) -> None:
    with pytest.raises(analysis.ResultsError, match="metric 'nope' not in results"):
        analysis.layer_summary(planted, "nope")


# ----------------------------------------------------------------------------- critical layers
def test_critical_layers_planted(planted: xr.Dataset) -> None:
    c = analysis.critical_layers(planted, "kl", k=3, n_resamples=NR)
    assert c.sizes["rank"] == 3
    assert c["rank"].values.tolist() == [1, 2, 3]
    assert int(c["layer"].sel(rank=1)) == 3
    assert bool(c["significant"].sel(rank=1))
    assert not c["significant"].sel(rank=[2, 3]).any()
    assert (np.diff(c["mean"].values) <= 0).all()
    assert (c["p_adj"] >= c["p_value"]).all()


def test_flat_dataset_has_no_significant_layer(flat: xr.Dataset) -> None:
    c = analysis.critical_layers(flat, "kl", k=8, n_resamples=NR)
    assert not c["significant"].any()
    t = analysis.layer_tests(flat, "kl")
    assert (t["p_adj"] >= 0.05).all()


def test_layer_tests_against_scipy(planted: xr.Dataset) -> None:
    t = analysis.layer_tests(planted, "kl")
    x = planted["kl"].values
    others = (x.sum(axis=1, keepdims=True) - x) / (x.shape[1] - 1)
    for j in range(x.shape[1]):
        p = sps.wilcoxon(x[:, j] - others[:, j], alternative="greater").pvalue
        assert t["p_value"].isel(layer=j).item() == pytest.approx(p)


def test_bh_adjust_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(12) ** 3
    np.testing.assert_allclose(analysis.bh_adjust(p), sps.false_discovery_control(p))
    with_nan = np.concatenate([p, [np.nan]])
    out = analysis.bh_adjust(with_nan)
    assert np.isnan(out[-1])
    np.testing.assert_allclose(out[:-1], sps.false_discovery_control(p))


# ------------------------------------------------------------------------ peak / similarity
def test_peak_layer_histogram(planted: xr.Dataset) -> None:
    ds = planted.copy(deep=True)
    ds["kl"].values[0, :] = np.nan
    pk = analysis.peak_layer(ds, "kl")
    assert pk["peak_layer"].values[0] == -1
    assert int(pk["histogram"].sum()) == 29
    assert int(pk["histogram"].sel(layer=3)) >= 27
    assert pk["share"].sum().item() == pytest.approx(1.0)
    expected = np.nanargmax(planted["kl"].values[1:], axis=1)
    np.testing.assert_array_equal(pk["peak_layer"].values[1:], expected)


def test_layer_similarity(planted: xr.Dataset) -> None:
    sim = analysis.layer_similarity(planted, "kl")
    assert sim.dims == ("layer", "layer_other")
    np.testing.assert_allclose(np.diag(sim.values), 1.0)
    np.testing.assert_allclose(sim.values, sim.values.T)
    rho = sps.spearmanr(planted["kl"].values[:, 1], planted["kl"].values[:, 4]).statistic
    assert sim.sel(layer=1, layer_other=4).item() == pytest.approx(rho)
    ds = planted.copy(deep=True)
    ds["kl"].values[:4, 2] = np.nan  # pairwise-complete path
    sim2 = analysis.layer_similarity(ds, "kl")
    np.testing.assert_allclose(sim2.values, sim2.values.T)
    np.testing.assert_allclose(np.diag(sim2.values), 1.0)


# -------------------------------------------------------------------------------- by / compare
def test_by_matches_manual_groupby(planted: xr.Dataset) -> None:
    g = analysis.by(planted, "reasoning_steps", "kl", n_resamples=NR)
    manual = planted["kl"].groupby("reasoning_steps").mean("pair")
    assert g["mean"].dims == ("reasoning_steps", "layer")
    np.testing.assert_array_equal(g["reasoning_steps"], manual["reasoning_steps"])
    np.testing.assert_allclose(g["mean"].transpose(*manual.dims), manual)
    counts = planted["reasoning_steps"].to_series().value_counts().sort_index()
    assert g["n_pairs"].values.tolist() == counts.values.tolist()
    assert (g["n"].sel(layer=0) == g["n_pairs"]).all()


def test_by_other_coordinate(planted: xr.Dataset) -> None:
    ds = planted.assign_coords(bucket=("pair", np.arange(30) % 3))
    g = analysis.by(ds, "bucket", "recovery", n_resamples=NR)
    assert g.sizes["bucket"] == 3 and (g["n_pairs"] == 10).all()
    with pytest.raises(analysis.ResultsError, match="no pair coordinate"):
        analysis.by(planted, "missing")


def test_compare_self_is_zero(planted: xr.Dataset) -> None:
    c = analysis.compare(planted, planted, "kl", n_resamples=NR)
    assert (c["mean"] == 0).all() and (c["ci_low"] == 0).all() and (c["ci_high"] == 0).all()
    assert (c["p_value"] == 1).all() and (c["n"] == 30).all()


def test_compare_planted_vs_flat_and_alignment(planted: xr.Dataset) -> None:
    # same seed -> identical noise, so the difference is exactly the planted effect
    base = make_results(30, 8)
    c = analysis.compare(planted, base, "kl", n_resamples=NR)
    expected = np.where(c["layer"] == 3, 0.4, 0.0)
    np.testing.assert_allclose(c["mean"], expected, atol=1e-12)
    assert c["p_value"].sel(layer=3) < 1e-6
    part = analysis.compare(planted, base.isel(pair=slice(10, None), layer=slice(0, 5)), "kl", n_resamples=NR)
    assert part.sizes["layer"] == 5 and (part["n"] == 20).all()
    other = base.assign_coords(pair=base["pair"] + 1000)
    with pytest.raises(analysis.ResultsError, match="no common pairs"):
        analysis.compare(planted, other, "kl")


# ------------------------------------------------------------------------------------- extra dims
def test_position_and_component_dims(grid: xr.Dataset) -> None:
    s = analysis.layer_summary(grid, "kl", n_resamples=NR)
    assert set(s["mean"].dims) == {"layer", "position", "component"}
    np.testing.assert_allclose(s["mean"].transpose(*grid["kl"].dims[1:]), grid["kl"].mean("pair"))
    c = analysis.critical_layers(grid, "kl", k=2, n_resamples=NR)
    assert c["layer"].dims == ("rank", "position", "component")
    assert (c["layer"].sel(rank=1, position=0) == 2).all()
    assert bool(c["significant"].sel(rank=1, position=0, component="resid"))
    pk = analysis.peak_layer(grid, "kl")
    assert set(pk["histogram"].dims) == {"layer", "position", "component"}
    assert (pk["histogram"].sum("layer") == 16).all()
    sim = analysis.layer_similarity(grid, "kl")
    assert sim.dims[:2] == ("layer", "layer_other") and sim.sizes["component"] == 3
    g = analysis.by(grid, n_resamples=50)
    assert {"reasoning_steps", "layer", "position", "component"} == set(g["mean"].dims)
    cmp = analysis.compare(grid, grid, "kl", n_resamples=50)
    assert (cmp["mean"] == 0).all()


def test_single_latent_layer() -> None:
    ds = make_results(12, 1, components=["latent"])
    c = analysis.critical_layers(ds, "kl", k=3, n_resamples=NR)
    assert c.sizes["rank"] == 1
    assert np.isnan(c["p_adj"]).all() and not c["significant"].any()


# ------------------------------------------------------------------------------------------ load
def test_load_roundtrip(tmp_path, planted: xr.Dataset) -> None:
    path = tmp_path / "results.nc"
    planted.to_netcdf(path)
    ds = analysis.load(path)
    xr.testing.assert_allclose(ds["kl"], planted["kl"])
    assert ds.attrs["codi_nnsight_schema"] == "codi-nnsight/results/2"
    path.unlink()  # file handle was closed by load()
    assert float(ds["kl"].sum()) == pytest.approx(float(planted["kl"].sum()))


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(analysis.ResultsError) as err:
        analysis.load(tmp_path / "results.nc")
    assert str(err.value) == f"{tmp_path / 'results.nc'}: no such file"


def test_load_truncated_and_garbage(tmp_path, planted: xr.Dataset) -> None:
    path = tmp_path / "results.nc"
    planted.to_netcdf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    msg = f"{path}: not a readable netCDF file (truncated or corrupt?)"
    with pytest.raises(analysis.ResultsError) as err:
        analysis.load(path)
    assert str(err.value) == msg
    path.write_text("this is not netCDF\n")
    with pytest.raises(analysis.ResultsError) as err:
        analysis.load(path)
    assert str(err.value) == msg


def test_load_wrong_schema(tmp_path, planted: xr.Dataset) -> None:
    path = tmp_path / "results.nc"
    other = planted.copy()
    other.attrs = {k: v for k, v in planted.attrs.items() if k != "codi_nnsight_schema"}
    other.to_netcdf(path)
    with pytest.raises(analysis.ResultsError) as err:
        analysis.load(path)
    assert str(err.value) == (f"{path}: not a codi-nnsight results file (attr codi_nnsight_schema missing)")
    other.attrs["codi_nnsight_schema"] = "something-else/1"
    other.to_netcdf(path)
    with pytest.raises(analysis.ResultsError, match="not a codi-nnsight results file"):
        analysis.load(path)


def test_load_missing_variable(tmp_path, planted: xr.Dataset) -> None:
    path = tmp_path / "results.nc"
    planted.drop_vars("kl").to_netcdf(path)
    with pytest.raises(analysis.ResultsError) as err:
        analysis.load(path)
    assert str(err.value) == f"{path}: malformed results file (variable 'kl' missing)"
    assert isinstance(err.value, ValueError)


# ---------------------------------------------------------------------------------------- plots
def _check_title(fig: Figure, ds: xr.Dataset, metric: str = "kl") -> None:
    title = fig.get_suptitle()
    for part in (metric, ds.attrs["model_name"], f"mode={ds.attrs['mode']}", f"direction={ds.attrs['direction']}"):
        assert part in title


def test_plots_basic(tmp_path, planted: xr.Dataset) -> None:
    figs = {
        "means": plots.plot_layer_means(planted, "kl", n_resamples=NR),
        "heat": plots.plot_pair_heatmap(planted, "kl"),
        "heat_cluster": plots.plot_pair_heatmap(planted, "kl", order="cluster"),
        "crit": plots.plot_critical_layers(planted, "kl", n_resamples=NR),
        "sim": plots.plot_layer_similarity(planted, "kl"),
        "cmp": plots.plot_comparison(planted, make_results(30, 8), "kl", n_resamples=NR),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure)
        _check_title(fig, planted)
        assert fig.axes[0].get_xlabel() == "layer", name
        paths = plots.save_figure(fig, tmp_path / name)
        assert [p.suffix for p in paths] == [".png", ".svg"]
        assert all(p.stat().st_size > 1000 for p in paths)
        assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figs["means"].axes[0].get_ylabel() == "kl (nats)"
    assert figs["heat"].axes[0].get_ylabel() == "pair"
    assert "ordered by reasoning_steps" in figs["heat"].get_suptitle()
    assert "clustered" in figs["heat_cluster"].get_suptitle()
    assert figs["crit"].axes[0].get_ylabel() == "kl (nats)"
    # bars: the planted layer comes first
    assert figs["crit"].axes[0].get_xticklabels()[0].get_text() == "3"
    assert figs["sim"].axes[0].get_ylabel() == "layer"
    assert figs["cmp"].axes[1].get_ylabel() == "Δ kl (nats)"
    flip = plots.plot_layer_means(planted, "flipped", n_resamples=NR)
    assert flip.axes[0].get_ylabel() == "flipped (share of pairs)"
    rec = plots.plot_layer_means(planted, "recovery", n_resamples=NR)
    assert rec.axes[0].get_ylabel() == "recovery (share of the gap)"


def test_plots_extra_dims(tmp_path, grid: xr.Dataset) -> None:
    comp = plots.plot_components(grid, "kl", n_resamples=50)
    _check_title(comp, grid)
    assert len(comp.axes) == 3  # one panel per position
    assert [ax.get_title() for ax in comp.axes] == ["thought 0", "thought 1", "thought 2"]
    # shared y axis: the panel of a weak position is drawn on the same scale as the strong one
    assert len({ax.get_ylim() for ax in comp.axes}) == 1
    legend = comp.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["resid", "attn", "mlp"]
    pos = plots.plot_position_heatmap(grid, "kl", max_pairs=3)
    _check_title(pos, grid)
    assert pos.axes[0].get_title() == "mean over pairs"
    assert pos.axes[0].get_xlabel() == "layer"
    assert pos.axes[0].get_ylabel() == "continuous thought"
    assert "mean over component" in pos.get_suptitle()
    heat = plots.plot_pair_heatmap(grid, "kl")
    assert "mean over position, component" in heat.get_suptitle()
    crit = plots.plot_critical_layers(grid, "kl", k=2, n_resamples=50)
    assert sum(ax.has_data() for ax in crit.axes) == 9
    for name, fig in {"comp": comp, "pos": pos, "crit": crit}.items():
        for p in plots.save_figure(fig, tmp_path / name, formats=("png",)):
            assert p.stat().st_size > 1000
    with pytest.raises(analysis.ResultsError):
        plots.plot_position_heatmap(make_results(5, 3), "kl")
    with pytest.raises(analysis.ResultsError):
        plots.plot_components(make_results(5, 3), "kl")


# ------------------------------------------------------------------------------ schema 1 and 2
def test_load_schema1_renames_to_schema2(tmp_path) -> None:
    new = make_results(12, 3, effect_layer=1, n_equal=2, mode="no-feedback")
    path = tmp_path / "old.nc"
    to_schema1(new).to_netcdf(path)
    ds = analysis.load(path)
    for old in ("clean_predicted", "corrupted_predicted", "clean_correct", "corrupted_correct", "target_logit_diff"):
        assert old not in ds.variables
    for name in ("clean_prompted_answer", "corrupted_prompted_answer", "clean_prompted_correct",
                 "corrupted_prompted_correct", "source_logit_diff"):  # fmt: skip
        np.testing.assert_array_equal(ds[name].values, new[name].values)
    assert ds.attrs["mode"] == "block-all-feedback"  # was "frozen" in the file
    assert ds.attrs["schema_read_from"] == "codi-nnsight/results/1"
    assert ds["comparable"].values.tolist() == [1.0] * 10 + [0.0] * 2
    # the log-prob difference is derived from the stored log-probabilities
    np.testing.assert_allclose(ds["logprob_diff"].values, new["logprob_diff"].values, equal_nan=True)
    a = analysis.recovery_ratio(ds, "logprob", n_boot=200)
    b = analysis.recovery_ratio(new, "logprob", n_boot=200)
    np.testing.assert_allclose(a["ratio"].values, b["ratio"].values)
    assert a["n"].values.tolist() == [10, 10, 10]


def test_validate_upgrades_in_memory_schema1() -> None:
    old = to_schema1(make_results(6, 2))
    old.attrs["mode"] = "frozen"
    ds = analysis.validate(old)
    assert ds.attrs["mode"] == "block-all-feedback" and "source_logit_diff" in ds
    assert "target_logit_diff" in old and old.attrs["mode"] == "frozen"  # the input is not changed


def test_load_unknown_schema_version(tmp_path, planted: xr.Dataset) -> None:
    path = tmp_path / "future.nc"
    other = planted.copy()
    other.attrs = {**planted.attrs, "codi_nnsight_schema": "codi-nnsight/results/999"}
    other.to_netcdf(path)
    with pytest.raises(analysis.ResultsError) as err:
        analysis.load(path)
    assert str(err.value) == (
        f"{path}: unsupported results schema 'codi-nnsight/results/999' (this codi-nnsight reads "
        "codi-nnsight/results/1, codi-nnsight/results/2; a newer codi-nnsight may read it)"
    )
    assert "\n" not in str(err.value)


def test_load_duplicate_pair_ids(tmp_path) -> None:
    ds = make_results(5, 2)
    ds = ds.assign_coords(pair=np.array([100, 101, 101, 103, 100], dtype=np.int64))
    path = tmp_path / "dup.nc"
    ds.to_netcdf(path)
    with pytest.raises(analysis.ResultsError) as err:
        analysis.load(path)
    assert str(err.value) == f"{path}: malformed results file (duplicate pair ids: 100, 101)"


@pytest.mark.parametrize("name", ["pairs.json", "pairs.jsonl", "results.nc"])
def test_load_pairs_file_is_named(tmp_path, name: str) -> None:
    records = [{"pair_id": 0, "variant": v, "question": "q", "answer": 3} for v in ("clean", "corrupted")]
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records, indent=2))
    with pytest.raises(analysis.ResultsError) as err:
        analysis.load(path)
    assert str(err.value).startswith(f"{path}: looks like a pairs file, not a results file")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(analysis.ResultsError, match="is a JSON file, not a results file"):
        analysis.load(tmp_path / "other.json")


def test_all_nan_metric_is_reported() -> None:
    ds = make_results(6, 3, n_same_first_token=6)  # every pair: answers share their first token
    with pytest.raises(analysis.ResultsError) as err:
        analysis.validate(ds, "r.nc", required=("logit_diff",))
    assert str(err.value).startswith("r.nc: metric 'logit_diff' is NaN for every pair and layer (undefined when")
    assert "try --metric logprob_diff" in str(err.value)
    analysis.validate(ds, "r.nc", required=("logprob_diff",))  # defined: no error


def test_answer_cannot_be_summarised(planted: xr.Dataset) -> None:
    for fn in (analysis.layer_summary, analysis.layer_tests, analysis.critical_layers):
        with pytest.raises(analysis.ResultsError, match="metric 'answer' cannot be summarised"):
            fn(planted, "answer")


# ------------------------------------------------------------------------------ recovery ratio
def _hand_recovery() -> xr.Dataset:
    ds = make_results(5, 2, n_equal=1).copy(deep=True)
    ds["baseline_logit_diff"].values[:] = [0.0, 1.0, -1.0, 0.0, 0.0]
    ds["source_logit_diff"].values[:] = [2.0, 3.0, 3.0, 0.1, 4.0]
    ds["logit_diff"].values[:] = np.array([[1.0, 2.0], [2.0, np.nan], [1.0, 3.0], [0.09, 0.1], [2.0, 4.0]])
    # per-pair recovery as the producer writes it: NaN where |S - B| < 0.5 or answers are equal
    ds["recovery"].values[:] = np.array([[0.5, 1.0], [0.5, np.nan], [0.5, 1.0], [np.nan, np.nan], [np.nan, np.nan]])
    return ds


def test_recovery_ratio_by_hand() -> None:
    ds = _hand_recovery()
    rec = analysis.recovery_ratio(ds, "logit", n_boot=500, seed=1)
    assert rec["ratio"].dims == ("layer",)
    # layer 0: pairs 0-3 (pair 4 has equal answers): sum(P - B) / sum(S - B) = 4.09 / 8.1
    assert rec["ratio"].sel(layer=0).item() == pytest.approx(4.09 / 8.1)
    # not the mean of per-pair recoveries, which would be (0.5 + 0.5 + 0.5 + 0.9) / 4 = 0.6
    assert rec["ratio"].sel(layer=0).item() != pytest.approx(0.6)
    assert rec["mean_patched_minus_baseline"].sel(layer=0).item() == pytest.approx(4.09 / 4)
    assert rec["mean_source_minus_baseline"].sel(layer=0).item() == pytest.approx(8.1 / 4)
    # layer 1: pair 1 has no value; the others recover exactly 1, so the paired CI is exactly [1, 1]
    assert rec["ratio"].sel(layer=1).item() == pytest.approx(1.0)
    assert rec["ci_low"].sel(layer=1).item() == pytest.approx(1.0)
    assert rec["ci_high"].sel(layer=1).item() == pytest.approx(1.0)
    assert rec["n"].values.tolist() == [4, 3]
    assert rec["n_left_out"].values.tolist() == [1, 2]
    assert rec["n_not_comparable"].values.tolist() == [1, 1]
    assert rec["n_recovery_nan"].values.tolist() == [2, 3]
    # the CI of layer 0 is a bootstrap over pairs, numerator and denominator resampled together
    num, den = np.array([1.0, 1.0, 2.0, 0.09]), np.array([2.0, 2.0, 4.0, 0.1])
    pick = np.random.default_rng(1).integers(0, 4, size=(500, 4))
    lo, hi = np.quantile(num[pick].mean(axis=1) / den[pick].mean(axis=1), [0.025, 0.975])
    assert rec["ci_low"].sel(layer=0).item() == pytest.approx(lo)
    assert rec["ci_high"].sel(layer=0).item() == pytest.approx(hi)
    assert lo < 4.09 / 8.1 < hi


def test_recovery_ratio_extra_dims_and_errors(grid: xr.Dataset) -> None:
    rec = analysis.recovery_ratio(grid, "logprob", n_boot=100)
    assert set(rec["ratio"].dims) == {"layer", "position", "component"}
    p = grid["logprob_diff"].sel(layer=2, position=1, component="attn").values
    b, s = grid["baseline_logprob_diff"].values, grid["source_logprob_diff"].values
    expected = np.mean(p - b) / np.mean(s - b)
    assert rec["ratio"].sel(layer=2, position=1, component="attn").item() == pytest.approx(expected)
    with pytest.raises(analysis.ResultsError, match="'logit' or 'logprob'"):
        analysis.recovery_ratio(grid, "prob")
    with pytest.raises(analysis.ResultsError, match="source_logit_diff not in results"):
        analysis.recovery_ratio(grid.drop_vars("source_logit_diff"))


# ------------------------------------------------------------------------------ excluded pairs
def test_excluded_pairs_and_flip_summaries() -> None:
    ds = make_results(10, 3, effect_layer=1, n_equal=3)
    info = analysis.excluded_pairs(ds)
    assert info["count"] == 3 and info["total"] == 10 and info["pair_ids"] == [107, 108, 109]
    assert info["message"] == (
        "3 pairs of 10 excluded from flip and recovery summaries (their clean and corrupted answers are "
        "equal, so there is no flip or recovery to measure): pair ids 107, 108, 109"
    )
    one = make_results(10, 3, n_equal=1)
    assert analysis.excluded_pairs(one)["message"].startswith("1 pair of 10 excluded")
    assert analysis.excluded_pairs(make_results(10, 3)) == {
        "count": 0, "total": 10, "pair_ids": [], "reason": info["reason"], "message": "",
    }  # fmt: skip
    # a schema-1 style file where the equal-answer pairs still have flipped = 1: counted out anyway
    ds2 = ds.copy(deep=True)
    ds2["flipped"].values[7:] = 1.0
    for d in (ds, ds2):
        s = analysis.layer_summary(d, "flipped", n_resamples=50)
        assert s["n"].values.tolist() == [7, 7, 7]
        np.testing.assert_allclose(s["mean"].values, ds["flipped"].values[:7].mean(axis=0))
    # kl is not a comparison metric: every pair counts
    assert analysis.layer_summary(ds2, "kl", n_resamples=50)["n"].values.tolist() == [10, 10, 10]
    # NaN flipped alone (no comparable variable) also marks a pair as having nothing to measure
    assert analysis.excluded_pairs(ds.drop_vars("comparable"))["count"] == 3


# ------------------------------------------------------------------------- honesty of "significant"
def test_two_layers_are_never_significant() -> None:
    ds = make_results(30, 2, effect_layer=1, effect=2.0)
    c = analysis.critical_layers(ds, "kl", k=2, n_resamples=50)
    assert c["p_adj"].sel(rank=1).item() < 1e-5  # the test alone would call it significant
    assert not c["testable"].any() and not c["significant"].any()


def test_too_few_pairs_are_never_significant() -> None:
    ds = make_results(4, 6, effect_layer=2, effect=2.0)  # smallest possible p = 1/16 > 0.05
    c = analysis.critical_layers(ds, "kl", k=2, n_resamples=50)
    assert not c["testable"].any() and not c["significant"].any()
    c5 = analysis.critical_layers(make_results(5, 6, effect_layer=2, effect=2.0), "kl", k=2, n_resamples=50)
    assert c5["testable"].all()  # 1/32 < 0.05: a test is possible


def test_negligible_effect_is_flagged() -> None:
    ds = make_results(30, 6, effect_layer=2).copy(deep=True)
    ds["kl"].values[:] = ds["kl"].values * 1e-3  # planted excess 0.4 mnats < 1e-3 nats threshold
    c = analysis.critical_layers(ds, "kl", k=2, n_resamples=50)
    assert int(c["layer"].sel(rank=1)) == 2 and bool(c["significant"].sel(rank=1))
    assert bool(c["negligible"].sel(rank=1))
    assert c.attrs["negligible_threshold"] == analysis.NEGLIGIBLE["kl"][0] == 1e-3
    big = analysis.critical_layers(make_results(30, 6, effect_layer=2), "kl", k=1, n_resamples=50)
    assert not bool(big["negligible"].sel(rank=1))


def test_critical_chart_does_not_blow_up_negligible_effects() -> None:
    ds = make_results(30, 6, effect_layer=2).copy(deep=True)
    ds["kl"].values[:] = ds["kl"].values * 1e-3
    fig = plots.plot_critical_layers(ds, "kl", k=3, n_resamples=50)
    lo, hi = fig.axes[0].get_ylim()
    assert hi - lo >= 10 * 1e-3  # at least 10x the negligible threshold
    tallest = max(p.get_height() for p in fig.axes[0].patches)
    assert tallest < 0.1 * (hi - lo)
    # a real effect fills the axis as before
    fig = plots.plot_critical_layers(make_results(30, 6, effect_layer=2), "kl", k=3, n_resamples=50)
    lo, hi = fig.axes[0].get_ylim()
    assert max(p.get_height() for p in fig.axes[0].patches) > 0.6 * (hi - lo)


def test_critical_chart_panels_share_y(grid: xr.Dataset) -> None:
    fig = plots.plot_critical_layers(grid, "kl", k=2, n_resamples=50)
    used = [ax for ax in fig.axes if ax.has_data()]
    assert len(used) == 9 and len({ax.get_ylim() for ax in used}) == 1
    free = plots.plot_critical_layers(grid, "kl", k=2, n_resamples=50, sharey=False)
    assert len({ax.get_ylim() for ax in free.axes if ax.has_data()}) > 1


def test_latent_component_is_not_layer_0() -> None:
    ds = make_results(12, 1, components=["latent"])
    ds.attrs["component"] = "latent"
    fig = plots.plot_layer_means(ds, "kl", n_resamples=50)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["latent input embedding"]
    assert fig.axes[0].get_xlabel() == "patched site"
    crit = plots.plot_critical_layers(ds, "kl", n_resamples=50)
    assert [t.get_text() for t in crit.axes[0].get_xticklabels()] == ["latent input"]
