"""Results of a `positions="sequence"` sweep: the effect along the whole run, question → thoughts → answer.

A sequence sweep patches every token on its own — the question's tokens, `[bot]`, each thought
and each answer-prompt token — on one `position` axis counted from the first thought (see
docs/results-schema.md). Question tokens sit at different offsets in different pairs, so the
summaries here go by *region*, per pair: the tokens before the changed number, the changed
number's tokens (the `changed` coordinate), the tokens after it, `[bot]`, each thought and the
answer prompt (its last token apart: patching it carries the whole answer computation there,
so it is a control, not a finding). A region's value for a pair is its largest value over the
region's tokens (the token that moves the answer most), then averaged over pairs.

The thoughts of a sequence sweep are exactly the `positions="each"` sweep's patches, so the
report analyses them with the usual per-thought machinery (`thought_view`) and adds this view.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from .plots import figure_title, units_label

__all__ = ["REGIONS", "is_sequence", "plot_sequence", "region_means", "sequence_finding", "thought_view"]

#: The regions of a sequence sweep, in sequence order (thoughts are one region each: "thought k").
REGIONS = ("before the number", "changed number", "after the number", "[bot]", "answer prompt", "last prompt token")
_COORDS = ("position_kind", "token", "changed", "patched")


def is_sequence(ds: xr.Dataset) -> bool:
    """Whether `ds` is a `positions="sequence"` sweep."""
    return str(ds.attrs.get("positions", "")) == "sequence" and "position_kind" in ds.coords


def thought_view(ds: xr.Dataset) -> xr.Dataset:
    """The thoughts of a sequence sweep, as a `positions="each"` sweep's Dataset holds them."""
    kinds = ds["position_kind"].values
    view = ds.sel(position=ds.position.values[kinds == "thought"]).drop_vars(list(_COORDS), errors="ignore")
    view.attrs = {**ds.attrs, "positions": "each", "positions_view": "the thoughts of a positions=sequence sweep"}
    return view


def _masks(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """(pair, position) membership of every region (thoughts: one region each)."""
    kinds = ds["position_kind"].values
    changed = ds["changed"].transpose("pair", "position").values > 0
    present = ds["token"].transpose("pair", "position").values != ""
    if "patched" in ds.coords:  # --tokens: a token the pair has but that was not patched
        present = present & (ds["patched"].transpose("pair", "position").values > 0)
    question = np.broadcast_to(kinds == "question", changed.shape) & present
    first = np.where(changed.any(1), changed.argmax(1), changed.shape[1])
    last = np.where(changed.any(1), changed.shape[1] - 1 - changed[:, ::-1].argmax(1), -1)
    idx = np.arange(changed.shape[1])[None, :]
    answer = np.broadcast_to(kinds == "answer prompt", changed.shape) & present
    last_token = answer & (
        idx == np.where(answer.any(1), changed.shape[1] - 1 - answer[:, ::-1].argmax(1), -1)[:, None]
    )
    out = {
        "before the number": question & (idx < first[:, None]),
        "changed number": changed & present,
        "after the number": question & (idx > last[:, None]),
        "[bot]": np.broadcast_to(kinds == "bot", changed.shape) & present,
    }
    for p in ds.position.values[kinds == "thought"]:
        out[f"thought {int(p)}"] = np.broadcast_to(ds.position.values == p, changed.shape) & present
    out["answer prompt"] = answer & ~last_token
    out["last prompt token"] = last_token
    return out


def region_means(ds: xr.Dataset, metric: str = "kl") -> xr.DataArray:
    """(region, layer) mean over pairs of each pair's largest `metric` over the region's tokens.

    Pairs with no token in a region (no token after the number, say) are left out of its mean;
    extra dims (component, head) are averaged first.
    """
    da = ds[metric]
    extra = [d for d in da.dims if d not in ("pair", "layer", "position")]
    if extra:
        da = da.mean(extra)
    values = da.transpose("pair", "layer", "position").values
    rows = []
    masks = _masks(ds)
    for mask in masks.values():
        m = np.broadcast_to(mask[:, None, :], values.shape)
        with np.errstate(all="ignore"):
            per_pair = np.where(m & np.isfinite(values), values, -np.inf).max(-1)  # (pair, layer)
            per_pair = np.where(np.isfinite(per_pair), per_pair, np.nan)
            rows.append(
                np.nanmean(per_pair, axis=0) if np.isfinite(per_pair).any() else np.full(values.shape[1], np.nan)
            )
    return xr.DataArray(
        np.array(rows),
        dims=("region", "layer"),
        coords={"region": list(masks), "layer": ds.layer.values},
        name=metric,
        attrs={"long_name": f"mean over pairs of each pair's largest {metric} over the region's tokens"},
    )


def sequence_finding(ds: xr.Dataset, metric: str = "kl") -> str:
    """One sentence: where along the sequence patching moves the answer most, region by region."""
    means = region_means(ds, metric)
    units = str(ds[metric].attrs.get("units", ""))
    units = f" {units}" if units and units not in ("share", "fraction") else ""
    parts = []
    for region in means.region.values:
        row = means.sel(region=region)
        if region == "last prompt token" or not np.isfinite(row.values).any():
            continue
        L = int(row.layer.values[int(np.nanargmax(row.values))])
        parts.append((float(np.nanmax(row.values)), str(region), L))
    if not parts:
        return ""
    value, region, L = max(parts)
    return (
        f"patching one token at a time, the answer moves most at {region} ({value:.4g}{units}, layer {L}); "
        f"largest mean {metric} per region (each pair's largest over the region's tokens, averaged over pairs): "
        + "; ".join(f"{r} {v:.3g}{units} (layer {layer})" for v, r, layer in parts)
        + ". The last answer-prompt token is left out: patching it carries the whole answer computation."
    )


def _tick_labels(ds: xr.Dataset) -> list[str]:
    """Position labels: question offsets, [bot], t0 … t(K-1), the answer prompt's tokens."""
    kinds = ds["position_kind"].values
    tokens = ds["token"].transpose("pair", "position").values
    labels = []
    for j, (p, kind) in enumerate(zip(ds.position.values, kinds)):
        if kind == "thought":
            labels.append(f"t{int(p)}")
        elif kind == "bot":
            labels.append("[bot]")
        elif kind == "answer prompt":
            seen = [t for t in tokens[:, j] if t != ""]
            labels.append(repr(str(seen[0])) if seen else str(int(p)))
        else:
            labels.append(str(int(p)))
    return labels


def plot_sequence(ds: xr.Dataset, metric: str = "kl") -> Figure:
    """The effect along the whole sequence: mean `metric` over pairs per layer and position, with
    the changed number's tokens (whose offsets differ between pairs) aligned in a panel of their own."""
    da = ds[metric]
    extra = [d for d in da.dims if d not in ("pair", "layer", "position")]
    if extra:
        da = da.mean(extra)
    with np.errstate(all="ignore"):
        mean = da.mean("pair", skipna=True).transpose("layer", "position").values
    number = region_means(ds, metric).sel(region="changed number").values[:, None]
    width = max(8.0, 0.22 * mean.shape[1] + 2.5)
    fig = Figure(figsize=(width, 0.35 * mean.shape[0] + 2.6), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=(1.2, mean.shape[1]))
    ax_n, ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    vmax = np.nanmax(
        [np.nanmax(mean) if np.isfinite(mean).any() else 0, np.nanmax(number) if np.isfinite(number).any() else 0]
    )
    kw: dict[str, Any] = {"aspect": "auto", "origin": "lower", "cmap": "viridis", "vmin": 0, "vmax": vmax or 1}
    ax_n.imshow(number, **kw)
    ax_n.set_xticks([0], ["number"], rotation=90)
    ax_n.set_yticks(range(len(ds.layer)), [str(int(L)) for L in ds.layer.values])
    ax_n.set_ylabel("layer")
    im = ax.imshow(mean, **kw)
    ax.set_xticks(range(mean.shape[1]), _tick_labels(ds), rotation=90, fontsize=7)
    ax.set_yticks(range(len(ds.layer)), [])
    kinds = list(ds["position_kind"].values)
    for kind in ("bot", "thought", "answer prompt"):  # region boundaries
        if kind in kinds:
            ax.axvline(kinds.index(kind) - 0.5, color="white", lw=1)
    ax.set_xlabel("position (question offset from the first thought · [bot] · thoughts · answer prompt)")
    fig.colorbar(im, ax=ax, label=units_label(ds, metric), shrink=0.9)
    fig.suptitle(
        figure_title(ds.attrs, metric, f"{metric} along the sequence, mean over pairs (left: the changed number)"),
        fontsize=10,
    )
    return fig
