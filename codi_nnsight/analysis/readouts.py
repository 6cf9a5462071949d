"""Figures and summaries for readout Datasets (logit lens, attention, probes; docs/readouts.md).

Works from the Dataset alone (no model code). Every figure function returns a
`matplotlib.figure.Figure` built without pyplot's global state; heatmaps share their axes, and
colorbars name their units in words. `readout_summary` and `write_readout_report` dispatch on
the Dataset's `codi_nnsight_schema` attr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

__all__ = [
    "READOUT_SCHEMAS",
    "is_readout",
    "lens_top1_rates",
    "plot_attention_tokens",
    "plot_lens_ranks",
    "plot_probe",
    "readout_summary",
    "write_readout_report",
]

READOUT_SCHEMAS = ("codi-nnsight/lens/1", "codi-nnsight/attention/1", "codi-nnsight/probe/1")


def _schema(ds: xr.Dataset) -> str:
    return str(ds.attrs.get("codi_nnsight_schema", ""))


def is_readout(ds: xr.Dataset) -> bool:
    """True for a lens, attention or probe Dataset (what `report` should hand to this module)."""
    return _schema(ds) in READOUT_SCHEMAS


def _steps(ds: xr.Dataset) -> list[str]:
    return [str(s) for s in ds["step"].values]


# -- logit lens ---------------------------------------------------------------------------------
def lens_top1_rates(ds: xr.Dataset, source: str = "block") -> xr.DataArray:
    """Share of questions whose gold intermediate j is the lens's top-1 token.

    `source="block"`: dims (step, layer, intermediate), per layer; `"best_layer"`: (step,
    intermediate), top-1 at any layer; `"prj"`: (step, intermediate) from the projected thought.
    Questions without gold value j are left out of j's share (NaN when none has it).
    """
    rank = ds["prj_intermediate_rank"] if source == "prj" else ds["intermediate_rank"]
    known = rank.notnull()
    hit = rank == 1
    if source == "best_layer":
        hit, known = hit.any("layer"), known.any("layer")
    n = known.sum(["pair", "variant"])
    rate = hit.sum(["pair", "variant"]) / n.where(n > 0)
    rate.attrs = {
        "long_name": "share of questions whose gold intermediate is the lens's top-1 token",
        "units": "share of questions",
    }
    return rate


def _heatmap(ax: Any, data: np.ndarray, rows: list[str], cols: list[str], **kw: Any) -> Any:
    im = ax.imshow(data, aspect="auto", origin="lower", **kw)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    return im


def plot_lens_ranks(ds: xr.Dataset, variant: str | None = None, statistic: str = "median") -> Figure:
    """Step × layer heatmaps of the answer's and each gold intermediate's lens rank (log colour scale).

    One panel per target (answer, intermediate 0, 1, …), sharing axes: x = step, y = layer. The
    cell is the `statistic` (median or mean) rank over questions (both variants unless `variant`).
    """
    from matplotlib.colors import LogNorm

    sub = ds if variant is None else ds.sel(variant=[variant])
    targets = [("answer", sub["answer_rank"])]
    targets += [
        (f"intermediate {int(j)}", sub["intermediate_rank"].sel(intermediate=j)) for j in sub["intermediate"].values
    ]
    reduce = np.nanmedian if statistic == "median" else np.nanmean
    panels = []
    for name, da in targets:
        vals = da.transpose("pair", "variant", "step", "layer").values.reshape(
            -1, sub.sizes["step"], sub.sizes["layer"]
        )
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                panels.append(
                    (
                        name,
                        reduce(vals, axis=0).T
                        if len(vals)
                        else np.full((sub.sizes["layer"], sub.sizes["step"]), np.nan),
                    )
                )
    vmax = max([np.nanmax(p) for _, p in panels if np.isfinite(p).any()] + [2.0])
    fig = Figure(figsize=(3.2 * len(panels) + 1, 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    im = None
    for ax, (name, data) in zip(axes, panels):
        im = _heatmap(
            ax,
            data,
            [str(L) for L in sub["layer"].values],
            _steps(sub),
            cmap="viridis_r",
            norm=LogNorm(vmin=1, vmax=vmax),
        )
        ax.set_title(name)
        ax.set_xlabel("step (position read)")
    axes[0].set_ylabel("layer (block output)")
    if im is not None:
        fig.colorbar(im, ax=list(axes), label=f"{statistic} rank of the token (1 = top-1)")
    fig.suptitle(f"Logit lens — {ds.attrs.get('model', '')}" + (f", {variant} questions" if variant else ""))
    return fig


# -- attention -----------------------------------------------------------------------------------
def plot_attention_tokens(
    ds: xr.Dataset, pair: int, variant: str = "clean", layer: int | None = None, head: int | None = None
) -> Figure:
    """Heatmap of step (bot, latents, answer) × question token: attention weight on each question token,
    averaged over layers and heads unless `layer` / `head` are given; region masses alongside."""
    w = ds["question_attention"].sel(pair=pair, variant=variant)
    where = "mean over layers and heads"
    if layer is not None:
        w = w.sel(layer=layer)
        where = f"layer {layer}" + ("" if head is not None else ", mean over heads")
    if head is not None:
        w = w.sel(head=head)
        where = (f"layer {layer}, " if layer is not None else "mean over layers, ") + f"head {head}"
    w = w.mean([d for d in ("layer", "head") if d in w.dims])
    text = [str(t) for t in ds["token_text"].sel(pair=pair, variant=variant).values]
    n = sum(1 for t in text if t != "") or len(text)
    data = w.transpose("step", "token").values[:, :n]
    mass = ds["mass"].sel(pair=pair, variant=variant)
    mass = mass.sel(layer=layer) if layer is not None else mass.mean("layer")
    mass = mass.sel(head=head) if head is not None else mass.mean("head")
    fig = Figure(figsize=(max(6, 0.22 * n + 4), 0.45 * ds.sizes["step"] + 2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, sharey=True, width_ratios=[max(3, n / 4), 2])
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(n), [t.replace("\n", "\\n") for t in text[:n]], rotation=90, fontsize=7)
    ax.set_yticks(range(ds.sizes["step"]), _steps(ds))
    ax.set_xlabel("question token")
    ax.set_ylabel("step (query position)")
    fig.colorbar(im, ax=ax, label="attention weight (share of attention)")
    regions = [str(r) for r in ds["region"].values]
    im2 = ax2.imshow(mass.transpose("step", "region").values, aspect="auto", cmap="cividis", vmin=0, vmax=1)
    ax2.set_xticks(range(len(regions)), regions, rotation=90)
    ax2.set_xlabel("key region")
    fig.colorbar(im2, ax=ax2, label="attention mass (share of attention)")
    fig.suptitle(f"Attention of pair {pair} ({variant}), {where} — {ds.attrs.get('model', '')}")
    return fig


# -- probes --------------------------------------------------------------------------------------
def plot_probe(ds: xr.Dataset, targets: list[str] | None = None) -> Figure:
    """Probe accuracy, control accuracy and selectivity per step × layer, one row per target (shared axes)."""
    targets = [str(t) for t in ds["target"].values] if targets is None else targets
    cols = [
        ("accuracy", "held-out accuracy"),
        ("control_accuracy", "control task (shuffled labels)"),
        ("selectivity", "selectivity (accuracy − control)"),
    ]
    fig = Figure(figsize=(11, 2.2 * len(targets) + 1), layout="constrained")
    axes = fig.subplots(len(targets), 3, sharex=True, sharey=True, squeeze=False)
    layers, steps = [str(L) for L in ds["layer"].values], _steps(ds)
    for r, t in enumerate(targets):
        for c, (var, title) in enumerate(cols):
            data = ds[var].sel(target=t).transpose("layer", "step").values
            im = _heatmap(
                axes[r, c], data, layers, steps, cmap="viridis" if c < 2 else "RdBu_r", vmin=0 if c < 2 else -1, vmax=1
            )
            if r == 0:
                axes[r, c].set_title(title)
            if c == 0:
                chance = float(ds["majority"].sel(target=t))
                axes[r, c].set_ylabel(f"{t}\n(chance {chance:.2f})\nlayer")
            if r == len(targets) - 1:
                axes[r, c].set_xlabel("step (position read)")
            if r == 0:
                fig.colorbar(im, ax=axes[:, c], label="share of test questions", location="bottom")
    fig.suptitle(
        f"Linear probes — {ds.attrs.get('model', '')}, {int(ds.attrs.get('n_questions', 0))} questions, "
        f"{ds.sizes['seed']} seeds"
    )
    return fig


# -- summaries and report -----------------------------------------------------------------------
def readout_summary(ds: xr.Dataset) -> str:
    """A few lines of text naming the headline numbers of a readout Dataset."""
    schema = _schema(ds)
    lines: list[str] = []
    if schema.startswith("codi-nnsight/lens/"):
        last = int(ds["layer"].values[-1])
        ans = ds["answer_rank"].sel(step="answer", layer=last)
        lines.append(f"answer token top-1 at the answer position (last layer): {float((ans == 1).mean()):.1%}")
        if ds.sizes.get("intermediate", 0):
            rates = lens_top1_rates(ds, "best_layer")
            lines.append(
                "gold intermediate top-1 at any layer (rows: step; columns: intermediate "
                + " ".join(str(int(j)) for j in ds["intermediate"].values)
                + "):"
            )
            for s in _steps(ds):
                vals = " ".join("  -  " if np.isnan(v) else f"{v:5.0%}" for v in rates.sel(step=s).values)
                lines.append(f"  {s:>6}: {vals}")
        else:
            lines.append("no gold intermediate values in these pairs (no `steps`)")
    elif schema.startswith("codi-nnsight/attention/"):
        mass = ds["mass"].mean(["pair", "variant", "layer", "head"])
        lines.append("attention mass by key region (mean over questions, layers and heads):")
        lines.append("  step    " + " ".join(f"{str(r):>9}" for r in ds["region"].values))
        for s in _steps(ds):
            lines.append(f"  {s:>6}  " + " ".join(f"{v:9.3f}" for v in mass.sel(step=s).values))
    elif schema.startswith("codi-nnsight/probe/"):
        for t in ds["target"].values:
            acc = ds["accuracy"].sel(target=t)
            if not np.isfinite(acc.values).any():
                lines.append(f"{t}: not enough data")
                continue
            best = acc.where(np.isfinite(acc), -1).argmax(...)
            s, L = str(ds["step"].values[int(best["step"])]), int(ds["layer"].values[int(best["layer"])])
            cell = dict(step=s, layer=L, target=t)
            lines.append(
                f"{t}: best {float(acc.sel(step=s, layer=L)):.1%} at step {s}, layer {L} (control "
                f"{float(ds['control_accuracy'].sel(**cell)):.1%}, chance "
                f"{float(ds['majority'].sel(target=t)):.1%})"
            )
    else:
        raise ValueError(f"not a readout Dataset (schema {schema!r})")
    return "\n".join(lines)


def write_readout_report(ds: xr.Dataset, out: str | Path, pair: int | None = None) -> Path:
    """Figures (PNG) and `readout.md` for a readout Dataset in folder `out`; returns the markdown path.

    Like :func:`report.write_report`, the files written are listed in the folder's manifest, and
    only the files an earlier report's manifest lists are deleted first.
    """
    from .report import ReportFiles, clear_report_files

    out = Path(out)
    schema = _schema(ds)
    figures: list[tuple[str, Figure]] = []
    if schema.startswith("codi-nnsight/lens/"):
        figures.append(("lens_ranks.png", plot_lens_ranks(ds)))
    elif schema.startswith("codi-nnsight/attention/"):
        figures.append(
            ("attention_tokens.png", plot_attention_tokens(ds, int(ds["pair"].values[0]) if pair is None else pair))
        )
    elif schema.startswith("codi-nnsight/probe/"):
        figures.append(("probe.png", plot_probe(ds)))
    else:
        raise ValueError(f"not a readout Dataset (schema {schema!r})")
    out.mkdir(parents=True, exist_ok=True)
    clear_report_files(out)
    written = ReportFiles(out)
    try:
        for name, fig in figures:
            fig.savefig(out / name, dpi=120)
            written.add(out / name)
        md = out / "readout.md"
        body = [f"# {schema} — {ds.attrs.get('model', '')}", "", "```", readout_summary(ds), "```", ""]
        body += [f"![{name}]({name})" for name, _ in figures]
        md.write_text("\n".join(body) + "\n", encoding="utf-8")
        written.add(md)
    finally:
        written.save()
    return md
