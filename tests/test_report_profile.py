"""The report's finding is the profile over depth, proportions get exact intervals, and the
figures show what they claim (issues 31 and 30)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr
from analysis_fixtures import TOY_PROFILE, make_results, make_rising_results
from matplotlib.backends.backend_agg import FigureCanvasAgg
from scipy import stats as sps

from codi_nnsight import analysis
from codi_nnsight.analysis import plots, stats
from codi_nnsight.analysis.report import fmt, fmt_ci

NR = 300


def _finding(md: str) -> str:
    (line,) = [b for b in md.split("\n\n") if b.startswith("**Finding:**")]
    return line


@pytest.fixture(scope="module")
def rising(tmp_path_factory) -> tuple[xr.Dataset, str]:
    ds = make_rising_results()
    out = tmp_path_factory.mktemp("rising")
    return ds, analysis.write_report(ds, out, n_resamples=NR, formats=("png",)).read_text()


# --------------------------------------------------------------------------- adjacent layers
def test_adjacent_layers_match_an_independent_computation() -> None:
    ds = make_rising_results()
    adj = stats.adjacent_layers(ds, "kl", n_resamples=NR)
    kl = ds["kl"].transpose("pair", "layer").values
    assert adj["layer"].values.tolist() == list(range(1, len(TOY_PROFILE)))
    assert adj["layer_before"].values.tolist() == list(range(len(TOY_PROFILE) - 1))
    p = []
    for j in range(1, kl.shape[1]):
        d = kl[:, j] - kl[:, j - 1]
        a = adj.sel(layer=j)
        assert a["diff"].item() == pytest.approx(d.mean(), rel=1e-12)
        assert a["mean_before"].item() == pytest.approx(kl[:, j - 1].mean(), rel=1e-12)
        assert a["mean_after"].item() == pytest.approx(kl[:, j].mean(), rel=1e-12)
        assert a["effect_size"].item() == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-12)
        assert a["share_up"].item() == pytest.approx((d > 0).mean())
        assert a["p_value"].item() == pytest.approx(sps.wilcoxon(d).pvalue, rel=1e-12)
        assert a["ci_low"].item() < d.mean() < a["ci_high"].item()
        assert int(a["n"].item()) == kl.shape[0]
        p.append(sps.wilcoxon(d).pvalue)
    np.testing.assert_allclose(adj["p_adj"].values, sps.false_discovery_control(p), rtol=1e-12)
    one = stats.adjacent_layers(make_results(6, 1), "kl", n_resamples=NR)
    assert one.sizes["layer"] == 0
    grid = stats.adjacent_layers(make_results(8, 3, positions=2, components=["resid", "attn"]), "kl", n_resamples=20)
    assert dict(grid.sizes) == {"layer": 2, "position": 2, "component": 2}


# ------------------------------------------------------------------------------ the finding
def test_rising_curve_is_reported_as_onset_and_plateau_not_a_clear_peak(rising) -> None:
    ds, md = rising
    kl = ds["kl"].transpose("pair", "layer").values
    m = kl.mean(axis=0)
    finding = _finding(md)
    # what the old headline said, from a test of layer 7 against the mean of all the others
    assert "clearly stands out" not in md and "clearly" not in md
    onset = f"**Finding:** The effect appears between layers 1 and 2: mean KL goes from {fmt(m[1])} to {fmt(m[2])} nats"
    assert finding.startswith(onset)
    d = kl[:, 2] - kl[:, 1]
    assert f"paired difference +{d.mean():.4g} nats, 95% CI [" in finding
    assert f"d_z = {fmt(d.mean() / d.std(ddof=1))}, higher in 24 of 24 pairs, Wilcoxon p = " in finding
    assert (
        f"and then rises only slowly, a near-plateau: from layer 2 to layer 7 it goes from {fmt(m[2])} to "
        f"{fmt(m[7])} nats ({100 * m[2] / m[7]:.0f}%–100% of its largest mean), by at most "
        f"{fmt(np.abs(np.diff(m[2:])).max())} nats per layer" in finding
    )
    summ = analysis.layer_summary(ds, "kl", n_resamples=NR)
    lo6, hi6 = summ["ci_low"].sel(layer=6).item(), summ["ci_high"].sel(layer=6).item()
    lo7, hi7 = summ["ci_low"].sel(layer=7).item(), summ["ci_high"].sel(layer=7).item()
    assert lo7 <= hi6  # the planted top layers' CIs overlap ...
    assert finding.endswith(  # ... so the report does not call layer 7 a peak
        f"The largest mean is at layer 7 ({fmt(m[7])} nats, 95% CI {fmt_ci(lo7, hi7)}), but its CI overlaps that of "
        f"layer 6 ({fmt(m[6])} nats, {fmt_ci(lo6, hi6)}), so no single layer stands out as a peak."
    )
    text = md.split("## What the numbers say")[1].split("\n## ")[0]
    assert "The effect peaks at" not in text
    assert "every layer of a curve that rises and stays up passes that test, so it does not make layer 7 a peak" in text
    assert "7 of 7 steps are significant" in text


def test_adjacent_layers_table_in_the_report(rising) -> None:
    ds, md = rising
    section = md.split("## Adjacent layers\n")[1].split("\n## ")[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and "→" in r]
    assert len(rows) == 7
    adj = stats.adjacent_layers(ds, "kl", n_resamples=NR)
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    a = adj.sel(layer=2)
    assert cells == [
        "1 → 2",
        fmt(a["mean_before"].item()),
        fmt(a["mean_after"].item()),
        fmt(a["diff"].item()),
        fmt_ci(a["ci_low"].item(), a["ci_high"].item()),
        fmt(a["effect_size"].item()),
        "24 of 24",
        fmt(a["p_value"].item()),
        fmt(a["p_adj"].item()),
    ]
    critical = md.split("## Critical layers\n")[1]
    assert "so a significant layer here is not a peak" in critical


def test_a_real_peak_is_called_one(tmp_path) -> None:
    ds = make_results(24, 6, effect_layer=3)
    md = analysis.write_report(ds, tmp_path, n_resamples=NR, formats=("png",)).read_text()
    finding = _finding(md)
    assert "and it is large only at layer 3: at layer 4 it falls back to" in finding
    assert (
        "The largest mean, at layer 3 (" in finding
        and "stands out from its neighbours: the CIs do not overlap" in finding
    )


def test_flat_curve_is_not_given_a_profile(tmp_path) -> None:
    ds = make_results(30, 5, seed=4)
    md = analysis.write_report(ds, tmp_path, n_resamples=NR, formats=("png",)).read_text()
    finding = _finding(md)
    adj = stats.adjacent_layers(ds, "kl", n_resamples=NR)
    assert not (adj["p_adj"] < 0.05).any()  # the fixture has no effect anywhere
    m = ds["kl"].mean("pair").values
    assert finding == (
        f"**Finding:** Mean KL ranges from {fmt(m.min())} to {fmt(m.max())} nats across layers, but no difference "
        "between adjacent layers is significant (BH-adjusted α = 0.05), so this run does not locate the effect along "
        "depth."
    )
    assert "appears between" not in md and "peak" not in finding


# ------------------------------------------------------------------------- exact proportions
def test_proportions_get_exact_binomial_intervals(tmp_path) -> None:
    ds = make_results(24, 4, effect_layer=2).copy(deep=True)
    ds["flipped"].loc[{"layer": 2}] = 1.0  # 24 of 24 pairs flip
    ds["flipped"].loc[{"layer": 0}] = np.r_[np.ones(3), np.zeros(21)]
    summ = analysis.layer_summary(ds, "flipped", n_resamples=NR)
    lo, hi = summ["ci_low"].sel(layer=2).item(), summ["ci_high"].sel(layer=2).item()
    assert lo == pytest.approx(0.025 ** (1 / 24), rel=1e-9) and hi == 1.0  # Clopper–Pearson for 24/24: 85.8%–100%
    assert 0.85 < lo < 0.87
    ref = sps.binomtest(3, 24).proportion_ci(0.95, method="exact")
    assert summ["ci_low"].sel(layer=0).item() == pytest.approx(ref.low, rel=1e-12)
    assert summ["ci_high"].sel(layer=0).item() == pytest.approx(ref.high, rel=1e-12)
    assert summ.attrs["ci_method"] == "exact binomial (Clopper-Pearson)"
    assert analysis.layer_summary(ds, "kl", n_resamples=NR).attrs["ci_method"] == "bootstrap (BCa)"
    md = analysis.write_report(ds, tmp_path, n_resamples=NR, formats=("png",)).read_text()
    assert "100% of comparable pairs (24 of 24; 95% exact binomial CI 85.75%–100%)" in md
    assert "100%–100%" not in md
    flips = md.split("### Share of pairs flipped to the source answer")[1].split("\n## ")[0]
    assert f"| 2 | 1 | {fmt_ci(lo, 1.0)} | 1 | 24 |" in flips


# ----------------------------------------------------------------------------------- figures
def _drawn(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_recovery_ratio_title_is_not_clipped() -> None:
    ds = make_results(24, 8, effect_layer=3)
    fig = plots.plot_recovery_ratio(ds, "logit", n_boot=50)
    renderer = _drawn(fig)
    box = fig._suptitle.get_window_extent(renderer)  # the title as drawn
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1


def test_critical_layers_legend_hides_no_star_or_ci_bar() -> None:
    ds = make_rising_results()
    fig = plots.plot_critical_layers(ds, "kl", n_resamples=NR)
    renderer = _drawn(fig)
    (ax,) = fig.axes
    legend = fig.legends[0].get_window_extent(renderer) if fig.legends else ax.get_legend().get_window_extent(renderer)
    stars = [t for t in ax.texts if t.get_text() == "*"]
    assert len(stars) == 3
    marks = [t.get_window_extent(renderer) for t in stars]
    marks += [line.get_window_extent(renderer) for line in ax.lines]  # the CI bars and their caps
    assert marks and not any(legend.overlaps(b) for b in marks)
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)


def test_per_thought_report_leads_with_the_thought_that_moves(tmp_path) -> None:
    ds = make_results(16, 5, effect_layer=2, positions=4).copy(deep=True)
    kl = ds["kl"].transpose("pair", "layer", "position")
    rng = np.random.default_rng(3)
    values = rng.gamma(2.0, 0.002, kl.shape)  # every thought flat ...
    values[:, 2:, 2] += np.array([2.0, 2.3, 2.4])  # ... but thought 2, from layer 2 on
    ds["kl"] = kl.copy(data=values)
    md = analysis.write_report(ds, tmp_path, n_resamples=NR, formats=("png",)).read_text()
    blocks = md.split("\n\n")
    assert blocks[1].startswith("**Finding:** At thought 2, the effect appears between layers 1 and 2")
    other = values[:, :, [0, 1, 3]].mean(axis=0)
    assert blocks[1].endswith(f"At the other 3 thoughts the largest mean KL is {fmt(other.max())} nats") or (
        f"At the other 3 thoughts the largest mean KL is {fmt(other.max())} nats" in blocks[1]
    )
    assert re.fullmatch(
        r"!\[Mean kl by layer at thought 2, the thought with the largest effect.*\]"
        r"\(figures/layer_means_kl_thought_2\.png\)",
        blocks[2],
    )
    lead = plots.plot_layer_means(ds.sel(position=[2]), "kl", n_resamples=20)
    assert len(lead.axes) == 1  # one panel, not a grid of mostly flat ones
    figures = md.split("## Figures\n")[1]
    assert figures.index("figures/layer_means_kl.png") < figures.index("figures/recovery_ratio_logit.png")
    assert md.count("figures/layer_means_kl_thought_2.png") == 1
    assert (tmp_path / "figures" / "layer_means_kl_thought_2.png").stat().st_size > 1000
