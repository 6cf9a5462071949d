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
    rest = md[m.end():]
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
    for name in ("layer_summary_kl.csv", "layer_summary_logit_diff.csv",
                 "layer_summary_recovery.csv", "layer_summary_flipped.csv",
                 "critical_layers.csv", "by_reasoning_steps.csv", "report.html"):
        assert (out / name).stat().st_size > 0, name
    for stem in ("layer_means_kl", "pair_heatmap_kl", "critical_layers_kl",
                 "layer_similarity_kl"):
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
        assert float(r["mean"]) == pytest.approx(
            flipped.sel(layer=int(r["layer"])).mean().item(), rel=5e-4)


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
    assert "flipped to the clean answer" in text
    flipped3 = xr.open_dataset(nc)["flipped"].sel(layer=3).values
    assert f"{100 * flipped3.mean():.4g}% of pairs ({int(flipped3.sum())} of 24" in text


def test_provenance_sanity_steps(planted_report) -> None:
    nc, md_path, md = planted_report
    attrs = xr.open_dataset(nc).attrs
    prov = {r["attribute"]: r["value"] for r in _tables(_section(md, "Provenance"))[0]}
    for key in ("model_name", "mode", "direction", "component", "positions", "dtype", "device",
                "version_torch", "pairs_file", "pairs_sha256", "checkpoint_sha256",
                "start_time", "end_time"):
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
    assert "src=\"figures/" not in html and "http" not in html.split("<body>")[1]
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) == 6
    assert base64.b64decode(uris[0])[:4] == b"\x89PNG"
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
    assert "peaks at layer 1 (position = 0, component = resid)" in md
    kl_rows = _tables(_section(md, "Per-layer table"))[0]
    assert len(kl_rows) == 4 * 2 * 2
    r = next(r for r in kl_rows if (r["layer"], r["position"], r["component"]) == ("2", "1",
                                                                                    "attn"))
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
