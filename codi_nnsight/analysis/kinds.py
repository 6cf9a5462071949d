"""Summaries and reports for the result kinds beyond the sweep: attribution and early exit.

Which kind a file is, and what its metrics mean, come from the file itself (the `result_kind`
and `metric_info` attrs of the output contract, `codi_nnsight.contract`), so `analyze` and
`report` accept the output of every command. The report leads with the finding, gives effect
sizes with their intervals, and says what the numbers cannot show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..contract import RESULT_KINDS, kind_of_schema, metric_info
from .io import ResultsError


def result_kind(ds: xr.Dataset, name: str = "dataset") -> str:
    """The file's result kind (`sweep`, `attribution`, `early-exit`, `lens`, ...); one line if none."""
    kind = ds.attrs.get("result_kind")
    if kind in RESULT_KINDS:
        return str(kind)
    found = kind_of_schema(ds.attrs.get("codi_nnsight_schema", ""))
    if found is None:
        raise ResultsError(f"{name}: not a codi-nnsight results file (attr codi_nnsight_schema missing or unknown)")
    return found.name


def check_kind(ds: xr.Dataset, name: str = "dataset") -> str:
    """The kind, after checking the file has every dim its kind declares (one-line error otherwise)."""
    kind = result_kind(ds, name)
    for dim in RESULT_KINDS[kind].dims:
        if dim not in ds.dims:
            raise ResultsError(f"{name}: malformed {kind} file (dimension {dim!r} missing)")
    return kind


# --------------------------------------------------------------------------- early exit
def accuracy_by_thoughts(ds: xr.Dataset) -> xr.Dataset:
    """Per number of thoughts and variant: share correct with its exact 95% binomial interval, and mean log p."""
    from .stats import binomial_ci

    correct = ds["correct"]
    k = correct.notnull().sum("pair")
    n_ok = correct.fillna(0).sum("pair")
    lo, hi = xr.apply_ufunc(
        lambda s, n: np.vectorize(lambda a, b: binomial_ci(int(a), int(b)) if b else (np.nan, np.nan))(s, n),
        n_ok,
        k,
        output_core_dims=[[], []],
    )
    return xr.Dataset(
        {
            "accuracy": n_ok / k,
            "ci_low": lo,
            "ci_high": hi,
            "n": k,
            "mean_logp_answer": ds["logp_answer"].mean("pair"),
        }
    )


def early_exit_summary(ds: xr.Dataset) -> str:
    """The accuracy-versus-thoughts table of an early-exit file."""
    acc = accuracy_by_thoughts(ds)
    lines = [f"early exit — {ds.attrs.get('model_name', '')}, {ds.sizes['pair']} pairs (accuracy, exact 95% CI)"]
    lines.append(f"{'thoughts':>8}  " + "  ".join(f"{v:>26}" for v in ds["variant"].values))
    for k in ds["n_latent"].values:
        cells = []
        for v in ds["variant"].values:
            a = acc.sel(n_latent=k, variant=v)
            cells.append(
                f"{float(a['accuracy']):6.1%} [{float(a['ci_low']):5.1%}, {float(a['ci_high']):5.1%}]"
                f" lp {float(a['mean_logp_answer']):6.2f}"
            )
        lines.append(f"{int(k):>8}  " + "  ".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


def _early_exit_finding(ds: xr.Dataset) -> list[str]:
    acc = accuracy_by_thoughts(ds).mean("variant") if "variant" in ds.dims else accuracy_by_thoughts(ds)
    ks = [int(k) for k in ds["n_latent"].values]
    first, last = acc.sel(n_latent=ks[0]), acc.sel(n_latent=ks[-1])
    out = [
        f"With {ks[-1]} thoughts the model answers {float(last['accuracy']):.1%} of the questions correctly "
        f"(clean and corrupted together), with {ks[0]} thoughts {float(first['accuracy']):.1%}: "
        f"{100 * (float(last['accuracy']) - float(first['accuracy'])):+.1f} percentage points."
    ]
    per_k = [float(acc.sel(n_latent=k)["accuracy"]) for k in ks]
    best = ks[int(np.argmax(per_k))]
    reach = next(k for k, a in zip(ks, per_k) if a >= max(per_k) - 1e-12)
    out.append(
        f"Accuracy first reaches its maximum ({max(per_k):.1%}) after {reach} thought(s)"
        + (f"; the most accurate count is {best}." if best != reach else ".")
    )
    return out


# --------------------------------------------------------------------------- attribution
def attribution_summary(ds: xr.Dataset, metric: str | None = None) -> str:
    """The per-layer (and position) table of an attribution file, with bootstrap CIs and BH-corrected tests."""
    from .report import format_layer_table

    return format_layer_table(ds, metric or str(RESULT_KINDS["attribution"].default_metric))


def _attribution_finding(ds: xr.Dataset, metric: str) -> list[str]:
    mean = ds[metric].mean("pair")
    flat = np.abs(np.nan_to_num(mean.values, nan=0.0))
    idx = np.unravel_index(int(np.argmax(flat)), flat.shape)
    where = ", ".join(f"{d} {int(mean[d].values[i])}" for d, i in zip(mean.dims, idx))
    value = float(mean.values[idx])
    info = metric_info(ds.attrs, metric)
    out = [
        f"The largest attributed effect on {metric} is at {where}: mean {value:+.4g} {info.units} over "
        f"{int(ds[metric].notnull().isel({d: int(i) for d, i in zip(mean.dims, idx)}).sum())} pairs."
    ]
    if info.negligible and abs(value) < info.negligible:
        out.append(f"That is below the negligible size {info.negligible:g} {info.units} ({info.negligible_why}).")
    out.append(
        "Attribution patching is a first-order (gradient) estimate of each patch's effect: it can miss "
        "effects that are not linear in the activation, so check the top sites with the exact sweep "
        "(`attribute --verify N`, or `patch` on those layers) before reading them as causal."
    )
    return out


def verification_sentence(attrs: dict[str, Any]) -> str:
    """What `attribute --verify` found, in words (from the attrs it stores), or "" when not run."""
    import json

    raw = attrs.get("verify_comparison")
    if not raw:
        return ""
    parts = []
    for comp, c in json.loads(raw).items():
        parts.append(
            f"{comp}: Spearman {c['spearman']:.3f} over {c['n_sites']} sites (pair means), "
            f"{c['spearman_pairs']:.3f} over every pair, top-{c['k']} recall {c['top_k_recall']:.2f}"
        )
    return (
        f"Checked against the exact sweep on layers {attrs.get('verify_layers', '')} (the layers AtP ranks "
        f"highest): " + "; ".join(parts) + "."
    )


# --------------------------------------------------------------------------- reports
#: The result kinds whose report `write_kind_report` writes (sweeps and readouts have their own writers).
KIND_REPORTS = ("attribution", "early-exit", "transplant", "steer", "thought-graph")
#: The interventions on thoughts (`codi_nnsight.interventions`), summarized by `analysis.interventions`.
INTERVENTION_KINDS = ("transplant", "steer", "thought-graph")


def summary(ds: xr.Dataset, metric: str | None = None) -> str:
    """The text `analyze` prints for a file of any kind."""
    kind = check_kind(ds)
    if kind in INTERVENTION_KINDS:
        from .interventions import intervention_summary, intervention_table

        return intervention_summary(ds) + "\n\n" + intervention_table(ds)
    if kind == "early-exit":
        return early_exit_summary(ds)
    if kind == "attribution":
        return attribution_summary(ds, metric)
    if kind in ("lens", "attention", "probe"):
        from .readouts import readout_summary

        return readout_summary(ds)
    from .report import format_layer_table

    return format_layer_table(ds, metric or "kl")


def write_kind_report(ds: xr.Dataset, out: str | Path, metric: str | None = None) -> Path:
    """`report.md` and `report.html` (finding first, a figure, the table, provenance) for a file of
    one of `KIND_REPORTS` in folder `out`; returns the markdown path. Only files an earlier report's
    manifest lists are deleted first."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .report import ReportFiles, _Doc, _provenance, clear_report_files

    kind = check_kind(ds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_report_files(out)
    written = ReportFiles(out)
    doc = _Doc()
    model = ds.attrs.get("model_name") or ds.attrs.get("model", "")  # readout-style files say `model`
    title = f"{RESULT_KINDS[kind].description} — {model}"
    doc.h(1, title)
    try:
        fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
        if kind == "early-exit":
            doc.h(2, "Finding")
            for s in _early_exit_finding(ds):
                doc.p(s)
            _plot_accuracy(ax, ds)
            name, table = "accuracy_by_thoughts.png", early_exit_summary(ds)
        elif kind == "attribution":
            metric = metric or RESULT_KINDS["attribution"].default_metric
            doc.h(2, "Finding")
            for s in _attribution_finding(ds, metric):
                doc.p(s)
            checked = verification_sentence(ds.attrs)
            if checked:
                doc.h(2, "Check against the exact sweep")
                doc.p(checked)
            _plot_attribution(fig, ax, ds, metric)
            name, table = f"attribution_{metric}.png", attribution_summary(ds, metric)
        elif kind in INTERVENTION_KINDS:
            from .interventions import intervention_summary, intervention_table, plot_intervention

            doc.h(2, "Finding")
            doc.p(intervention_summary(ds))
            plot_intervention(ds, ax=ax)
            name, table = f"{kind}.png", intervention_table(ds)
        else:
            raise ResultsError(f"{kind} files get their report from the sweep or readout report writers")
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.add(out / name)
        doc.img(name, name)
        doc.h(2, "Table")
        doc.code(table)
        doc.h(2, "Provenance")
        _provenance(doc, ds)
        md = out / "report.md"
        md.write_text(doc.markdown(), encoding="utf-8")
        written.add(md)
        html_path = out / "report.html"
        html_path.write_text(doc.html(out, title), encoding="utf-8")
        written.add(html_path)
    finally:
        written.save()
    return md


def _plot_accuracy(ax: Any, ds: xr.Dataset) -> None:
    acc = accuracy_by_thoughts(ds)
    ks = ds["n_latent"].values
    for v in ds["variant"].values:
        a = acc.sel(variant=v)
        y = a["accuracy"].values
        err = np.vstack([y - a["ci_low"].values, a["ci_high"].values - y])
        ax.errorbar(ks, y, yerr=err, marker="o", capsize=3, label=str(v))
    ax.set_xlabel("continuous thoughts before the answer")
    ax.set_ylabel("share correct (exact 95% CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(ks)
    ax.legend(loc="lower right")
    ax.set_title("Accuracy after k thoughts")


def _plot_attribution(fig: Any, ax: Any, ds: xr.Dataset, metric: str) -> None:
    mean = ds[metric].mean("pair")
    extra = [d for d in mean.dims if d not in ("layer", "position")]
    if extra:
        mean = mean.mean(extra)
    if "position" in mean.dims:
        data = mean.transpose("layer", "position").values
        lim = float(np.nanmax(np.abs(data))) or 1.0
        im = ax.imshow(data, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xlabel("continuous thought (position)")
        fig.colorbar(im, ax=ax, label=f"mean {metric} ({metric_info(ds.attrs, metric).units})")
    else:
        ax.bar(mean["layer"].values, mean.values)
        ax.set_xlabel("layer")
    ax.set_ylabel("layer" if "position" in mean.dims else f"mean {metric}")
    ax.set_title(f"Attribution: mean {metric} per site")
