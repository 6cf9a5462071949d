"""Tests for codi_nnsight.analysis statistics, loading and figures (synthetic Datasets)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import make_results
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
    part = analysis.compare(planted, base.isel(pair=slice(10, None), layer=slice(0, 5)),
                            "kl", n_resamples=NR)
    assert part.sizes["layer"] == 5 and (part["n"] == 20).all()
    other = base.assign_coords(pair=base["pair"] + 1000)
    with pytest.raises(analysis.ResultsError, match="no common pairs"):
        analysis.compare(planted, other, "kl")


# ------------------------------------------------------------------------------------- extra dims
def test_position_and_component_dims(grid: xr.Dataset) -> None:
    s = analysis.layer_summary(grid, "kl", n_resamples=NR)
    assert set(s["mean"].dims) == {"layer", "position", "component"}
    np.testing.assert_allclose(s["mean"].transpose(*grid["kl"].dims[1:]),
                               grid["kl"].mean("pair"))
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
    assert ds.attrs["codi_nnsight_schema"] == "codi-nnsight/results/1"
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
    assert str(err.value) == (
        f"{path}: not a codi-nnsight results file (attr codi_nnsight_schema missing)")
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
    for part in (metric, ds.attrs["model_name"], f"mode={ds.attrs['mode']}",
                 f"direction={ds.attrs['direction']}"):
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
    assert flip.axes[0].get_ylabel() == "flipped (dimensionless)"


def test_plots_extra_dims(tmp_path, grid: xr.Dataset) -> None:
    comp = plots.plot_components(grid, "kl", n_resamples=50)
    _check_title(comp, grid)
    assert len(comp.axes) == 3  # one panel per position
    assert comp.axes[0].get_title() == "position=0"
    legend = comp.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["resid", "attn", "mlp"]
    pos = plots.plot_position_heatmap(grid, "kl", max_pairs=3)
    _check_title(pos, grid)
    assert pos.axes[0].get_title() == "mean over pairs"
    assert pos.axes[0].get_xlabel() == "layer"
    assert pos.axes[0].get_ylabel() == "latent position"
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
