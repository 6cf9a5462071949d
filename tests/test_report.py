"""Tests for codi_nnsight.analysis.report: numbers in report.md must match a recomputation."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from analysis_fixtures import make_results

from codi_nnsight import analysis
from codi_nnsight.analysis.report import fmt, fmt_ci

NR = 300


def _section(md: str, title: str) -> str:
    """Text of the section headed ``title`` (with its subsections), up to the next heading of
    the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(title)}\n", md, flags=re.MULTILINE)
    assert m, title
    rest = md[m.end() :]
    end = re.search(rf"^#{{1,{len(m.group(1))}}} ", rest, flags=re.MULTILINE)
    return rest[: end.start()] if end else rest


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Parse every pipe table in ``text`` into a list of row dicts."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif cur:
            header, rows = cur[0], cur[2:]
            tables.append([dict(zip(header, r, strict=True)) for r in rows])
            cur = []
    return tables


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory) -> tuple[Path, Path, str]:
    out = tmp_path_factory.mktemp("report")
    nc = out / "results.nc"
    make_results(24, 6, effect_layer=3).to_netcdf(nc)
    md = analysis.write_report(analysis.load(nc), out / "rep", n_resamples=NR)
    return nc, md, md.read_text()


def test_report_files(planted_report) -> None:
    _, md, _ = planted_report
    out = md.parent
    assert md.name == "report.md"
    for name in (
        "layer_summary_kl.csv",
        "layer_summary_logit_diff.csv",
        "layer_summary_recovery.csv",
        "layer_summary_flipped.csv",
        "recovery_logit.csv",
        "recovery_logprob.csv",
        "critical_layers.csv",
        "by_reasoning_steps.csv",
        "report.html",
    ):
        assert (out / name).stat().st_size > 0, name
    for stem in ("layer_means_kl", "pair_heatmap_kl", "critical_layers_kl", "layer_similarity_kl"):
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    assert not (out / "figures" / "position_heatmap_kl.png").exists()


def test_per_layer_table_matches_netcdf(planted_report) -> None:
    nc, _, md = planted_report
    with xr.open_dataset(nc) as raw:  # plain xarray, independent of analysis.load
        kl = raw["kl"].load()
        flipped = raw["flipped"].load()
    rows = _tables(_section(md, "Per-layer table"))
    assert len(rows) == 2  # kl, then flipped
    kl_rows, flip_rows = rows
    assert [r["layer"] for r in kl_rows] == [str(v) for v in kl["layer"].values]
    summ = analysis.layer_summary(analysis.load(nc), "kl", n_resamples=NR)
    for r in kl_rows:
        x = kl.sel(layer=int(r["layer"])).values
        assert r["mean"] == fmt(np.mean(x))
        assert float(r["mean"]) == pytest.approx(np.mean(x), rel=5e-4)
        assert r["median"] == fmt(np.median(x))
        assert r["n"] == str(np.isfinite(x).sum())
        s = summ.sel(layer=int(r["layer"]))
        assert r["95% CI"] == fmt_ci(s["ci_low"].item(), s["ci_high"].item())
    for r in flip_rows:
        assert float(r["mean"]) == pytest.approx(flipped.sel(layer=int(r["layer"])).mean().item(), rel=5e-4)


def test_critical_and_narrative(planted_report) -> None:
    nc, _, md = planted_report
    (crit,) = _tables(_section(md, "Critical layers"))
    assert crit[0]["rank"] == "1" and crit[0]["layer"] == "3"
    assert crit[0]["significant"] == "yes"
    assert all(r["significant"] == "no" for r in crit[1:])
    kl3 = xr.open_dataset(nc)["kl"].sel(layer=3).values
    text = _section(md, "What the numbers say")
    assert "The effect peaks at layer 3" in text
    assert f"mean KL {fmt(kl3.mean())} nats" in text
    assert f"BH-adjusted p = {crit[0]['p (BH)']}" in text
    assert "n = 24 pairs" in text
    assert "the corrupted run gave the clean question's answer for" in text
    flipped3 = xr.open_dataset(nc)["flipped"].sel(layer=3).values
    assert f"{100 * flipped3.mean():.4g}% of comparable pairs ({int(flipped3.sum())} of 24" in text


def test_provenance_sanity_steps(planted_report) -> None:
    nc, md_path, md = planted_report
    attrs = xr.open_dataset(nc).attrs
    prov = {r["attribute"]: r["value"] for r in _tables(_section(md, "Provenance"))[0]}
    for key in (
        "model_name",
        "mode",
        "direction",
        "component",
        "positions",
        "dtype",
        "device",
        "version_torch",
        "pairs_file",
        "pairs_sha256",
        "checkpoint_sha256",
        "start_time",
        "end_time",
    ):
        assert prov[key] == str(attrs[key])
    assert prov["command"] == f"`{attrs['command']}`"
    assert "Overall: **PASS**" in _section(md, "Sanity checks")
    (steps,) = _tables(_section(md, "Per-reasoning-steps breakdown"))
    raw = xr.open_dataset(nc)
    counts = raw["reasoning_steps"].to_series().value_counts()
    for r in steps:
        s = int(r["reasoning_steps"])
        assert int(r["pairs"]) == counts[s]
        sub = raw["kl"].where(raw["reasoning_steps"] == s, drop=True).mean("pair")
        assert r["peak layer"] == str(int(sub.argmax("layer")))
        assert r["mean"] == fmt(sub.max().item())
    csv = pd.read_csv(md_path.parent / "layer_summary_kl.csv", index_col="layer")
    np.testing.assert_allclose(csv["mean"].values, raw["kl"].mean("pair").values)


def test_html_is_self_contained(planted_report) -> None:
    _, md, _ = planted_report
    html = (md.parent / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert 'src="figures/' not in html and "http" not in html.split("<body>")[1]
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    # the finding figure, then recovery (logit, logprob), flipped, heatmap, critical layers, similarity
    assert len(uris) == 7
    # Every image loads: each inline PNG decodes to a picture with pixels (what a browser would draw;
    # a real headless browser is not part of CI).
    import io

    import matplotlib.image as mpimg

    for uri in uris:
        raw = base64.b64decode(uri)
        assert raw[:4] == b"\x89PNG"
        img = mpimg.imread(io.BytesIO(raw), format="png")
        assert img.shape[0] > 100 and img.shape[1] > 100 and float(img.std()) > 0
    assert "<h2>What the numbers say</h2>" in html


def test_flat_and_failed_sanity(tmp_path) -> None:
    ds = make_results(12, 5, seed=2)
    ds.attrs["sanity_passed"] = 0
    md = analysis.write_report(ds, tmp_path, n_resamples=NR, formats=("png",)).read_text()
    assert "No layer stands out significantly" in md
    assert "Overall: **FAIL**" in md
    assert "sanity checks FAILED" in md
    assert not list((tmp_path / "figures").glob("*.svg"))


def test_report_with_position_and_component(tmp_path) -> None:
    ds = make_results(12, 4, effect_layer=1, positions=2, components=["resid", "attn"])
    md = analysis.write_report(ds, tmp_path, n_resamples=50, formats=("png",)).read_text()
    for stem in ("position_heatmap_kl", "components_kl", "layer_means_kl"):
        assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 1000
    assert "peaks at layer 1 (thought 0, resid)" in md
    kl_rows = _tables(_section(md, "Per-layer table"))[0]
    assert len(kl_rows) == 4 * 2 * 2
    r = next(r for r in kl_rows if (r["layer"], r["position"], r["component"]) == ("2", "1", "attn"))
    assert r["mean"] == fmt(ds["kl"].sel(layer=2, position=1, component="attn").mean().item())
    crit = pd.read_csv(tmp_path / "critical_layers.csv")
    assert set(crit.columns) >= {"rank", "position", "component", "layer", "p_adj"}


def test_format_layer_table() -> None:
    ds = make_results(10, 4, effect_layer=2)
    text = analysis.format_layer_table(ds, "kl", n_resamples=NR)
    lines = text.splitlines()
    assert "zen-E/CODI-gpt2" in lines[0] and "kl (nats)" in lines[0]
    assert lines[1].split() == ["layer", "mean", "95%", "CI", "median", "n", "p", "(BH)"]
    assert len(lines) == 3 + 4
    for line, layer in zip(lines[3:], range(4), strict=True):
        cells = line.split()
        assert cells[0] == str(layer)
        assert cells[1] == fmt(ds["kl"].sel(layer=layer).mean().item())


# ------------------------------------------------------------------------------ schema 2 report
def _report(tmp_path: Path, ds: xr.Dataset, **kw) -> str:
    return analysis.write_report(ds, tmp_path, n_resamples=100, formats=("png",), **kw).read_text()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_narrative_is_right_for_both_directions(tmp_path, direction: str) -> None:
    ds = make_results(24, 6, effect_layer=3, direction=direction, n_equal=2, n_same_first_token=1)
    md = _report(tmp_path, ds)
    text = _section(md, "What the numbers say")
    flips = ds["flipped"].sel(layer=3).values[:22]  # the last 2 pairs have equal answers
    counted = f"{100 * flips.mean():.4g}% of comparable pairs ({int(flips.sum())} of 22;"
    rec = analysis.recovery_ratio(ds, "logit", n_boot=100)["ratio"].sel(layer=3).item()
    assert 0.6 < rec < 1.0  # the planted effect moves the run most of the way to the source
    if direction == "denoise":
        assert f"the corrupted run gave the clean question's answer for {counted}" in text
        assert f"into the corrupted run restores {fmt(rec)} (95% CI" in text
        assert "1 = clean behaviour fully restored, 0 = no change" in text
        wrong = ("corrupted activations", "broke", "fully broken", "clean run gave")
    else:
        assert f"the clean run gave the corrupted question's answer (the patch broke it) for {counted}" in text
        assert f"into the clean run moves it {fmt(rec)} (95% CI" in text
        assert "1 = the clean run fully takes on the corrupted behaviour, i.e. it is fully broken" in text
        wrong = ("clean activations", "restores", "restored", "corrupted run gave")
    for phrase in wrong:
        assert phrase not in text, phrase
    assert "over 21 pairs" in text
    assert "3 pairs were left out: 2 with equal clean and corrupted answers; 1 where the two answers start" in text
    assert "The per-pair recovery is undefined (NaN) for 3 pairs" in text
    measured = _section(md, "What was patched and measured")
    assert analysis.report.DIRECTION_TEXT[direction] in measured
    assert "Pairs counted out of flip and recovery summaries: 2 of 24 (their clean and corrupted answers" in measured
    (logit, _) = _tables(_section(md, "Recovery"))
    row = next(r for r in logit if r["layer"] == "3")
    assert row["recovery (ratio of means)"] == fmt(rec) and row["pairs used"] == "21" and row["left out"] == "3"


@pytest.mark.parametrize("mode", ["recurrent", "no-feedback", "block-all-feedback"])
def test_mode_is_explained(tmp_path, mode: str) -> None:
    md = _report(tmp_path, make_results(8, 3, mode=mode))
    measured = _section(md, "What was patched and measured")
    # a file written under the old name is described under the new one
    assert analysis.report.MODE_TEXT[{"no-feedback": "block-all-feedback"}.get(mode, mode)] in measured
    if mode == "recurrent":
        assert "total effect through the loop" in measured
    else:
        assert "held at their unpatched (baseline) values" in measured and "not a pure direct effect" in measured
    assert "frozen" not in md


def test_finding_first_provenance_last(planted_report) -> None:
    _, _, md = planted_report
    blocks = md.split("\n\n")
    assert blocks[0].startswith("# codi-nnsight report")
    kl = xr.open_dataset(planted_report[0])["kl"]
    # the planted effect is at layer 3 only: the finding is its onset, its fall, and a real peak
    assert blocks[1].startswith(
        f"**Finding:** The effect appears between layers 2 and 3: mean KL goes from "
        f"{fmt(kl.sel(layer=2).mean().item())} to {fmt(kl.sel(layer=3).mean().item())} nats (paired difference "
    )
    assert (
        f"and it is large only at layer 3: at layer 4 it falls back to {fmt(kl.sel(layer=4).mean().item())}"
        in blocks[1]
    )
    assert "stands out from its neighbours: the CIs do not overlap" in blocks[1]
    assert "clearly" not in md
    assert blocks[2] == "![Mean kl by layer with 95% bootstrap CI](figures/layer_means_kl.png)"
    headings = re.findall(r"^## (.+)$", md, flags=re.MULTILINE)
    assert headings[0] == "What the numbers say" and headings[-1] == "Provenance"
    assert md.index("Model configuration:") > md.index("## Provenance")
    assert md.count("figures/layer_means_kl.png") == 1  # the finding's figure is not repeated


def test_each_sanity_check_listed_once(planted_report) -> None:
    _, _, md = planted_report
    (rows,) = _tables(_section(md, "Sanity checks"))
    assert [r["check"] for r in rows] == [
        "self-patch max KL, nats (should be ≈ 0)",
        "minimum KL over the sweep, nats (should be ≥ 0)",
        "full-patch max \\|Δ logit\\|, logits (should be ≈ 0)",
    ]
    assert [r["value"] for r in rows] == ["1.2e-07", "0.013", "3.1e-06"]
    assert [r["threshold"] for r in rows] == ["1e-06", "-1e-07", "0.0001"]
    assert all(r["status"] == "PASS" for r in rows)


def test_units_in_words(planted_report) -> None:
    _, _, md = planted_report
    assert "(1)" not in md and "dimensionless" not in md
    assert "`flipped` (share of comparable pairs, 0 to 1)." in md
    assert "`kl` (nats), mean over pairs" in md


def test_negligible_effect_is_not_sold_as_a_finding(tmp_path) -> None:
    ds = make_results(30, 6, effect_layer=2).copy(deep=True)
    ds["kl"].values[:] = ds["kl"].values * 1e-3  # all below the 0.001-nats threshold
    md = _report(tmp_path, ds)
    top = ds["kl"].sel(layer=2).mean().item()
    assert (
        f"**Finding:** No patched site has a meaningful effect: the largest mean KL {fmt(top)} nats, at layer 2, "
        "is below the negligible threshold of 0.001 nats." in md
    )
    text = _section(md, "What the numbers say")
    assert "significantly above the other layers" in text  # the test does detect it ...
    assert "below the negligible threshold of 0.001 nats" in text and "real but negligible" in text  # ... but
    assert "clearly stands out" not in md
    (crit,) = _tables(_section(md, "Critical layers"))
    assert crit[0]["significant"] == "yes" and crit[0]["negligible"] == "yes"


def test_two_layers_and_plurals(tmp_path) -> None:
    md = _report(tmp_path, make_results(20, 2, effect_layer=1, effect=2.0, n_equal=1))
    text = _section(md, "What the numbers say")
    assert "only 2 layers have values here, so whether one stands out from the others cannot be tested" in text
    assert "significant" not in text and "clearly stands out" not in md
    assert "this run cannot show whether it stands out from the other layers" in md.split("## What the numbers")[0]
    assert "The other layer, layer 0, has mean" in text
    assert "1 pair was left out: 1 with equal clean and corrupted answers." in text
    (crit,) = _tables(_section(md, "Critical layers"))
    assert [r["significant"] for r in crit] == ["untestable", "untestable"]
    one = _report(tmp_path / "one", make_results(12, 1))
    assert "12 pairs (12 with different clean and corrupted answers), 1 layer, mode" in one
    assert "only 1 layer has values here" in one


def test_latent_component_is_not_called_layer_0(tmp_path) -> None:
    ds = make_results(12, 1, components=["latent"])
    ds.attrs["component"] = "latent"
    md = _report(tmp_path, ds)
    assert "layer 0" not in md
    assert "at the latent input embedding (component = latent)" not in md
    assert "(latent)" in md or "the latent input embedding" in md
    assert "the latent input embedding (no layer)" in md
    (rows, *_) = _tables(_section(md, "Per-layer table"))
    assert [r["layer"] for r in rows] == ["latent input"]


def test_rewrite_leaves_no_stale_files_and_keeps_user_files(tmp_path) -> None:
    out = tmp_path / "rep"
    _report(out, make_results(12, 4, effect_layer=1, positions=2))
    assert (out / "figures" / "position_heatmap_kl.png").exists()
    (out / "notes.txt").write_text("mine")
    (out / "mine.csv").write_text("a,b\n")
    (out / "figures" / "my_plot.png").write_bytes(b"x")
    _report(out, make_results(12, 4, effect_layer=1), metric="l2")
    assert not (out / "figures" / "position_heatmap_kl.png").exists()
    assert not list((out / "figures").glob("*_kl.png")) and not (out / "layer_tests_kl.csv").exists()
    assert (out / "figures" / "layer_means_l2.png").exists() and (out / "layer_summary_l2.csv").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine.csv").exists()
    assert (out / "figures" / "my_plot.png").read_bytes() == b"x"
    assert "`mine.csv`" not in (out / "report.md").read_text()  # only the report's own tables are listed


def test_unsummarisable_and_all_nan_metrics_are_refused(tmp_path) -> None:
    with pytest.raises(analysis.ResultsError, match="metric 'answer' cannot be summarised"):
        analysis.write_report(make_results(6, 3), tmp_path / "a", metric="answer")
    assert not (tmp_path / "a").exists()  # refused before writing anything
    with pytest.raises(analysis.ResultsError, match="metric 'logit_diff' is NaN for every pair and layer"):
        analysis.write_report(make_results(6, 3, n_same_first_token=6), tmp_path / "b", metric="logit_diff")
    with pytest.raises(analysis.ResultsError, match="cannot be summarised"):
        analysis.format_layer_table(make_results(6, 3), "answer")


def _chromium() -> str | None:
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine (.ci/run installs it)")
def test_report_html_renders_in_a_real_browser_with_every_image_loaded(planted_report, tmp_path) -> None:
    import subprocess

    _, md, _ = planted_report
    html = (md.parent / "report.html").read_text()
    # A copy with a probe script: after load, the body records how many images the browser decoded.
    probe = (
        "<script>window.addEventListener('load', () => { const im = [...document.images];"
        " document.body.setAttribute('data-images', im.filter(i => i.complete && i.naturalWidth > 0).length"
        " + '/' + im.length); });</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    proc = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'data-images="(\d+)/(\d+)"', proc.stdout)
    assert found, proc.stderr[-2000:]
    loaded, total = map(int, found.groups())
    assert total == 7 and loaded == total
