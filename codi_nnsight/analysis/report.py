"""Markdown/HTML report, CSV tables and figures for one results Dataset.

The report content is built once as a list of simple blocks (heading, paragraph, table, image,
code) and rendered to both Markdown and self-contained HTML, so the two never disagree.
All numbers are printed with :func:`fmt` (4 significant digits) so tests can recompute them.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import plots, stats
from .io import validate

SUMMARY_METRICS = ("kl", "logit_diff", "recovery", "flipped")
PROVENANCE_KEYS = (
    "model_name", "mode", "direction", "component", "positions", "dtype", "device", "seed",
    "version_codi_nnsight", "version_nnsight", "version_torch", "version_transformers",
    "pairs_file", "pairs_sha256", "checkpoint_sha256", "command", "start_time", "end_time",
    "codi_nnsight_schema",
)
METRIC_NAMES = {"kl": "KL", "l2": "L2", "logit_diff": "logit difference"}


def fmt(x: Any) -> str:
    """Format a number with 4 significant digits (integers unchanged, NaN as "NaN")."""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "NaN"
    return f"{x:.4g}"


def fmt_ci(lo: float, hi: float) -> str:
    """A CI as ``[lo, hi]`` with :func:`fmt` numbers."""
    return f"[{fmt(lo)}, {fmt(hi)}]"


def _pct(x: float) -> str:
    return "NaN" if not np.isfinite(x) else f"{100 * x:.4g}%"


# --------------------------------------------------------------------------------------------
# document model
# --------------------------------------------------------------------------------------------
@dataclass
class _Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def img(self, alt: str, rel: str) -> None:
        self.blocks.append(("img", (alt, rel)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = []
        for kind, val in self.blocks:
            if kind == "h":
                out.append(f"{'#' * val[0]} {val[1]}")
            elif kind == "p":
                out.append(val)
            elif kind == "table":
                header, rows = val

                def esc(c: str) -> str:
                    return c.replace("|", "\\|")

                lines = ["| " + " | ".join(map(esc, header)) + " |",
                         "|" + "|".join("---" for _ in header) + "|"]
                lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{val[0]}]({val[1]})")
            elif kind == "code":
                out.append(f"```\n{val}\n```")
        return "\n\n".join(out) + "\n"

    def html(self, base: Path, title: str) -> str:
        e = html.escape
        body = []
        for kind, val in self.blocks:
            if kind == "h":
                body.append(f"<h{val[0]}>{e(val[1])}</h{val[0]}>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(val)}</p>")
            elif kind == "table":
                header, rows = val
                th = "".join(f"<th>{e(c)}</th>" for c in header)
                trs = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r)
                              + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                body.append(f'<figure><img alt="{e(val[0])}" src="{_data_uri(base / val[1])}">'
                            f"<figcaption>{e(val[0])}</figcaption></figure>")
            elif kind == "code":
                body.append(f"<pre><code>{e(val)}</code></pre>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
                 "td,th{border:1px solid #999;padding:2px 8px;text-align:right}"
                 "th{background:#eee}img{max-width:100%}pre{background:#f4f4f4;padding:8px;"
                 "overflow-x:auto}figcaption{font-size:0.85em;color:#444}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{e(title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _inline_html(text: str) -> str:
    """Escape, then turn the only inline markdown we emit (**bold**, `code`) into HTML."""
    parts = html.escape(text).split("**")
    text = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _data_uri(path: Path) -> str:
    mime = {"png": "image/png", "svg": "image/svg+xml"}.get(path.suffix.lstrip("."), "")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def _iter_cells(obj: xr.Dataset, dims: Sequence[Hashable]) -> list[dict[Hashable, Any]]:
    return plots._combos(obj, list(dims))


def _summary_table(summ: xr.Dataset, ci: float) -> tuple[list[str], list[list[str]]]:
    extras = [d for d in summ.dims if d != "layer"]
    header = ["layer", *map(str, extras), "mean", f"{ci:.0%} CI", "median", "n"]
    rows = []
    for sel in _iter_cells(summ, ["layer", *extras]):
        s = summ.sel(sel)
        rows.append([str(sel[d]) for d in ["layer", *extras]] + [
            fmt(s["mean"].item()), fmt_ci(s["ci_low"].item(), s["ci_high"].item()),
            fmt(s["median"].item()), fmt(int(s["n"].item()))])
    return header, rows


def _critical_table(crit: xr.Dataset, ci: float) -> tuple[list[str], list[list[str]]]:
    extras = [d for d in crit.dims if d != "rank"]
    header = [*map(str, extras), "rank", "layer", "mean", f"{ci:.0%} CI", "n", "p",
              "p (BH)", "significant"]
    rows = []
    for sel in _iter_cells(crit, [*extras, "rank"]):
        c = crit.sel(sel)
        rows.append([str(sel[d]) for d in extras] + [
            str(sel["rank"]), str(int(c["layer"].item())), fmt(c["mean"].item()),
            fmt_ci(c["ci_low"].item(), c["ci_high"].item()), fmt(int(c["n"].item())),
            fmt(c["p_value"].item()), fmt(c["p_adj"].item()),
            "yes" if bool(c["significant"].item()) else "no"])
    return header, rows


def format_layer_table(ds: xr.Dataset, metric: str = "kl", ci: float = 0.95,
                       n_resamples: int = 2000, seed: int = 0) -> str:
    """Plain-text per-layer table (mean, CI, median, n, BH-adjusted p) for a terminal."""
    summ = stats.layer_summary(ds, metric, ci=ci, n_resamples=n_resamples, seed=seed)
    tests = stats.layer_tests(ds, metric)
    header, rows = _summary_table(summ, ci)
    header.append("p (BH)")
    extras = [d for d in summ.dims if d != "layer"]
    for row, sel in zip(rows, _iter_cells(summ, ["layer", *extras]), strict=True):
        row.append(fmt(tests["p_adj"].sel(sel).item()))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    units = ds[metric].attrs.get("units", "")
    title = (f"{metric} ({units}) — {ds.attrs.get('model_name', '?')}, "
             f"mode={ds.attrs.get('mode', '?')}, direction={ds.attrs.get('direction', '?')}, "
             f"{ds.sizes['pair']} pairs")
    lines = [title,
             "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _to_csv(obj: xr.Dataset, path: Path) -> Path:
    obj.to_dataframe().to_csv(path)
    return path


# --------------------------------------------------------------------------------------------
# narrative
# --------------------------------------------------------------------------------------------
def _sel_text(sel: dict[Hashable, Any]) -> str:
    return f" ({', '.join(f'{k} = {v}' for k, v in sel.items())})" if sel else ""


def _best_cell(crit: xr.Dataset) -> dict[Hashable, Any]:
    """The position/component cell whose top-ranked layer has the largest mean."""
    extras = [d for d in crit.dims if d != "rank"]
    if not extras:
        return {}
    top = crit.sel(rank=1)
    cells = _iter_cells(top, extras)
    means = [top["mean"].sel(c).item() for c in cells]
    return cells[int(np.nanargmax(np.nan_to_num(means, nan=-np.inf)))]


def _narrative(ds: xr.Dataset, metric: str, crit: xr.Dataset, tests: xr.Dataset,
               alpha: float, ci: float, n_resamples: int, seed: int) -> list[str]:
    name = METRIC_NAMES.get(metric, metric)
    units = str(ds[metric].attrs.get("units", ""))
    unit_txt = f" {units}" if units not in ("", "1") else ""
    cell = _best_cell(crit)
    c = crit.sel(cell).sel(rank=1)
    layer = int(c["layer"].item())
    n = int(c["n"].item())
    where = _sel_text(cell)
    est = (f"mean {name} {fmt(c['mean'].item())}{unit_txt}, {ci:.0%} CI "
           f"{fmt(c['ci_low'].item())}–{fmt(c['ci_high'].item())}")
    p_adj = c["p_adj"].item()
    paras = []
    sents = []
    if bool(c["significant"].item()):
        sents.append(f"The effect peaks at layer {layer}{where} ({est}), significantly above "
                     f"the other layers (one-sided Wilcoxon signed-rank test against the mean of "
                     f"the other layers, BH-adjusted p = {fmt(p_adj)}, n = {n} pairs).")
        t = tests.sel(cell) if cell else tests
        others = [int(v) for v, p in zip(t["layer"].values, t["p_adj"].values, strict=True)
                  if np.isfinite(p) and p < alpha and int(v) != layer]
        if others:
            sents.append(f"Layer{'s' if len(others) > 1 else ''} "
                         f"{', '.join(map(str, others))} also stand{'' if len(others) > 1 else 's'}"
                         f" out at BH-adjusted α = {alpha}.")
        else:
            sents.append(f"No other layer is significant at BH-adjusted α = {alpha}.")
    elif np.isfinite(p_adj):
        sents.append(f"No layer stands out significantly: the largest mean {name} is at layer "
                     f"{layer}{where} ({est}), but its BH-adjusted p = {fmt(p_adj)} "
                     f"(n = {n} pairs), so this ranking may well be noise.")
    else:
        sents.append(f"The largest mean {name} is at layer {layer}{where} ({est}, n = {n} "
                     f"pairs); no significance test was possible (single layer or no data).")
    if crit.sizes["rank"] > 1:
        c2 = crit.sel(cell).sel(rank=2)
        if c2["ci_high"].item() >= c["ci_low"].item():
            sents.append(f"Its CI overlaps that of the runner-up, layer {int(c2['layer'].item())} "
                         f"(mean {fmt(c2['mean'].item())}), so their order is uncertain.")
    peaks = stats.peak_layer(ds.sel(cell) if cell else ds, metric)
    hist = peaks["histogram"].sel(layer=layer).item()
    n_valid = int((peaks["peak_layer"] >= 0).sum().item())
    if n_valid:
        sents.append(f"Per pair, the maximum lies at layer {layer} for {hist} of {n_valid} pairs "
                     f"({_pct(hist / n_valid)}).")
    paras.append(" ".join(sents))

    sents = []
    sub = ds.sel(cell) if cell else ds
    if "flipped" in ds.data_vars:
        f = stats.summarize_1d(sub["flipped"].sel(layer=layer).values, ci, n_resamples, seed)
        n_flip = int(np.nansum(sub["flipped"].sel(layer=layer).values))
        direction = ds.attrs.get("direction", "")
        target = {"denoise": "the clean answer", "noise": "the corrupted answer"}.get(
            str(direction), "the source run's answer")
        sents.append(f"At layer {layer}, {_pct(f['mean'])} of pairs ({n_flip} of {int(f['n'])}; "
                     f"{ci:.0%} CI {_pct(f['ci_low'])}–{_pct(f['ci_high'])}) flipped to "
                     f"{target} (the source run's answer, direction = {direction}).")
    if "recovery" in ds.data_vars and metric != "recovery":
        r = stats.summarize_1d(sub["recovery"].sel(layer=layer).values, ci, n_resamples, seed)
        sents.append(f"The mean logit-difference recovery there is {fmt(r['mean'])} "
                     f"({ci:.0%} CI {fmt(r['ci_low'])}–{fmt(r['ci_high'])}; 1 = fully "
                     f"restored).")
    if n < 10:
        sents.append(f"With only {n} pairs these estimates are imprecise; treat them as "
                     f"preliminary.")
    if int(ds.attrs.get("sanity_passed", 1)) != 1:
        sents.append("The sanity checks FAILED for this run, so all numbers above are suspect.")
    if sents:
        paras.append(" ".join(sents))
    return paras


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _provenance(doc: _Doc, ds: xr.Dataset) -> None:
    attrs = ds.attrs
    keys = [k for k in PROVENANCE_KEYS if k in attrs]
    keys += sorted(k for k in attrs if k not in PROVENANCE_KEYS and k != "model_config"
                   and not k.startswith("sanity_"))
    rows = [[k, f"`{attrs[k]}`" if k == "command" else str(attrs[k])] for k in keys]
    dims = ", ".join(f"{d} = {n}" for d, n in ds.sizes.items())
    rows.append(["dimensions", dims])
    doc.table(["attribute", "value"], rows)
    if "model_config" in attrs:
        try:
            cfg = json.dumps(json.loads(str(attrs["model_config"])), indent=2, sort_keys=True)
        except json.JSONDecodeError:
            cfg = str(attrs["model_config"])
        doc.p("Model configuration:")
        doc.code(cfg)


def _sanity(doc: _Doc, ds: xr.Dataset) -> None:
    attrs = ds.attrs
    if "sanity_passed" not in attrs:
        doc.p("No sanity checks were recorded in this file.")
        return
    passed = int(attrs["sanity_passed"]) == 1
    doc.p(f"Overall: **{'PASS' if passed else 'FAIL'}**")
    rows = []
    for key, what in [("sanity_self_patch_max_kl", "self-patch max KL (should be ≈ 0)"),
                      ("sanity_min_kl", "minimum KL over the sweep"),
                      ("sanity_full_patch_max_abs", "full-patch max |Δ logit| (should be ≈ 0)")]:
        if key in attrs:
            rows.append([what, fmt(attrs[key]), "—"])  # thresholds live in the patcher
    try:
        details = json.loads(str(attrs.get("sanity_details", "{}")))
    except json.JSONDecodeError:
        details = {}
    if isinstance(details, dict):
        for key, val in details.items():
            if isinstance(val, dict) and "passed" in val:
                extra = ", ".join(f"{k} = {fmt(v) if isinstance(v, (int, float)) else v}"
                                  for k, v in val.items() if k != "passed")
                rows.append([str(key), extra, "PASS" if val["passed"] else "FAIL"])
            elif isinstance(val, bool):
                rows.append([str(key), "", "PASS" if val else "FAIL"])
    if rows:
        doc.table(["check", "value", "status"], rows)


def write_report(
    ds: xr.Dataset,
    out_dir: str | Path,
    metric: str = "kl",
    k: int = 3,
    formats: Sequence[str] = ("png", "svg"),
    alpha: float = 0.05,
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Path:
    """Write figures (``figures/``), CSV tables, ``report.md`` and ``report.html`` to ``out_dir``.

    Returns the path of ``report.md``. ``report.html`` embeds the PNG figures (or SVG when PNG is
    not among ``formats``) as data URIs and has no external assets.
    """
    validate(ds, "dataset", required=(metric,))
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    kw = {"n_resamples": n_resamples, "seed": seed}
    da = ds[metric]
    extras = stats.extra_dims(da)

    # ---- statistics and CSV tables
    metrics = [metric] + [m for m in SUMMARY_METRICS if m != metric and m in ds.data_vars]
    summaries = {m: stats.layer_summary(ds, m, ci=ci, **kw) for m in metrics}
    for m, summ in summaries.items():
        _to_csv(summ, out / f"layer_summary_{m}.csv")
    crit = stats.critical_layers(ds, metric, k=k, alpha=alpha, ci=ci, **kw)
    tests = stats.layer_tests(ds, metric)
    _to_csv(crit, out / "critical_layers.csv")
    _to_csv(tests, out / f"layer_tests_{metric}.csv")
    cell = _best_cell(crit)
    by_steps = None
    if "reasoning_steps" in ds.coords:
        by_steps = stats.by(ds, "reasoning_steps", metric, ci=ci, **kw)
        _to_csv(by_steps, out / "by_reasoning_steps.csv")

    # ---- figures
    figures: list[tuple[str, str]] = []

    def add(fig: Any, stem: str, caption: str) -> None:
        paths = plots.save_figure(fig, fig_dir / stem, formats)
        pick = next((p for p in paths if p.suffix == ".png"), paths[0] if paths else None)
        if pick is not None:
            figures.append((caption, str(pick.relative_to(out).as_posix())))

    add(plots.plot_layer_means(ds, metric, ci=ci, **kw), f"layer_means_{metric}",
        f"Mean {metric} by layer with {ci:.0%} bootstrap CI")
    for m in metrics[1:]:
        if m in ("recovery", "flipped"):
            add(plots.plot_layer_means(ds, m, ci=ci, **kw), f"layer_means_{m}",
                f"Mean {m} by layer with {ci:.0%} bootstrap CI")
    if "component" in extras:
        add(plots.plot_components(ds, metric, ci=ci, **kw), f"components_{metric}",
            f"Components compared ({metric})")
    add(plots.plot_pair_heatmap(ds, metric), f"pair_heatmap_{metric}",
        f"{metric} per pair × layer (pairs ordered by reasoning steps)")
    add(plots.plot_critical_layers(ds, metric, crit=crit), f"critical_layers_{metric}",
        f"Top-{crit.sizes['rank']} layers by mean {metric}")
    if ds.sizes["layer"] > 1:
        add(plots.plot_layer_similarity(ds, metric), f"layer_similarity_{metric}",
            f"Layer × layer Spearman correlation of {metric}")
    if "position" in extras:
        add(plots.plot_position_heatmap(ds, metric), f"position_heatmap_{metric}",
            f"{metric} by layer × latent position")

    # ---- document
    title = f"codi-nnsight report: {ds.attrs.get('model_name', '?')} — {metric}"
    doc = _Doc()
    doc.h(1, title)
    doc.p(f"{ds.sizes['pair']} pairs, {ds.sizes['layer']} layers, mode = "
          f"{ds.attrs.get('mode', '?')}, direction = {ds.attrs.get('direction', '?')}. "
          f"Numbers are shown with 4 significant digits; CIs are {ci:.0%} bootstrap CIs of the "
          f"mean over pairs ({n_resamples} resamples, seed {seed}).")
    doc.h(2, "What the numbers say")
    for para in _narrative(ds, metric, crit, tests, alpha, ci, n_resamples, seed):
        doc.p(para)
    doc.h(2, "Provenance")
    _provenance(doc, ds)
    doc.h(2, "Sanity checks")
    _sanity(doc, ds)
    doc.h(2, "Per-layer table")
    units = ds[metric].attrs.get("units", "")
    doc.p(f"`{metric}` ({units}), mean over pairs; n = pairs with a value.")
    doc.table(*_summary_table(summaries[metric], ci))
    if "flipped" in summaries and metric != "flipped":
        doc.h(3, "Share of pairs flipped to the source answer")
        doc.p("`flipped` (share of pairs, 0–1).")
        doc.table(*_summary_table(summaries["flipped"], ci))
    doc.h(2, "Critical layers")
    doc.p(f"Top {crit.sizes['rank']} layers by mean {metric}. p: one-sided Wilcoxon signed-rank "
          f"test, across pairs, of (layer value − mean of the other layers) > 0; p (BH): "
          f"Benjamini–Hochberg adjusted over all {ds.sizes['layer']} layers"
          + (" within each " + "/".join(map(str, extras)) + " cell" if extras else "")
          + f"; significant: p (BH) < {alpha}.")
    doc.table(*_critical_table(crit, ci))
    doc.h(2, "Per-reasoning-steps breakdown")
    if by_steps is None:
        doc.p("No `reasoning_steps` coordinate in this file.")
    else:
        _steps_section(doc, by_steps, cell, ci)
    doc.h(2, "Figures")
    for caption, rel in figures:
        doc.img(caption, rel)
    doc.p("CSV tables: " + ", ".join(
        f"`{p.name}`" for p in sorted(out.glob("*.csv"))) + ".")

    md_path = out / "report.md"
    md_path.write_text(doc.markdown(), encoding="utf-8")
    (out / "report.html").write_text(doc.html(out, title), encoding="utf-8")
    return md_path


def _steps_section(doc: _Doc, by_steps: xr.Dataset, cell: dict[Hashable, Any],
                   ci: float) -> None:
    b = by_steps.sel(cell) if cell else by_steps
    doc.p("Per group of pairs with the same number of reasoning steps (−1 = unknown): the layer "
          "with the largest mean" + _sel_text(cell) + ", its mean and CI. Full per-layer "
          "numbers are in `by_reasoning_steps.csv`.")
    rows = []
    for steps in b["reasoning_steps"].values:
        g = b.sel(reasoning_steps=steps)
        means = g["mean"].values
        if not np.isfinite(means).any():
            continue
        j = int(np.nanargmax(means))
        s = g.isel(layer=j)
        rows.append([str(steps), str(int(g["n_pairs"].item())), str(int(g["layer"].values[j])),
                     fmt(s["mean"].item()), fmt_ci(s["ci_low"].item(), s["ci_high"].item())])
    doc.table(["reasoning_steps", "pairs", "peak layer", "mean", f"{ci:.0%} CI"], rows)
