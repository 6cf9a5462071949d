"""Markdown/HTML report, CSV tables and figures for one results Dataset.

The report content is built once as a list of simple blocks (heading, paragraph, table, image,
code) and rendered to both Markdown and self-contained HTML, so the two never disagree.
All numbers are printed with :func:`fmt` (4 significant digits) so tests can recompute them.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..atomic import ensure_writable, file_sha256
from ..errors import UserError
from ..patching.options import MODE_ALIASES
from . import plots, stats
from .io import check_metric, validate
from .sequence import is_sequence, plot_sequence, sequence_finding, thought_view

SUMMARY_METRICS = ("kl", "logit_diff", "recovery", "flipped")
PROVENANCE_KEYS = (
    "model_name",
    "mode",
    "direction",
    "component",
    "positions",
    "dtype",
    "device",
    "seed",
    "version_codi_nnsight",
    "version_nnsight",
    "version_torch",
    "version_transformers",
    "pairs_file",
    "pairs_sha256",
    "checkpoint_sha256",
    "command",
    "start_time",
    "end_time",
    "codi_nnsight_schema",
)
METRIC_NAMES = {
    "kl": "KL",
    "l2": "L2",
    "logit_diff": "logit difference",
    "logprob_diff": "log-probability difference",
    "recovery": "recovery",
    "logprob_recovery": "log-probability recovery",
    "flipped": "share flipped",
    "top1_changed": "share with a changed top token",
}
#: Metrics whose mean is itself an effect size (0 = no effect), so a mean below the negligible
#: threshold means the patch does nothing; for the others only differences between layers count.
EFFECT_METRICS = ("kl", "l2", "top1_changed", "flipped", "recovery", "logprob_recovery")
MODE_TEXT = {
    "recurrent": "Mode `recurrent`: the patched activation is fed through CODI's latent loop, so every later "
    "continuous thought is recomputed from the patched state. This measures the total effect through the loop.",
    "block-all-feedback": "Mode `block-all-feedback` (formerly `no-feedback`): the latent input embeddings fed back "
    "into the model are held at their unpatched (baseline) values, so the patch does not travel through the "
    "feedback of latents. It still reaches later thoughts and the answer through attention, so this is not a pure "
    "direct effect; it also drops the path through a later thought that attends to the patched one and feeds "
    "back — the attention route proper is `block-thought-feedback`.",
    "block-thought-feedback": "Mode `block-thought-feedback`: only the patched thought's own fed-back embedding is "
    "held at its unpatched value; everything else runs. This is the attention route: the patch reaches the answer "
    "only through the patched thought's keys and values (including later thoughts that attend to it and feed back).",
    "block-thought-attention": "Mode `block-thought-attention` (formerly `feedback-only`): the patched thought's own "
    "states (the keys and values later thoughts attend to) are held at their unpatched values, and only its "
    "fed-back embedding — the next thought's input — carries the patch. This measures the feedback route; at the "
    "last thought it is zero by construction.",
    "routes": "Mode `routes`: the total effect split on the `route` dimension into the feedback route, the "
    "attention route and their interaction (total − the two), exactly, for additive quantities.",
}
DIRECTION_TEXT = {
    "denoise": "Direction `denoise`: clean activations are patched into the corrupted run. Recovery 1 means the "
    "clean behaviour is fully restored, 0 means the run still behaves as the corrupted one; a flip means the "
    "corrupted run now gives the clean question's answer.",
    "noise": "Direction `noise`: corrupted activations are patched into the clean run. Recovery 1 means the clean "
    "run fully takes on the corrupted behaviour (it is fully broken), 0 means it is unaffected; a flip means the "
    "clean run now gives the corrupted question's answer.",
}
POSITION_TEXT = (
    "Thought k is latent token k (continuous thought k, counted from 0) for every component: for `resid`, "
    "`attn` and `mlp` it is that sub-layer's output at latent token k; for `latent` it is the input embedding "
    "of latent token k."
)
#: The file in a report folder that lists every file the report wrote, with its SHA-256. A rewrite
#: deletes only those files (and only while unchanged); anything else in the folder is the user's.
MANIFEST_NAME = ".codi-report-manifest.json"
MANIFEST_SCHEMA = "codi-nnsight/report-manifest/1"
#: Files that mark a folder as a report of an older codi-nnsight (written before the manifest).
REPORT_MARKERS = ("report.md", "readout.md")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 layer"``, ``"2 layers"`` (``many`` for irregular plurals)."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


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

                lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
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
                trs = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                body.append(
                    f'<figure><img alt="{e(val[0])}" src="{_data_uri(base / val[1])}">'
                    f"<figcaption>{e(val[0])}</figcaption></figure>"
                )
            elif kind == "code":
                body.append(f"<pre><code>{e(val)}</code></pre>")
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "td,th{border:1px solid #999;padding:2px 8px;text-align:right}"
            "th{background:#eee}img{max-width:100%}pre{background:#f4f4f4;padding:8px;"
            "overflow-x:auto}figcaption{font-size:0.85em;color:#444}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{e(title)}</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


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


def _is_latent(sel: dict[Hashable, Any], latent_only: bool) -> bool:
    return sel.get("component") == "latent" or ("component" not in sel and latent_only)


def _layer_text(sel: dict[Hashable, Any], layer: Any, latent_only: bool) -> str:
    """The layer column: ``latent input`` for the latent component (it has no layer)."""
    return "latent input" if _is_latent(sel, latent_only) else str(layer)


def _summary_table(summ: xr.Dataset, ci: float, latent_only: bool = False) -> tuple[list[str], list[list[str]]]:
    extras = [d for d in summ.dims if d != "layer"]
    header = ["layer", *map(str, extras), "mean", f"{ci:.0%} CI", "median", "n"]
    rows = []
    for sel in _iter_cells(summ, ["layer", *extras]):
        s = summ.sel(sel)
        if _is_latent(sel, latent_only) and int(s["n"].item()) == 0:
            continue  # the latent component's rows at layers > 0 of a multi-component file are empty
        rows.append(
            [_layer_text(sel, sel["layer"], latent_only)]
            + [str(sel[d]) for d in extras]
            + [
                fmt(s["mean"].item()),
                fmt_ci(s["ci_low"].item(), s["ci_high"].item()),
                fmt(s["median"].item()),
                fmt(int(s["n"].item())),
            ]
        )
    return header, rows


def _critical_table(crit: xr.Dataset, ci: float, latent_only: bool = False) -> tuple[list[str], list[list[str]]]:
    extras = [d for d in crit.dims if d != "rank"]
    header = [
        *map(str, extras),
        "rank",
        "layer",
        "mean",
        f"{ci:.0%} CI",
        "n",
        "excess over other layers",
        "p",
        "p (BH)",
        "significant",
        "negligible",
    ]
    rows = []
    for sel in _iter_cells(crit, [*extras, "rank"]):
        c = crit.sel(sel)
        if _is_latent(sel, latent_only) and int(sel["rank"]) > 1:
            continue
        significant = "yes" if bool(c["significant"].item()) else ("no" if bool(c["testable"].item()) else "untestable")
        rows.append(
            [str(sel[d]) for d in extras]
            + [
                str(sel["rank"]),
                _layer_text(sel, int(c["layer"].item()), latent_only),
                fmt(c["mean"].item()),
                fmt_ci(c["ci_low"].item(), c["ci_high"].item()),
                fmt(int(c["n"].item())),
                fmt(c["effect"].item()),
                fmt(c["p_value"].item()),
                fmt(c["p_adj"].item()),
                significant,
                "yes" if bool(c["negligible"].item()) else "no",
            ]
        )
    return header, rows


def _adjacent_table(adj: xr.Dataset, ci: float) -> tuple[list[str], list[list[str]]]:
    """Rows of :func:`stats.adjacent_layers` for one cell."""
    header = ["layers", "mean before", "mean after", "difference", f"{ci:.0%} CI", "d_z", "pairs higher", "p", "p (BH)"]
    rows = []
    for j in range(adj.sizes["layer"]):
        a = adj.isel(layer=j)
        n = int(a["n"].item())
        rows.append(
            [
                f"{int(a['layer_before'].item())} → {int(a['layer'].item())}",
                fmt(a["mean_before"].item()),
                fmt(a["mean_after"].item()),
                fmt(a["diff"].item()),
                fmt_ci(a["ci_low"].item(), a["ci_high"].item()),
                fmt(a["effect_size"].item()),
                f"{int(round(a['share_up'].item() * n)) if n else 0} of {n}",
                fmt(a["p_value"].item()),
                fmt(a["p_adj"].item()),
            ]
        )
    return header, rows


def _recovery_table(rec: xr.Dataset, ci: float, latent_only: bool = False) -> tuple[list[str], list[list[str]]]:
    extras = [d for d in rec.dims if d != "layer"]
    header = [
        "layer",
        *map(str, extras),
        "recovery (ratio of means)",
        f"{ci:.0%} CI",
        "pairs used",
        "left out",
        "per-pair recovery undefined",
    ]
    rows = []
    for sel in _iter_cells(rec, ["layer", *extras]):
        r = rec.sel(sel)
        if _is_latent(sel, latent_only) and int(r["n"].item()) == 0:
            continue
        rows.append(
            [_layer_text(sel, sel["layer"], latent_only)]
            + [str(sel[d]) for d in extras]
            + [
                fmt(r["ratio"].item()),
                fmt_ci(r["ci_low"].item(), r["ci_high"].item()),
                fmt(int(r["n"].item())),
                fmt(int(r["n_left_out"].item())),
                fmt(int(r["n_recovery_nan"].item())),
            ]
        )
    return header, rows


def format_layer_table(
    ds: xr.Dataset, metric: str = "kl", ci: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> str:
    """Plain-text per-layer table (mean, CI, median, n, BH-adjusted p) for a terminal."""
    name = _source_name(ds)
    check_metric(ds, metric, name)
    ds = validate(ds, name, required=(metric,))
    stats.metric_array(ds, metric)  # refuses metrics that cannot be summarised (e.g. answer)
    summ = stats.layer_summary(ds, metric, ci=ci, n_resamples=n_resamples, seed=seed)
    tests = stats.layer_tests(ds, metric)
    header, rows = _summary_table(summ, ci, plots.latent_only(ds))
    header.append("p (BH)")
    extras = [d for d in summ.dims if d != "layer"]
    cells = [
        c
        for c in _iter_cells(summ, ["layer", *extras])
        if not (_is_latent(c, plots.latent_only(ds)) and int(summ["n"].sel(c).item()) == 0)
    ]
    for row, sel in zip(rows, cells, strict=True):
        row.append(fmt(tests["p_adj"].sel(sel).item()))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    title = (
        f"{plots.units_label(ds, metric)} — {ds.attrs.get('model_name', '?')}, "
        f"mode={ds.attrs.get('mode', '?')}, direction={ds.attrs.get('direction', '?')}, "
        f"{ds.sizes['pair']} pairs"
    )
    lines = [
        title,
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _to_csv(obj: xr.Dataset, path: Path, written: ReportFiles | None = None) -> Path:
    obj.to_dataframe().to_csv(path)
    return written.add(path) if written is not None else path


# --------------------------------------------------------------------------------------------
# narrative
# --------------------------------------------------------------------------------------------
def _sel_text(sel: dict[Hashable, Any]) -> str:
    """`` (thought 0, resid)`` for a position/component cell; "" for none."""
    return f" ({', '.join(plots.cell_label(k, v) for k, v in sel.items())})" if sel else ""


def _label_text(sel: dict[Hashable, Any]) -> str:
    """``thought 4, resid`` for a position/component cell."""
    return ", ".join(plots.cell_label(k, v) for k, v in sel.items())


def _other_thoughts(ds: xr.Dataset, metric: str, summ: xr.Dataset, cell: dict[Hashable, Any]) -> str:
    """One sentence on the thoughts other than the headline's: their largest mean, so a reader
    knows the lead figure shows the one thought that moves."""
    if "position" not in cell or summ.sizes.get("position", 1) < 2:
        return ""
    rest = {k: v for k, v in cell.items() if k != "position"}
    other = (summ.sel(rest) if rest else summ).drop_sel(position=cell["position"])["mean"]
    if not np.isfinite(other.values).any():
        return ""
    top = other.where(other == other.max(), drop=True)
    pos, layer = int(top["position"].values[0]), int(top["layer"].values[0])
    n = other.sizes["position"]
    return (
        f"At the other {plural(n, 'thought')} the largest mean {METRIC_NAMES.get(metric, metric)} is "
        f"{fmt(other.max().item())}{_units(ds, metric)} (thought {pos}, layer {layer})."
    )


def _site(cell: dict[Hashable, Any], layer: int, latent_only: bool) -> str:
    """Where a patch was applied, in words; the latent component is never called "layer 0"."""
    if _is_latent(cell, latent_only):
        thought = f" of thought {cell['position']}" if "position" in cell else ""
        return f"the latent input embedding{thought}"
    return f"layer {layer}{_sel_text(cell)}"


def _best_cell(crit: xr.Dataset) -> dict[Hashable, Any]:
    """The position/component cell whose top-ranked layer has the largest mean."""
    extras = [d for d in crit.dims if d != "rank"]
    if not extras:
        return {}
    top = crit.sel(rank=1)
    cells = _iter_cells(top, extras)
    means = [top["mean"].sel(c).item() for c in cells]
    return cells[int(np.nanargmax(np.nan_to_num(means, nan=-np.inf)))]


def _units(ds: xr.Dataset, metric: str) -> str:
    words = stats.unit_words(ds, metric)
    return f" {words}" if words else ""


def _threshold_text(ds: xr.Dataset, metric: str) -> str:
    thr, why = stats.NEGLIGIBLE.get(metric, (0.0, ""))
    return f"{fmt(thr)}{_units(ds, metric)} ({why})" if thr > 0 else ""


@dataclass
class _Profile:
    """The shape of the per-layer means in one cell, for the headline: where the effect rises
    (onset), the run of layers where it stays high, and whether the largest mean is a real peak."""

    layers: np.ndarray
    mean: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    adj: xr.Dataset  # stats.adjacent_layers of the cell, dim layer = the later layer of each step
    high: np.ndarray  # per layer: at or above half the range of the means
    high_first: int  # index of the first such layer
    high_last: int
    peak: int  # index of the largest mean


def _profile(summ: xr.Dataset, adj: xr.Dataset) -> _Profile | None:
    """The :class:`_Profile` of one cell, or None with fewer than 3 layers or a flat curve."""
    mean = summ["mean"].values.astype(float)
    ok = np.isfinite(mean)
    if ok.sum() < 3:
        return None
    top, bottom = np.nanmax(mean), np.nanmin(mean)
    if not top > bottom:
        return None
    high = ok & (mean >= bottom + (top - bottom) / 2)  # half of the range, the usual "onset" cut
    where = np.flatnonzero(high)
    return _Profile(
        layers=summ["layer"].values,
        mean=mean,
        ci_low=summ["ci_low"].values.astype(float),
        ci_high=summ["ci_high"].values.astype(float),
        adj=adj,
        high=high,
        high_first=int(where[0]),
        high_last=int(where[-1]),
        peak=int(np.nanargmax(mean)),
    )


def _step_text(pr: _Profile, j: int, units: str, ci: float) -> str:
    """The paired comparison of layer index ``j`` with the layer before it, effect size first."""
    s = pr.adj.sel(layer=pr.layers[j])
    d_z = s["effect_size"].item()
    size = f", d_z = {fmt(d_z)}" if np.isfinite(d_z) else ""
    n = int(s["n"].item())
    up = int(round(s["share_up"].item() * n))
    return (
        f"paired difference {s['diff'].item():+.4g}{units}, "
        f"{ci:.0%} CI {fmt_ci(s['ci_low'].item(), s['ci_high'].item())}"
        f"{size}, higher in {up} of {plural(n, 'pair')}, Wilcoxon p = {fmt(s['p_value'].item())}"
    )


def _overlaps(pr: _Profile, i: int, j: int) -> bool:
    return bool(pr.ci_low[i] <= pr.ci_high[j] and pr.ci_low[j] <= pr.ci_high[i])


def _profile_sentences(
    ds: xr.Dataset, metric: str, pr: _Profile, alpha: float, ci: float, cell: dict[Hashable, Any]
) -> list[str]:
    """The finding as a profile over depth: onset, plateau (or fall), and whether the largest mean
    stands out from its neighbours by non-overlapping CIs."""
    name = METRIC_NAMES.get(metric, metric)
    units = _units(ds, metric)
    L, m = pr.layers, pr.mean
    a, b, last = pr.high_first, pr.high_last, int(np.flatnonzero(np.isfinite(m))[-1])
    first = int(np.flatnonzero(np.isfinite(m))[0])
    where = _sel_text(cell)
    subject = f"At {_label_text(cell)}, the effect" if cell else "The effect"
    p_adj = pr.adj["p_adj"].values
    thr = stats.negligible_threshold(metric)
    real = np.isfinite(p_adj) & (p_adj < alpha) & (np.abs(pr.adj["diff"].values) >= thr)
    if not real.any():
        n = int(pr.adj["n"].max().item()) if pr.adj.sizes["layer"] else 0
        if stats.min_p_value(n) >= alpha:
            why = f"with {plural(n, 'pair')} no difference between layers can reach p < {alpha}"
        else:
            why = f"no difference between adjacent layers is significant (BH-adjusted α = {alpha})"
        return [
            f"Mean {name}{where} ranges from {fmt(np.nanmin(m))} to {fmt(np.nanmax(m))}{units} across layers, "
            f"but {why}, so this run does not locate the effect along depth."
        ]
    pct = bool(np.nanmin(m) >= 0)

    def share(x: float) -> str:
        return f"{100 * x / m[pr.peak]:.0f}%" if pct and m[pr.peak] > 0 else ""

    sents = []
    if a > first:
        onset = (
            f"{subject} appears between layers {L[a - 1]} and {L[a]}: mean {name} goes from "
            f"{fmt(m[a - 1])} to {fmt(m[a])}{units} ({_step_text(pr, a, units, ci)})"
        )
    else:
        onset = f"{subject} is already {fmt(m[a])}{units} (mean {name}) at layer {L[a]}, the first layer swept"
    jump = abs(m[a] - m[a - 1]) if a > first else np.inf
    if not pr.high[a : b + 1].all():
        runs = ", ".join(str(v) for v in L[pr.high])
        after = f"; it is at least half of its range at layers {runs}, not in one run of layers"
    elif a == b:
        after = f", and it is large only at layer {L[a]}"
        if b < last:
            after += (
                f": at layer {L[b + 1]} it falls back to {fmt(m[b + 1])}{units} ({_step_text(pr, b + 1, units, ci)})"
            )
    else:
        span = m[a : b + 1]
        lo, hi = np.nanmin(span), np.nanmax(span)
        rng = f"between {fmt(lo)} and {fmt(hi)}{units}" + (
            f" ({share(lo)}–{share(hi)} of its largest mean)" if pct else ""
        )
        diffs = np.diff(span)
        step_p = p_adj[a:b]  # the steps a→a+1 … b−1→b (adj layer index j is the step into layer j+1)
        steady = bool(np.isfinite(step_p).all() and (step_p < alpha).all())
        biggest = f"by at most {fmt(np.nanmax(np.abs(diffs)))}{units} per layer"
        if hi - lo >= jump:
            after = f"; from layer {L[a]} to layer {L[b]} it keeps changing, {rng}"
        elif steady and (diffs > 0).all():
            after = (
                f", and then rises only slowly, a near-plateau: from layer {L[a]} to layer {L[b]} it goes from "
                f"{fmt(m[a])} to {fmt(m[b])}{units}"
                + (f" ({share(m[a])}–{share(m[b])} of its largest mean)" if pct else "")
                + f", {biggest}, each step small but consistent across pairs (BH-adjusted p ≤ "
                f"{fmt(np.nanmax(step_p))})"
            )
        elif steady and (diffs < 0).all():
            after = (
                f", and then declines slowly: from layer {L[a]} to layer {L[b]} it goes from {fmt(m[a])} to "
                f"{fmt(m[b])}{units}, {biggest}, each step consistent across pairs"
            )
        else:
            after = f", and then levels off: from layer {L[a]} to layer {L[b]} it stays {rng}, changing {biggest}"
        if b < last:
            after += f", and at layer {L[b + 1]} it falls back to {fmt(m[b + 1])}{units}"
    sents.append(onset + after + ".")
    # the largest mean: a peak only when its CI clears both neighbours'
    P = pr.peak
    nbrs = [j for j in (P - 1, P + 1) if 0 <= j < m.size and np.isfinite(m[j])]
    touching = [j for j in nbrs if _overlaps(pr, P, j)]
    est = f"{fmt(m[P])}{units}, {ci:.0%} CI {fmt_ci(pr.ci_low[P], pr.ci_high[P])}"
    if touching:
        j = touching[0]
        sents.append(
            f"The largest mean is at layer {L[P]} ({est}), but its CI overlaps that of layer {L[j]} "
            f"({fmt(m[j])}{units}, {fmt_ci(pr.ci_low[j], pr.ci_high[j])}), so no single layer stands out as a peak."
        )
    elif nbrs:
        others = "; ".join(f"layer {L[j]}: {fmt(m[j])}{units}, {fmt_ci(pr.ci_low[j], pr.ci_high[j])}" for j in nbrs)
        sents.append(
            f"The largest mean, at layer {L[P]} ({est}), stands out from its "
            f"neighbour{'s' if len(nbrs) > 1 else ''}: the CIs do not overlap ({others})."
        )
    return sents


def _headline(
    ds: xr.Dataset,
    metric: str,
    crit: xr.Dataset,
    cell: dict[Hashable, Any],
    profile: _Profile | None = None,
    alpha: float = 0.05,
    ci: float = 0.95,
) -> str:
    """The finding: the profile over depth (onset, plateau, peak) when there are 3 or more layers
    and the effect is not negligible; otherwise the largest mean and what can be said of it."""
    name = METRIC_NAMES.get(metric, metric)
    c = crit.sel(cell).sel(rank=1)
    site = _site(cell, int(c["layer"].item()), plots.latent_only(ds))
    mean = c["mean"].item()
    thr = stats.negligible_threshold(metric)
    value = f"mean {name} {fmt(mean)}{_units(ds, metric)}"
    if metric in EFFECT_METRICS and thr > 0 and np.isfinite(mean) and abs(mean) < thr:
        return (
            f"No patched site has a meaningful effect: the largest {value}, at {site}, is below the "
            f"negligible threshold of {fmt(thr)}{_units(ds, metric)}."
        )
    if profile is not None:
        return " ".join(_profile_sentences(ds, metric, profile, alpha, ci, cell))
    if not bool(c["testable"].item()):
        return f"The largest {value} is at {site}; this run cannot show whether it stands out from the other layers."
    return f"The largest {value} is at {site}, but it does not stand out reliably from the other layers."


def _is_peak(pr: _Profile) -> bool:
    """Whether the largest mean's CI clears the CIs of both its neighbours."""
    m = pr.mean
    nbrs = [j for j in (pr.peak - 1, pr.peak + 1) if 0 <= j < m.size and np.isfinite(m[j])]
    return bool(nbrs) and not any(_overlaps(pr, pr.peak, j) for j in nbrs)


def _significance(
    ds: xr.Dataset,
    metric: str,
    crit: xr.Dataset,
    tests: xr.Dataset,
    cell: dict[Hashable, Any],
    alpha: float,
    ci: float,
    profile: _Profile | None = None,
) -> list[str]:
    name = METRIC_NAMES.get(metric, metric)
    units = _units(ds, metric)
    latent = plots.latent_only(ds)
    c = crit.sel(cell).sel(rank=1)
    layer = int(c["layer"].item())
    n = int(c["n"].item())
    site = _site(cell, layer, latent)
    est = (
        f"mean {name} {fmt(c['mean'].item())}{units}, {ci:.0%} CI {fmt(c['ci_low'].item())}–{fmt(c['ci_high'].item())}"
    )
    p_adj = c["p_adj"].item()
    effect = c["effect"].item()
    thr_text = _threshold_text(ds, metric)
    t = tests.sel(cell) if cell else tests
    n_layers = int((np.isfinite(t["mean"].values)).sum())
    sents = []
    if bool(c["significant"].item()):
        size = f"the excess over the other layers, {fmt(effect)}{units}, is " + (
            "below the negligible threshold of " + thr_text + ", so the difference is real but negligible"
            if bool(c["negligible"].item())
            else (f"above the negligible threshold of {thr_text}" if thr_text else "its effect size")
        )
        test = (
            f"(excess over the mean of the other layers {fmt(effect)}{units}; one-sided Wilcoxon signed-rank "
            f"test, BH-adjusted p = {fmt(p_adj)}, n = {plural(n, 'pair')})"
        )
        if profile is not None and _is_peak(profile):
            sents.append(f"The effect peaks at {site} ({est}), significantly above the other layers {test}; {size}.")
        else:
            sents.append(
                f"The largest mean {name} is at {site} ({est}). It is significantly above the mean of the other "
                f"layers {test}, but every layer of a curve that rises and stays up passes that test, so it does "
                f"not make {site} a peak; the comparisons of adjacent layers (above, and under “Adjacent "
                "layers”) locate the effect."
            )
        thr = stats.negligible_threshold(metric)
        others = [
            (int(v), e)
            for v, p, e in zip(t["layer"].values, t["p_adj"].values, t["effect"].values, strict=True)
            if np.isfinite(p) and p < alpha and int(v) != layer
        ]
        big = [v for v, e in others if abs(e) >= thr]
        small = [v for v, e in others if abs(e) < thr]
        if big:
            sents.append(
                f"{'Layers' if len(big) > 1 else 'Layer'} {', '.join(map(str, big))} "
                f"{'are' if len(big) > 1 else 'is'} also above the mean of the other layers at BH-adjusted "
                f"α = {alpha} by a non-negligible amount."
            )
        if small:
            sents.append(
                f"{'Layers' if len(small) > 1 else 'Layer'} {', '.join(map(str, small))} "
                f"{'are' if len(small) > 1 else 'is'} also statistically above the others, but by a "
                f"negligible amount."
            )
        if not others:
            sents.append(f"No other layer is significant at BH-adjusted α = {alpha}.")
    elif not bool(c["testable"].item()):
        if n_layers < 3:
            why = (
                f"only {plural(n_layers, 'layer')} {'has' if n_layers == 1 else 'have'} values here, so whether "
                f"one stands out from the others cannot be tested"
            )
        else:
            why = (
                f"with only {plural(n, 'pair')} the test cannot reach p < {alpha} (the smallest possible "
                f"p is {fmt(stats.min_p_value(n))}), so no significance is claimed"
            )
        sents.append(f"The largest mean {name} is at {site} ({est}, n = {plural(n, 'pair')}); {why}.")
        if n_layers == 2 and crit.sizes["rank"] > 1:
            c2 = crit.sel(cell).sel(rank=2)
            sents.append(
                f"The other layer, layer {int(c2['layer'].item())}, has mean {fmt(c2['mean'].item())}"
                f"{units}; the difference is {fmt(effect)}{units}"
                + (
                    f", {'below' if bool(c['negligible'].item()) else 'above'} the negligible threshold of {thr_text}"
                    if thr_text
                    else ""
                )
                + "."
            )
    else:
        sents.append(
            f"No layer stands out significantly: the largest mean {name} is at {site} ({est}), but its "
            f"BH-adjusted p = {fmt(p_adj)} (n = {plural(n, 'pair')}), so this ranking may well be noise."
        )
    if crit.sizes["rank"] > 1 and n_layers >= 3:
        c2 = crit.sel(cell).sel(rank=2)
        if c2["ci_high"].item() >= c["ci_low"].item():
            sents.append(
                f"The CI of layer {layer} overlaps that of the runner-up, layer {int(c2['layer'].item())} "
                f"(mean {fmt(c2['mean'].item())}{units}), so their order is uncertain."
            )
    if n_layers > 1:
        peaks = stats.peak_layer(ds.sel(cell) if cell else ds, metric)
        hist = int(peaks["histogram"].sel(layer=layer).item())
        n_valid = int((peaks["peak_layer"] >= 0).sum().item())
        if n_valid:
            sents.append(
                f"Per pair, the maximum lies at layer {layer} for {hist} of {plural(n_valid, 'pair')} "
                f"({_pct(hist / n_valid)})."
            )
    return sents


def _adjacent_sentence(ds: xr.Dataset, metric: str, pr: _Profile, alpha: float) -> str:
    """One paragraph: the change between every two adjacent layers, and how many are significant."""
    units = _units(ds, metric)
    adj = pr.adj
    steps = ", ".join(
        f"{int(b)}→{int(a)} {d:+.4g}"
        for b, a, d in zip(adj["layer_before"].values, adj["layer"].values, adj["diff"].values, strict=True)
    )
    p_adj = adj["p_adj"].values
    k = int((np.isfinite(p_adj) & (p_adj < alpha)).sum())
    return (
        f"Between adjacent layers the mean changes by {steps}{units} (mean over pairs of the paired difference); "
        f"{k} of {plural(adj.sizes['layer'], 'step')} {'is' if k == 1 else 'are'} significant (two-sided Wilcoxon "
        f"signed-rank, BH-adjusted α = {alpha}). CIs, effect sizes (d_z) and p-values are in the table under "
        f"“Adjacent layers”."
    )


def _recovery_sentences(ds: xr.Dataset, rec: xr.Dataset, sel: dict[Hashable, Any], site: str, ci: float) -> list[str]:
    """The recovery headline (ratio of means) at one cell, right for both directions."""
    r = rec.sel(sel)
    what = {"logit": "the first-token logit difference", "logprob": "the full-answer log-probability difference"}[
        rec.attrs["kind"]
    ]
    if not np.isfinite(r["ratio"].item()):
        return [f"Recovery of {what} cannot be computed at {site}: no pair has the values it needs."]
    direction = str(ds.attrs.get("direction", ""))
    ratio = fmt(r["ratio"].item())
    span = f"{ci:.0%} CI {fmt(r['ci_low'].item())}–{fmt(r['ci_high'].item())}"
    if direction == "denoise":
        lead = (
            f"Patching the clean activations at {site} into the corrupted run restores {ratio} ({span}) of the "
            f"gap in {what} between the corrupted and the clean run (1 = clean behaviour fully restored, "
            f"0 = no change)"
        )
    elif direction == "noise":
        lead = (
            f"Patching the corrupted activations at {site} into the clean run moves it {ratio} ({span}) of "
            f"the way, in {what}, towards the corrupted run (1 = the clean run fully takes on the corrupted "
            f"behaviour, i.e. it is fully broken; 0 = unaffected)"
        )
    else:
        lead = f"Patching at {site} moves {what} {ratio} ({span}) of the way from the baseline to the source run"
    n, out = int(r["n"].item()), int(r["n_left_out"].item())
    nc = int(r["n_not_comparable"].item())
    sents = [
        f"{lead}; this is the ratio of means over pairs, mean(patched − baseline) / mean(source − baseline), "
        f"over {plural(n, 'pair')}."
    ]
    if out:
        parts = []
        if nc:
            parts.append(f"{nc} with equal clean and corrupted answers")
        if out - nc:
            reason = (
                "the two answers start with the same token, so the logit difference is undefined"
                if rec.attrs["kind"] == "logit"
                else "a log-probability difference is missing"
            )
            parts.append(f"{out - nc} where {reason}")
        sents.append(f"{plural(out, 'pair')} {'was' if out == 1 else 'were'} left out: {'; '.join(parts)}.")
    nan = int(r["n_recovery_nan"].item())
    if nan:
        sents.append(
            f"The per-pair {rec.attrs['per_pair_metric']} is undefined (NaN) for {plural(nan, 'pair')} "
            f"(equal answers, an undefined difference, or a source−baseline gap too small to divide "
            f"by), which is why the headline is a ratio of means, not the mean of per-pair recoveries."
        )
    return sents


def _narrative(
    ds: xr.Dataset,
    metric: str,
    crit: xr.Dataset,
    tests: xr.Dataset,
    recs: dict[str, xr.Dataset],
    alpha: float,
    ci: float,
    n_resamples: int,
    seed: int,
    profile: _Profile | None = None,
) -> list[str]:
    cell = _best_cell(crit)
    c = crit.sel(cell).sel(rank=1)
    layer = int(c["layer"].item())
    n = int(c["n"].item())
    site = _site(cell, layer, plots.latent_only(ds))
    paras = []
    if profile is not None:
        paras.append(_adjacent_sentence(ds, metric, profile, alpha))
    paras.append(" ".join(_significance(ds, metric, crit, tests, cell, alpha, ci, profile)))

    sents = []
    sub = ds.sel(cell) if cell else ds
    direction = str(ds.attrs.get("direction", ""))
    if "flipped" in ds.data_vars:
        flips = stats.metric_array(sub, "flipped").sel(layer=layer).values  # equal-answer pairs are NaN
        f = stats.summarize_proportion(flips, ci)
        n_flip = int(np.nansum(flips))
        counted = (
            f"{_pct(f['mean'])} of comparable pairs ({n_flip} of {int(f['n'])}; {ci:.0%} exact binomial CI "
            f"{_pct(f['ci_low'])}–{_pct(f['ci_high'])})"
        )
        if direction == "denoise":
            sents.append(
                f"With the clean activations patched in at {site}, the corrupted run gave the clean "
                f"question's answer for {counted}."
            )
        elif direction == "noise":
            sents.append(
                f"With the corrupted activations patched in at {site}, the clean run gave the corrupted "
                f"question's answer (the patch broke it) for {counted}."
            )
        else:
            sents.append(f"At {site}, the patched run gave the source question's answer for {counted}.")
    for kind in ("logit", "logprob"):
        if kind in recs:
            sel = {"layer": layer, **cell}
            sents += _recovery_sentences(ds, recs[kind], sel, site, ci)
            break  # one headline; the other kind is in the recovery table
    if n < 10:
        sents.append(f"With only {plural(n, 'pair')} these estimates are imprecise; treat them as preliminary.")
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
    keys += sorted(k for k in attrs if k not in PROVENANCE_KEYS and k != "model_config" and not k.startswith("sanity_"))
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


#: The three checks every sweep stores, both as attrs and in sanity_details: (details key, attr,
#: description, whether passing means value <= threshold).
SANITY_CHECKS = (
    ("self_patch", "sanity_self_patch_max_kl", "self-patch max KL, nats (should be ≈ 0)", True),
    ("kl_nonnegative", "sanity_min_kl", "minimum KL over the sweep, nats (should be ≥ 0)", False),
    ("full_patch", "sanity_full_patch_max_abs", "full-patch max |Δ logit|, logits (should be ≈ 0)", True),
)


def _sanity(doc: _Doc, ds: xr.Dataset) -> None:
    """One row per check: the attrs hold the value over the whole sweep, sanity_details the threshold."""
    attrs = ds.attrs
    if "sanity_passed" not in attrs:
        doc.p("No sanity checks were recorded in this file.")
        return
    passed = int(attrs["sanity_passed"]) == 1
    doc.p(f"Overall: **{'PASS' if passed else 'FAIL'}**")
    try:
        details = json.loads(str(attrs.get("sanity_details", "{}")))
    except json.JSONDecodeError:
        details = {}
    details = details if isinstance(details, dict) else {}
    rows = []
    for key, attr, what, at_most in SANITY_CHECKS:
        d = details.get(key) if isinstance(details.get(key), dict) else {}
        if attr not in attrs and not d:
            continue
        value = float(attrs[attr]) if attr in attrs else d.get("value", np.nan)
        thr = d.get("threshold")
        if isinstance(thr, (int, float)) and np.isfinite(value):
            ok = value <= thr if at_most else value >= thr
        elif isinstance(thr, (int, float)) and key == "full_patch":
            ok = True  # NaN: no pair of equal length to check
        else:
            ok = d.get("passed")
        status = "—" if ok is None else ("PASS" if ok else "FAIL")
        rows.append([what, fmt(value), fmt(thr) if isinstance(thr, (int, float)) else "—", status])
    known = {k for k, *_ in SANITY_CHECKS}
    for key, val in details.items():
        if key in known:
            continue
        if isinstance(val, dict) and "passed" in val:
            rows.append(
                [
                    str(key),
                    fmt(val["value"]) if isinstance(val.get("value"), (int, float)) else "",
                    fmt(val["threshold"]) if isinstance(val.get("threshold"), (int, float)) else "—",
                    "PASS" if val["passed"] else "FAIL",
                ]
            )
        elif isinstance(val, bool):
            rows.append([str(key), "", "—", "PASS" if val else "FAIL"])
    if rows:
        doc.table(["check", "value", "threshold", "status"], rows)


def _safe_relative(rel: str) -> bool:
    """A manifest entry that stays inside the report folder (a hand-edited manifest must not
    make a rewrite delete files elsewhere)."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts and rel != MANIFEST_NAME


def read_manifest(out: str | Path) -> dict[str, str] | None:
    """The files an earlier report wrote in ``out`` (relative POSIX path -> SHA-256), from its
    manifest (:data:`MANIFEST_NAME`); ``None`` when there is no readable manifest."""
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA or not isinstance(doc.get("files"), dict):
        return None
    return {str(k): str(v) for k, v in doc["files"].items() if _safe_relative(str(k))}


class ReportFiles:
    """Records every file a report writes and saves the manifest (:data:`MANIFEST_NAME`).

    Use :meth:`add` right after writing each file; :meth:`save` writes the manifest atomically.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.files: dict[str, str] = {}

    def add(self, path: str | Path) -> Path:
        """Record ``path`` (inside the report folder) as written by the report; returns it."""
        path = Path(path)
        self.files[path.relative_to(self.out).as_posix()] = file_sha256(path)
        return path

    def save(self) -> Path:
        """Write the manifest (via a temporary file and a rename, so it is never half written)."""
        path = self.out / MANIFEST_NAME
        tmp = self.out / f"{MANIFEST_NAME}.{os.getpid()}.tmp"
        doc = {"schema": MANIFEST_SCHEMA, "files": dict(sorted(self.files.items()))}
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def clear_report_files(out: str | Path) -> list[Path]:
    """Delete the files an earlier report wrote in ``out``, as listed in its manifest
    (:data:`MANIFEST_NAME`), so a rewrite leaves no stale figure or table; return them.

    Only files listed there are deleted, and only while their content is what the report wrote
    (a listed file the user has since edited is theirs now and is kept). Every other file, in
    ``out`` or below it, is left alone; a folder without a manifest loses nothing.
    """
    out = Path(out)
    files = read_manifest(out)
    if files is None:
        return []
    removed = []
    for rel, digest in files.items():
        p = out / rel
        if p.is_symlink() or not p.is_file() or file_sha256(p) != digest:
            continue
        p.unlink()
        removed.append(p)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    return removed


def _is_report_dir(out: Path) -> bool:
    """Whether ``out`` holds a report: its manifest, or the markdown of an older version's report."""
    return out.is_dir() and (read_manifest(out) is not None or any((out / m).is_file() for m in REPORT_MARKERS))


def _not_a_report_message(out: Path, flag: str = "--force") -> str | None:
    """Why ``out`` may not be written into without force (``flag`` names the option), or None."""
    if not out.is_dir():
        return None
    if _is_report_dir(out):
        return f"{out}: holds a report already; add {flag} to replace it"
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return None
    shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
    return (
        f"{out}: folder is not empty ({shown}) and holds no codi-nnsight report; choose a new or empty folder, "
        f"or add {flag} to write the report into it (its other files are kept)"
    )


def prepare_report_dir(path: str | Path, force: bool, flag: str = "--force") -> Path:
    """Check a report folder before any work and create it; returns its path.

    Refuses (one-line :class:`UserError`) a path that is a file, a folder that holds a report
    already (its manifest, or ``report.md`` / ``readout.md`` of an older version) unless ``force``,
    and any other non-empty folder unless ``force``: the folder may hold the user's own files.
    With ``force`` the report writer still deletes only files listed in an earlier report's
    manifest (:func:`clear_report_files`); files of the same names as the report's are replaced.
    A folder that cannot be written is reported now, not after the statistics.
    """
    if not str(path).strip():
        raise UserError("--out: empty path")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file, expected a folder")
    why = _not_a_report_message(out, flag)
    if why is not None and not force:
        raise UserError(why)
    ensure_writable(out)  # a folder that cannot be written is reported now, not after the statistics
    return out


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
    force: bool = False,
) -> Path:
    """Write figures (``figures/``), CSV tables, ``report.md`` and ``report.html`` to ``out_dir``.

    Returns the path of ``report.md``. ``report.html`` embeds the PNG figures (or SVG when PNG is
    not among ``formats``) as data URIs and has no external assets. Every file written is listed
    in the folder's manifest (:data:`MANIFEST_NAME`). An earlier report there is replaced: the
    files its manifest lists are removed first (:func:`clear_report_files`); other files are left
    alone. A non-empty folder that holds no report is refused unless ``force`` (then files of the
    report's names are replaced, and nothing else is touched). The CLI is stricter: it refuses
    an earlier report too without ``--force`` (:func:`prepare_report_dir`). Raises :class:`ResultsError` for a
    metric that is missing, not numeric, all-NaN or cannot be summarised (``answer``).
    """
    name = _source_name(ds)
    check_metric(ds, metric, name)
    ds = validate(ds, name, required=(metric,))
    stats.metric_array(ds, metric)  # refuses metrics that cannot be summarised, before touching files
    out = Path(out_dir)
    # an earlier report is replaced without force: only the files its manifest lists are deleted
    if not force and not _is_report_dir(out):
        why = _not_a_report_message(out, flag="--force (force=True in Python)")
        if why is not None:
            raise UserError(why)
    written = ReportFiles(out)
    sequence = None
    if is_sequence(ds):  # its thoughts are an `each` sweep's patches: the usual report, plus the sequence view
        sequence, ds = ds, thought_view(ds)
    try:
        md_path = _write_report(ds, out, written, metric, k, formats, alpha, ci, n_resamples, seed, sequence)
    except BaseException:
        with contextlib.suppress(OSError):  # record what was written, so a rerun can clear it
            if out.is_dir():
                written.save()
        raise
    written.save()
    return md_path


def _source_name(ds: xr.Dataset) -> str:
    """The file a Dataset was loaded from, for error messages ("dataset" when built in memory)."""
    return str(ds.encoding.get("codi_nnsight_name") or ds.encoding.get("source") or "dataset")


def _write_report(  # noqa: C901 — a linear sequence of optional report sections, each a short branch
    ds: xr.Dataset,
    out: Path,
    written: ReportFiles,
    metric: str,
    k: int,
    formats: Sequence[str],
    alpha: float,
    ci: float,
    n_resamples: int,
    seed: int,
    sequence: xr.Dataset | None = None,
) -> Path:
    clear_report_files(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    kw = {"n_resamples": n_resamples, "seed": seed}
    da = ds[metric]
    extras = stats.extra_dims(da)
    latent = plots.latent_only(ds)
    tables: list[Path] = []

    # ---- statistics and CSV tables
    metrics = [metric] + [m for m in SUMMARY_METRICS if m != metric and m in ds.data_vars]
    summaries = {m: stats.layer_summary(ds, m, ci=ci, **kw) for m in metrics}
    for m, summ in summaries.items():
        tables.append(_to_csv(summ, out / f"layer_summary_{m}.csv", written))
    crit = stats.critical_layers(ds, metric, k=k, alpha=alpha, ci=ci, **kw)
    tests = stats.layer_tests(ds, metric)
    tables.append(_to_csv(crit, out / "critical_layers.csv", written))
    tables.append(_to_csv(tests, out / f"layer_tests_{metric}.csv", written))
    recs: dict[str, xr.Dataset] = {}
    for kind, var in (("logit", "logit_diff"), ("logprob", "logprob_diff")):
        if {var, f"baseline_{var}", f"source_{var}"} <= set(ds.data_vars):
            rec = stats.recovery_ratio(ds, kind, ci=ci, n_boot=n_resamples, seed=seed)
            if np.isfinite(rec["ratio"].values).any():
                recs[kind] = rec
                tables.append(_to_csv(rec, out / f"recovery_{kind}.csv", written))
    cell = _best_cell(crit)
    adjacent = stats.adjacent_layers(ds, metric, ci=ci, **kw)
    tables.append(_to_csv(adjacent, out / f"adjacent_layers_{metric}.csv", written))
    profile = None if latent else _profile(summaries[metric].sel(cell), adjacent.sel(cell))
    by_steps = None
    if "reasoning_steps" in ds.coords:
        by_steps = stats.by(ds, "reasoning_steps", metric, ci=ci, **kw)
        tables.append(_to_csv(by_steps, out / "by_reasoning_steps.csv", written))

    # ---- figures
    figures: list[tuple[str, str]] = []

    def add(fig: Any, stem: str, caption: str) -> None:
        paths = [written.add(p) for p in plots.save_figure(fig, fig_dir / stem, formats)]
        pick = next((p for p in paths if p.suffix == ".png"), paths[0] if paths else None)
        if pick is not None:
            figures.append((caption, str(pick.relative_to(out).as_posix())))

    if "position" in cell and ds.sizes["position"] > 1:
        # lead with the thought that moves; the panels of every thought come later
        add(
            plots.plot_layer_means(ds.sel(position=[cell["position"]]), metric, ci=ci, **kw),
            f"layer_means_{metric}_thought_{cell['position']}",
            f"Mean {metric} by layer at thought {cell['position']}, the thought with the largest effect, "
            f"with {ci:.0%} bootstrap CI (every thought: the next figure)",
        )
    add(
        plots.plot_layer_means(ds, metric, ci=ci, **kw),
        f"layer_means_{metric}",
        f"Mean {metric} by layer with {ci:.0%} bootstrap CI"
        + (", one panel per continuous thought" if "position" in extras else ""),
    )
    for kind, rec in recs.items():
        add(
            plots.plot_recovery_ratio(ds, kind, rec=rec, ci=ci),
            f"recovery_ratio_{kind}",
            f"Recovery ({kind}) as a ratio of means over pairs, {ci:.0%} paired bootstrap CI",
        )
    for m in metrics[1:]:
        if m == "flipped":
            add(
                plots.plot_layer_means(ds, m, ci=ci, **kw),
                f"layer_means_{m}",
                f"Share of comparable pairs flipped, by layer, with {ci:.0%} exact binomial (Clopper–Pearson) CI",
            )
    if "component" in extras:
        add(plots.plot_components(ds, metric, ci=ci, **kw), f"components_{metric}", f"Components compared ({metric})")
    add(
        plots.plot_pair_heatmap(ds, metric),
        f"pair_heatmap_{metric}",
        f"{metric} per pair × layer (pairs ordered by reasoning steps)",
    )
    add(
        plots.plot_critical_layers(ds, metric, crit=crit),
        f"critical_layers_{metric}",
        f"Top-{crit.sizes['rank']} layers by mean {metric} (dashed line: negligible threshold)",
    )
    if ds.sizes["layer"] > 1:
        add(
            plots.plot_layer_similarity(ds, metric),
            f"layer_similarity_{metric}",
            f"Layer × layer Spearman correlation of {metric}",
        )
    if "position" in extras:
        add(
            plots.plot_position_heatmap(ds, metric),
            f"position_heatmap_{metric}",
            f"{metric} by layer × continuous thought",
        )
    if "head" in extras:
        add(
            plots.plot_position_heatmap(ds, metric, dim="head"),
            f"head_heatmap_{metric}",
            f"{metric} by layer × attention head",
        )

    # ---- document: the finding first, provenance last
    title = f"codi-nnsight report: {ds.attrs.get('model_name', '?')} — {metric}"
    doc = _Doc()
    doc.h(1, title)
    if sequence is not None:
        _sequence_section(doc, sequence, metric, out, fig_dir, formats, written)
    others = _other_thoughts(ds, metric, summaries[metric], cell)
    doc.p(f"**Finding:** {_headline(ds, metric, crit, cell, profile, alpha, ci)}" + (f" {others}" if others else ""))
    doc.img(figures[0][0], figures[0][1])
    lead = 2 if figures[0][1].startswith(f"figures/layer_means_{metric}_thought_") else 1
    n_pairs = ds.sizes["pair"]
    n_comparable = n_pairs - stats.excluded_pairs(ds)["count"]
    layers_txt = "the latent input embedding (no layer)" if latent else plural(ds.sizes["layer"], "layer")
    doc.p(
        f"{plural(n_pairs, 'pair')} ({n_comparable} with different clean and corrupted answers), "
        f"{layers_txt}, mode = {ds.attrs.get('mode', '?')}, direction = {ds.attrs.get('direction', '?')}."
    )
    doc.h(2, "What the numbers say")
    for para in _narrative(ds, metric, crit, tests, recs, alpha, ci, n_resamples, seed, profile):
        doc.p(para)
    doc.h(2, "What was patched and measured")
    mode, direction = str(ds.attrs.get("mode", "")), str(ds.attrs.get("direction", ""))
    mode = MODE_ALIASES.get(mode, mode)  # files written before the modes were named after what they block
    doc.p(MODE_TEXT.get(mode, f"Mode `{mode}` (not described in this version of codi-nnsight)."))
    doc.p(DIRECTION_TEXT.get(direction, f"Direction `{direction}` (not described in this version of codi-nnsight)."))
    if "position" in ds.dims:
        doc.p(POSITION_TEXT)
    excluded = stats.excluded_pairs(ds)
    doc.p(
        f"Pairs counted out of flip and recovery summaries: {excluded['count']} of {excluded['total']}"
        + (f" ({excluded['reason']})." if excluded["count"] else ".")
    )
    thr_text = _threshold_text(ds, metric)
    doc.p(
        f'An effect on `{metric}` is called negligible below {thr_text}; "significant" is only claimed with at '
        f"least 3 layers and enough pairs for the test to reach p < {alpha}."
        if thr_text
        else f"No negligible threshold is defined for `{metric}`."
    )
    doc.p(
        f"Numbers are shown with 4 significant digits; CIs are {ci:.0%} bootstrap CIs over pairs "
        f"({n_resamples} resamples, seed {seed})."
    )
    doc.h(2, "Sanity checks")
    _sanity(doc, ds)
    doc.h(2, "Per-layer table")
    words = stats.unit_words(ds, metric)
    doc.p(f"`{metric}`{f' ({words})' if words else ''}, mean over pairs; n = pairs with a value.")
    doc.table(*_summary_table(summaries[metric], ci, latent))
    if "flipped" in summaries and metric != "flipped":
        doc.h(3, "Share of pairs flipped to the source answer")
        doc.p("`flipped` (share of comparable pairs, 0 to 1).")
        doc.table(*_summary_table(summaries["flipped"], ci, latent))
    doc.h(2, "Recovery")
    if recs:
        doc.p(
            "Recovery as a ratio of means over pairs: mean(patched − baseline) / mean(source − baseline), with a "
            "paired bootstrap CI (pairs resampled). Pairs with equal answers or a missing value are left out."
        )
        for kind, rec in recs.items():
            doc.h(
                3, {"logit": "First-token logit difference", "logprob": "Full-answer log-probability difference"}[kind]
            )
            doc.table(*_recovery_table(rec, ci, latent))
    else:
        doc.p("No recovery could be computed from this file.")
    doc.h(2, "Adjacent layers")
    if adjacent.sizes["layer"] == 0:
        doc.p("Only one layer was swept: there are no adjacent layers to compare.")
    else:
        doc.p(
            "Each layer against the layer before it, paired over pairs"
            + _sel_text(cell)
            + f": difference = mean over pairs of (this layer − previous layer), with its {ci:.0%} bootstrap CI; "
            "d_z = that mean / the standard deviation of the paired differences (an effect size: 0.2 small, "
            "0.5 medium, 0.8 large); p: two-sided Wilcoxon signed-rank test; p (BH): Benjamini–Hochberg adjusted "
            f"over the steps. Every cell is in `adjacent_layers_{metric}.csv`."
        )
        doc.table(*_adjacent_table(adjacent.sel(cell), ci))
    doc.h(2, "Critical layers")
    doc.p(
        "Each layer is tested against the mean of all other layers. On a curve that rises and stays up every "
        "layer after the rise passes this test, so a significant layer here is not a peak; the adjacent-layer "
        "comparisons above say where the effect changes."
    )
    doc.p(
        f"Top {crit.sizes['rank']} layers by mean {metric}. Excess: mean over pairs of (layer value − mean of the "
        f"other layers). p: one-sided Wilcoxon signed-rank test, across pairs, of that excess > 0; p (BH): "
        f"Benjamini–Hochberg adjusted over all {plural(ds.sizes['layer'], 'layer')}"
        + (" within each " + "/".join(map(str, extras)) + " cell" if extras else "")
        + f"; significant: p (BH) < {alpha} (untestable: fewer than 3 layers, or too few pairs to reach it); "
        f"negligible: |excess| below the threshold above."
    )
    doc.table(*_critical_table(crit, ci, latent))
    doc.h(2, "Per-reasoning-steps breakdown")
    if by_steps is None:
        doc.p("No `reasoning_steps` coordinate in this file.")
    else:
        _steps_section(doc, by_steps, cell, ci)
    doc.h(2, "Figures")
    if lead == 2:
        doc.img(figures[1][0], figures[1][1])
    for caption, rel in figures[lead:]:
        doc.img(caption, rel)
    doc.p("CSV tables: " + ", ".join(f"`{p.name}`" for p in tables) + ".")
    doc.h(2, "Provenance")
    _provenance(doc, ds)

    md_path = out / "report.md"
    md_path.write_text(doc.markdown(), encoding="utf-8")
    written.add(md_path)
    (out / "report.html").write_text(doc.html(out, title), encoding="utf-8")
    written.add(out / "report.html")
    return md_path


def _sequence_section(
    doc: _Doc, ds: xr.Dataset, metric: str, out: Path, fig_dir: Path, formats: Sequence[str], written: ReportFiles
) -> None:
    """A sequence sweep's view first: where along question → thoughts → answer prompt the answer
    moves; the per-thought analysis follows (its thoughts are an `each` sweep's patches)."""
    finding = sequence_finding(ds, metric)
    if finding:
        doc.p(f"**Finding along the sequence:** {finding}")
    paths = [
        written.add(p) for p in plots.save_figure(plot_sequence(ds, metric), fig_dir / f"sequence_{metric}", formats)
    ]
    pick = next((p for p in paths if p.suffix == ".png"), paths[0] if paths else None)
    if pick is not None:
        doc.img(
            f"Mean {metric} over pairs at every token and layer; left, the changed number's tokens aligned per pair",
            str(pick.relative_to(out).as_posix()),
        )
    doc.p("The rest of this report analyses the thoughts of this sweep, as a `--positions each` sweep's report does.")


def _steps_section(doc: _Doc, by_steps: xr.Dataset, cell: dict[Hashable, Any], ci: float) -> None:
    b = by_steps.sel(cell) if cell else by_steps
    doc.p(
        "Per group of pairs with the same number of reasoning steps (−1 = unknown): the layer "
        "with the largest mean" + _sel_text(cell) + ", its mean and CI. Full per-layer "
        "numbers are in `by_reasoning_steps.csv`."
    )
    rows = []
    for steps in b["reasoning_steps"].values:
        g = b.sel(reasoning_steps=steps)
        means = g["mean"].values
        if not np.isfinite(means).any():
            continue
        j = int(np.nanargmax(means))
        s = g.isel(layer=j)
        rows.append(
            [
                str(steps),
                str(int(g["n_pairs"].item())),
                str(int(g["layer"].values[j])),
                fmt(s["mean"].item()),
                fmt_ci(s["ci_low"].item(), s["ci_high"].item()),
            ]
        )
    doc.table(["reasoning_steps", "pairs", "peak layer", "mean", f"{ci:.0%} CI"], rows)
