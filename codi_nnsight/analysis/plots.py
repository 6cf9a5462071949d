"""Figures for a results Dataset.

Every function returns a :class:`matplotlib.figure.Figure` built directly (no pyplot global
state, so it works headless and in threads). The figure's suptitle carries what is plotted plus
model name, metric, mode and direction; axes are labelled with the variable's ``units``.
Palettes are colorblind-safe: Okabe–Ito for lines/bars, viridis/cividis for heatmaps.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from . import stats
from .io import ResultsError

# Okabe & Ito (2008) colorblind-safe qualitative palette (black moved last)
OKABE_ITO = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
)
LINESTYLES = ("-", "--", ":", "-.")
NONSIG_COLOR = "#999999"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def units_label(ds: xr.Dataset, metric: str) -> str:
    """Axis label for ``metric`` with its units in words, e.g. ``"kl (nats)"``,
    ``"flipped (share of pairs)"``; just the name when it has no unit."""
    words = stats.unit_words(ds, metric)
    return f"{metric} ({words})" if words else metric


def latent_only(ds: xr.Dataset | xr.DataArray) -> bool:
    """True when the only component swept is ``latent``: its single ``layer`` (0) is not a layer."""
    if "component" in ds.dims:
        return [str(c) for c in ds["component"].values] == ["latent"]
    return str(ds.attrs.get("component", "")) == "latent"


def cell_label(key: Hashable, value: Any) -> str:
    """How a position/component cell is named in titles and the report: ``thought k`` for
    latent token k (the same for every component), the component name as is."""
    if key == "position":
        return f"thought {value}"
    if key == "component":
        return str(value)
    return f"{key}={value}"


def figure_title(attrs: dict[str, Any], metric: str, what: str) -> str:
    """Two-line suptitle: what is shown, then model name, metric, mode and direction."""
    model = attrs.get("model_name", "unknown model")
    mode = attrs.get("mode", "?")
    direction = attrs.get("direction", "?")
    return f"{what}\n{model} · {metric} · mode={mode} · direction={direction}"


def _figure(
    n_panels: int = 1, panel_size: tuple[float, float] = (6.4, 4.0), max_cols: int = 3, sharey: bool = False
) -> tuple[Figure, list[Axes]]:
    ncols = min(n_panels, max_cols)
    nrows = int(np.ceil(n_panels / ncols))
    # at least 7 inches wide so the two-line suptitle fits
    fig = Figure(figsize=(max(7.0, panel_size[0] * ncols), panel_size[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey="all" if sharey else "none").ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_axis_off()  # unused grid cells
    return fig, axes[:n_panels]


def _collapse(ds: xr.Dataset, metric: str, keep: Iterable[Hashable] = ()) -> tuple[xr.Dataset, str]:
    """Average ``metric`` per pair over extra dims not in ``keep``; return (dataset, note)."""
    da = stats.metric_array(ds, metric)
    drop = [d for d in stats.extra_dims(da) if d not in set(keep)]
    if drop:
        da = da.mean(dim=drop, keep_attrs=True, skipna=True)
    note = f" (mean over {', '.join(map(str, drop))})" if drop else ""
    return xr.Dataset({metric: da}, attrs=ds.attrs), note


def _combos(ds: xr.Dataset | xr.DataArray, dims: Sequence[Hashable]) -> list[dict[Hashable, Any]]:
    """All index combinations of ``dims`` as dicts for ``.sel``."""
    values = [ds[d].values.tolist() for d in dims]
    return [dict(zip(dims, v, strict=True)) for v in itertools.product(*values)]


def _label(sel: dict[Hashable, Any]) -> str:
    return ", ".join(cell_label(k, v) for k, v in sel.items())


def _style(i: int) -> dict[str, Any]:
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "linestyle": LINESTYLES[(i // len(OKABE_ITO)) % len(LINESTYLES)]}


def _layer_ticks(layers: np.ndarray, max_ticks: int = 24) -> tuple[np.ndarray, list[str]]:
    """Tick positions/labels for a layer axis; thinned so 40+ layer models stay readable."""
    step = int(np.ceil(len(layers) / max_ticks)) if len(layers) else 1
    ticks = np.asarray(layers)[::step]
    return ticks, [str(v) for v in ticks]


def save_figure(
    fig: Figure, path_stem: str | Path, formats: Sequence[str] = ("png", "svg"), dpi: int = 150
) -> list[Path]:
    """Save ``fig`` as ``<path_stem>.<fmt>`` for every format; returns the written paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.parent / f"{stem.name}.{fmt}"
        # drop timestamps/software tags so reruns give identical files
        meta = {"Date": None} if fmt == "svg" else ({"Software": None} if fmt == "png" else None)
        fig.savefig(path, format=fmt, dpi=dpi, metadata=meta)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def plot_layer_means(
    ds: xr.Dataset,
    metric: str = "kl",
    hue: str | None = None,
    col: str | None = None,
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    sharey: bool = True,
) -> Figure:
    """Mean ``metric`` by layer with bootstrap CI error bars.

    ``hue`` (default ``component`` when present) draws one line per value; ``col`` (default
    ``position`` when present) makes one panel per value ("thought k"). Other extra dims are
    averaged per pair. Panels share their y axis unless ``sharey`` is False, so a small effect
    in one panel is not drawn as large as a big one in another. The ``latent`` component has no
    layer: it is drawn as a horizontal line with its CI band across the layer axis.
    """
    da = stats.metric_array(ds, metric)
    extras = stats.extra_dims(da)
    hue = hue if hue is not None else ("component" if "component" in extras else None)
    col = col if col is not None else ("position" if "position" in extras and hue != "position" else None)
    for d in (hue, col):
        if d is not None and d not in extras:
            raise ResultsError(f"{metric!r} has no dimension {d!r}")
    keep = [d for d in (hue, col) if d is not None]
    sub, note = _collapse(ds, metric, keep)
    summ = stats.layer_summary(sub, metric, ci=ci, n_resamples=n_resamples, seed=seed)
    panels = _combos(summ, [col]) if col else [{}]
    lines = _combos(summ, [hue]) if hue else [{}]
    fig, axes = _figure(len(panels), sharey=sharey)
    layers = summ["layer"].values
    only_latent = latent_only(ds)
    width = 0.25 if len(lines) > 1 else 0.0
    for ax, psel in zip(axes, panels, strict=True):
        for i, lsel in enumerate(lines):
            s = summ.sel({**psel, **lsel})
            mean = s["mean"].values
            label = str(lsel[hue]) if hue else None
            if lsel.get("component") == "latent" and layers.size > 1:
                # the latent input embedding is not a layer: one value, drawn across all layers
                j = int(np.flatnonzero(np.isfinite(mean))[0]) if np.isfinite(mean).any() else 0
                ax.axhline(mean[j], label=f"{label} (input embedding, no layer)", **_style(i))
                ax.axhspan(s["ci_low"].values[j], s["ci_high"].values[j], alpha=0.15, color=_style(i)["color"])
                continue
            yerr = np.vstack([mean - s["ci_low"].values, s["ci_high"].values - mean])
            # small horizontal offsets keep overlapping error bars readable
            off = (i - (len(lines) - 1) / 2) * width / max(len(lines) - 1, 1)
            ax.errorbar(layers + off, mean, yerr=yerr, marker="o", markersize=4, capsize=3, label=label, **_style(i))
        ax.set_ylabel(units_label(ds, metric))
        if psel:
            ax.set_title(_label(psel))
        if only_latent:
            ax.set_xlabel("patched site")
            ax.set_xticks(layers, ["latent input embedding"] * layers.size)
        else:
            ax.set_xlabel("layer")
            ax.set_xticks(*_layer_ticks(layers))
        ax.grid(alpha=0.3)
        if hue:
            ax.legend(title=hue, fontsize="small")
    n = int(summ["n"].max())
    how = "exact binomial" if str(summ.attrs.get("ci_method", "")).startswith("exact binomial") else "bootstrap"
    fig.suptitle(
        figure_title(ds.attrs, metric, f"Mean {metric} by layer, {ci:.0%} {how} CI, n≤{n} pairs{note}"),
        fontsize=10,
    )
    return fig


def plot_components(ds: xr.Dataset, metric: str = "kl", **kw: Any) -> Figure:
    """Compare swept components (resid/attn/mlp/…) as lines on one axis (per position panel)."""
    if "component" not in stats.metric_array(ds, metric).dims:
        raise ResultsError(f"{metric!r} has no 'component' dimension")
    return plot_layer_means(ds, metric, hue="component", **kw)


def plot_recovery_ratio(
    ds: xr.Dataset,
    kind: str = "logit",
    rec: xr.Dataset | None = None,
    ci: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Figure:
    """Recovery as a ratio of means over pairs (:func:`stats.recovery_ratio`) by layer, with its
    paired bootstrap CI; one line per position/component cell, on one shared axis.

    Dotted lines mark 0 (no change) and 1 (the patched run fully reaches the source run).
    """
    if rec is None:
        rec = stats.recovery_ratio(ds, kind, ci=ci, n_boot=n_boot, seed=seed)
    extras = [d for d in rec.dims if d != "layer"]
    cells = _combos(rec, extras) if extras else [{}]
    fig, (ax,) = _figure(1)
    layers = rec["layer"].values
    width = 0.3 if len(cells) > 1 else 0.0
    for i, sel in enumerate(cells):
        r = rec.sel(sel) if sel else rec
        ratio = r["ratio"].values
        if not np.isfinite(ratio).any():
            continue
        yerr = np.vstack([ratio - r["ci_low"].values, r["ci_high"].values - ratio])
        off = (i - (len(cells) - 1) / 2) * width / max(len(cells) - 1, 1)
        ax.errorbar(
            layers + off,
            ratio,
            yerr=yerr,
            marker="o",
            markersize=4,
            capsize=3,
            label=_label(sel) if sel else None,
            **_style(i),
        )
    for y in (0.0, 1.0):
        ax.axhline(y, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlabel("layer")
    ax.set_xticks(*_layer_ticks(layers))
    ax.set_ylabel("recovery (share of the gap)")
    ax.grid(alpha=0.3)
    if len(cells) > 1:
        ax.legend(fontsize="small")
    var = rec.attrs.get("metric", kind)
    n = int(rec["n"].max()) if rec["n"].size else 0
    # two lines: on one, the formula and the CI do not fit the figure's width and get clipped
    what = (
        f"Recovery of {var} = mean(patched − baseline) / mean(source − baseline)\n"
        f"{ci:.0%} paired bootstrap CI, n≤{n} pairs"
    )
    fig.suptitle(figure_title(ds.attrs, var, what), fontsize=10)
    return fig


def _order_pairs(x: np.ndarray, ds: xr.Dataset, order: str) -> tuple[np.ndarray, str]:
    if order == "cluster" and x.shape[0] > 2:
        from scipy.cluster.hierarchy import leaves_list, linkage

        filled = np.where(np.isfinite(x), x, np.nanmean(x) if np.isfinite(x).any() else 0.0)
        return leaves_list(linkage(filled, method="average")), "clustered (average linkage)"
    if order == "reasoning_steps" and "reasoning_steps" in ds.coords:
        steps = ds["reasoning_steps"].values
        return np.lexsort((ds["pair"].values, steps)), "ordered by reasoning_steps"
    return np.arange(x.shape[0]), "in file order"


def plot_pair_heatmap(ds: xr.Dataset, metric: str = "kl", order: str = "reasoning_steps") -> Figure:
    """Heatmap pairs × layers of ``metric``; ``order`` is "reasoning_steps", "cluster" or "file".

    Extra dims (position/component) are averaged per pair.
    """
    sub, note = _collapse(ds, metric)
    da = sub[metric].transpose("pair", "layer")
    x = da.values.astype(float)
    idx, how = _order_pairs(x, ds, order)
    n_pairs, n_layers = x.shape
    fig = Figure(figsize=(max(5.0, 0.45 * n_layers + 2.5), min(14.0, 2.0 + 0.18 * n_pairs)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(x[idx], aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("layer")
    ax.set_ylabel("pair")
    xt, _ = _layer_ticks(np.arange(n_layers))
    ax.set_xticks(xt, [str(da["layer"].values[i]) for i in xt])
    if n_pairs <= 60:
        ids = da["pair"].values[idx]
        if "reasoning_steps" in ds.coords:
            steps = ds["reasoning_steps"].values[idx]
            labels = [f"{p} (s={s})" for p, s in zip(ids, steps, strict=True)]
        else:
            labels = [str(p) for p in ids]
        ax.set_yticks(np.arange(n_pairs), labels, fontsize=6)
    fig.colorbar(im, ax=ax, label=units_label(ds, metric))
    fig.suptitle(figure_title(ds.attrs, metric, f"{metric} per pair × layer, {how}{note}"), fontsize=10)
    return fig


def plot_critical_layers(
    ds: xr.Dataset,
    metric: str = "kl",
    k: int = 3,
    alpha: float = 0.05,
    crit: xr.Dataset | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    sharey: bool = True,
) -> Figure:
    """Bar chart of the top-``k`` layers (mean with CI); layers that are significant *and* above
    the metric's negligible threshold are coloured and starred.

    One panel per position/component cell when those dims exist (shared y axis unless ``sharey``
    is False). ``crit`` may be a precomputed :func:`stats.critical_layers` result. The y axis spans
    at least 10× the negligible threshold (:data:`stats.NEGLIGIBLE`, drawn as a dashed line), so
    a negligible effect is never auto-scaled to full height.
    """
    if crit is None:
        crit = stats.critical_layers(ds, metric, k=k, alpha=alpha, n_resamples=n_resamples, seed=seed)
    extras = [d for d in crit.dims if d != "rank"]
    panels = _combos(crit, extras) if extras else [{}]
    fig, axes = _figure(len(panels), panel_size=(4.5, 3.6), max_cols=4, sharey=sharey)
    threshold = stats.negligible_threshold(metric)
    ranges: list[tuple[float, float]] = []  # (low, high) of the CI bars per panel, 0 included
    for ax, psel in zip(axes, panels, strict=True):
        c = crit.sel(psel) if psel else crit
        mean = c["mean"].values
        hi_v, lo_v = c["ci_high"].values, c["ci_low"].values
        good = c["significant"].values.astype(bool) & ~c["negligible"].values.astype(bool)
        yerr = np.vstack([mean - lo_v, hi_v - mean])
        x = np.arange(mean.size)
        colors = [OKABE_ITO[0] if g else NONSIG_COLOR for g in good]
        ax.bar(x, mean, yerr=yerr, capsize=4, color=colors, edgecolor="black", linewidth=0.5)
        for xi, g, p in zip(x, good, c["p_adj"].values, strict=True):
            if g:
                ax.annotate(
                    "*",
                    (xi, hi_v[xi]),
                    ha="center",
                    va="bottom",
                    fontsize=14,
                    xytext=(0, 1),
                    textcoords="offset points",
                )
            ax.annotate(
                f"p={p:.2g}",
                (xi, 0),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
                color="white" if g else "k",
            )
        ranges.append((min([0.0, *lo_v[np.isfinite(lo_v)]]), max([0.0, *hi_v[np.isfinite(hi_v)]])))
        if threshold > 0:
            ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8)
        cell_latent = psel.get("component") == "latent" or (not psel.get("component") and latent_only(ds))
        ax.set_xticks(x, ["latent input" if cell_latent else str(v) for v in c["layer"].values])
        ax.set_xlabel("patched site" if cell_latent else "layer")
        ax.set_ylabel(units_label(ds, metric))
        if psel:
            ax.set_title(_label(psel), fontsize=9)
    if sharey:
        ranges = [(min(r[0] for r in ranges), max(r[1] for r in ranges))] * len(ranges)
    for ax, (lo, hi) in zip(axes, ranges, strict=True):
        # never let a negligible effect fill the axis: span at least 10x the threshold
        span = max(hi - lo, 10 * threshold)
        if span > 0:
            pad = 0.15 * span
            ax.set_ylim(lo - (pad if lo < 0 else 0.0), lo + span + pad)
    from matplotlib.patches import Patch

    handles = [
        Patch(color=OKABE_ITO[0], label=f"above the other layers' mean: BH p < {alpha}, not negligible (*)"),
        Patch(color=NONSIG_COLOR, label="not significant or negligible"),
    ]
    if threshold > 0:
        from matplotlib.lines import Line2D

        handles.append(
            Line2D(
                [],
                [],
                color="black",
                linestyle="--",
                linewidth=0.8,
                label=f"negligible below {threshold:g} {stats.unit_words(ds, metric)}",
            )
        )
    # outside the axes, below them: inside, it covered the stars and CI bars of the tallest bars
    fig.legend(handles=handles, fontsize="small", loc="outside lower center", ncols=1)
    fig.suptitle(
        figure_title(
            ds.attrs,
            metric,
            f"Top-{crit.sizes['rank']} layers by mean {metric} (CI bars; one-sided Wilcoxon, BH-adjusted)",
        ),
        fontsize=10,
    )
    return fig


def plot_layer_similarity(ds: xr.Dataset, metric: str = "kl", sim: xr.DataArray | None = None) -> Figure:
    """Layer × layer Spearman correlation matrix of ``metric`` across pairs."""
    note = ""
    if sim is None:
        sub, note = _collapse(ds, metric)
        sim = stats.layer_similarity(sub, metric)
    elif set(sim.dims) - {"layer", "layer_other"}:
        raise ResultsError("layer similarity must be 2-D (select position/component first)")
    fig = Figure(figsize=(6.0, 5.2), layout="constrained")
    ax = fig.add_subplot()
    layers = sim["layer"].values
    im = ax.imshow(
        sim.transpose("layer", "layer_other").values, cmap="cividis", vmin=-1, vmax=1, interpolation="nearest"
    )
    ticks, _ = _layer_ticks(np.arange(layers.size))
    ax.set_xticks(ticks, [str(layers[i]) for i in ticks])
    ax.set_yticks(ticks, [str(layers[i]) for i in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="Spearman ρ across pairs (−1 to 1)")
    fig.suptitle(figure_title(ds.attrs, metric, f"Layer similarity of {metric}{note}"), fontsize=10)
    return fig


#: Heatmap rows: the axis label of each grid dimension.
GRID_LABELS = {"position": "continuous thought", "head": "attention head"}


def plot_position_heatmap(ds: xr.Dataset, metric: str = "kl", max_pairs: int = 11, dim: str = "position") -> Figure:
    """Small multiples of ``metric`` over layer × ``dim`` (continuous thought, or attention head):
    the mean over pairs first, then up to ``max_pairs`` individual pairs (shared colour scale).
    Needs that dim; other extra dims (``component``, ``position`` for a head grid) are averaged.
    """
    if dim not in stats.metric_array(ds, metric).dims:
        raise ResultsError(f"{metric!r} has no {dim!r} dimension")
    sub, note = _collapse(ds, metric, keep=[dim])
    da = sub[metric].transpose("pair", dim, "layer")
    with np.errstate(all="ignore"):
        mean = da.mean("pair", skipna=True).values
    pairs = da["pair"].values[:max_pairs]
    grids = [("mean over pairs", mean)] + [(f"pair {p}", da.sel(pair=p).values) for p in pairs]
    fig, axes = _figure(len(grids), panel_size=(3.4, 2.6), max_cols=4)
    finite = np.concatenate([g[np.isfinite(g)].ravel() for _, g in grids])
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    layers = da["layer"].values
    positions = da[dim].values
    im = None
    for ax, (name, grid) in zip(axes, grids, strict=True):
        im = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
            extent=(layers[0] - 0.5, layers[-1] + 0.5, positions[0] - 0.5, positions[-1] + 0.5),
        )
        ax.set_title(name, fontsize=9)
        ax.set_xticks(*_layer_ticks(layers, 8))
        ax.set_yticks(positions)
        ax.set_xlabel("layer")
        ax.set_ylabel(GRID_LABELS.get(dim, dim))
    fig.colorbar(im, ax=axes, label=units_label(ds, metric), shrink=0.8)
    fig.suptitle(figure_title(ds.attrs, metric, f"{metric} by layer × {GRID_LABELS.get(dim, dim)}{note}"), fontsize=10)
    return fig


def plot_comparison(
    ds_a: xr.Dataset,
    ds_b: xr.Dataset,
    metric: str = "kl",
    labels: tuple[str, str] = ("A", "B"),
    n_resamples: int = 2000,
    seed: int = 0,
) -> Figure:
    """Two panels: per-layer means of both runs, and the paired difference A − B with its CI.

    Extra dims are averaged per pair before comparing.
    """
    a, note = _collapse(ds_a, metric)
    b, _ = _collapse(ds_b, metric)
    cmp = stats.compare(a, b, metric, seed=seed, n_resamples=n_resamples)
    layers = cmp["layer"].values
    fig = Figure(figsize=(7.0, 6.0), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1)
    ax1.plot(layers, cmp["mean_a"].values, marker="o", label=labels[0], **_style(0))
    ax1.plot(layers, cmp["mean_b"].values, marker="s", label=labels[1], **_style(1))
    ax1.set_xlabel("layer")
    ax1.set_xticks(*_layer_ticks(layers))
    ax1.set_ylabel(units_label(ds_a, metric))
    ax1.set_title("mean over common pairs", fontsize=9)
    ax1.legend(fontsize="small")
    ax1.grid(alpha=0.3)
    ax2.axhline(0.0, color="black", linewidth=0.8)
    ax2.fill_between(
        layers,
        cmp["ci_low"].values,
        cmp["ci_high"].values,
        color=OKABE_ITO[0],
        alpha=0.3,
        label=f"{cmp.attrs['ci']:.0%} bootstrap CI",
    )
    ax2.plot(layers, cmp["mean"].values, marker="o", color=OKABE_ITO[0], label=f"{labels[0]} − {labels[1]}")
    ax2.set_xlabel("layer")
    ax2.set_ylabel(f"Δ {units_label(ds_a, metric)}")
    ax2.set_title(f"paired difference, n={int(cmp['n'].max())} common pairs", fontsize=9)
    ax2.set_xticks(*_layer_ticks(layers))
    ax2.legend(fontsize="small")
    ax2.grid(alpha=0.3)
    what = f"Comparison {labels[0]} vs {labels[1]} of {metric}{note}"
    title = figure_title(ds_a.attrs, metric, what)
    b_attrs = ds_b.attrs
    if any(b_attrs.get(key) != ds_a.attrs.get(key) for key in ("model_name", "mode", "direction")):
        title += (
            f"\nvs {b_attrs.get('model_name', '?')} · mode={b_attrs.get('mode', '?')} · "
            f"direction={b_attrs.get('direction', '?')}"
        )
    fig.suptitle(title, fontsize=10)
    return fig
