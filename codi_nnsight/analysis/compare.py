"""Several models (or latent methods) side by side: results stacked on a `model` dimension.

`compare_models(["codi.nc", "coconut.nc"])` loads results of the same kind made on the same
pairs, checks that they can be compared, and returns one Dataset with a new `model` dimension
(labels travel with the data: each model's method, checkpoint hash and depth are coordinates on
it). Every analysis then works across models: `stats.layer_summary` keeps `model` as a cell
dimension, `plots.plot_layer_means(ds, hue="model")` draws the profiles in one figure.
`write_comparison` writes that figure, the stacked file, a table and a short report whose first
sentence is the finding (where each model's effect peaks, and where two models differ, paired
per pair with bootstrap CIs).

Models of different depths compare on the union of their layers (NaN where a model has no such
layer); the pairs must be the same (the comparison is paired), so results made on different
pairs files are refused in one line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from . import stats
from .io import ResultsError, check_metric, load
from .sequence import is_sequence, thought_view

__all__ = ["MODEL_COORDS", "compare_models", "comparison_summary", "finding_lines", "write_comparison"]

#: Attributes that differ between models and travel as coordinates on the `model` dimension.
MODEL_COORDS = ("latent_method", "model_name", "checkpoint_sha256", "num_latent", "n_layers_model", "dtype")


def _label(ds: xr.Dataset, i: int) -> str:
    attrs = ds.attrs  # sweeps name the model `model_name`, readout-style files `model`
    return str(attrs.get("model_name") or attrs.get("model") or attrs.get("latent_method") or f"model {i}")


def _names(dss: list[xr.Dataset], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(dss):
            raise ResultsError(f"compare: {len(names)} names for {len(dss)} results")
        if len(set(names)) != len(names):
            raise ResultsError(f"compare: names must differ, got {', '.join(names)}")
        return names
    base = [_label(ds, i) for i, ds in enumerate(dss)]
    out = []
    for i, b in enumerate(base):
        # the same model twice (e.g. two checkpoints of one name): number them, in input order
        out.append(b if base.count(b) == 1 else f"{b} #{base[:i].count(b) + 1}")
    return out


def _source(ds: xr.Dataset, i: int) -> str:
    return str(ds.encoding.get("codi_nnsight_name") or ds.encoding.get("source") or f"results {i}")


def _check_comparable(dss: list[xr.Dataset]) -> None:
    """One-line refusals: a different result kind, other dimensions, or other pairs."""
    first, name0 = dss[0], _source(dss[0], 0)
    kind0 = first.attrs.get("result_kind", "sweep")
    dims0 = set(first["kl"].dims) if "kl" in first else set(first.dims)
    for i, ds in enumerate(dss[1:], start=1):
        name = _source(ds, i)
        kind = ds.attrs.get("result_kind", "sweep")
        if kind != kind0:
            raise ResultsError(f"compare: {name} is a {kind} file and {name0} a {kind0} file; compare like with like")
        dims = set(ds["kl"].dims) if "kl" in ds else set(ds.dims)
        if dims != dims0:
            raise ResultsError(
                f"compare: {name} has dims ({', '.join(sorted(map(str, dims)))}) and {name0} "
                f"({', '.join(sorted(map(str, dims0)))}); run both with the same --component/--positions"
            )
        if "pair" in ds.dims and not np.array_equal(ds["pair"].values, first["pair"].values):
            raise ResultsError(
                f"compare: {name} and {name0} hold different pairs; "
                "the comparison is paired, run both on one pairs file"
            )
        for q in ("question_clean", "question_corrupted"):
            if q in ds.coords and q in first.coords and not np.array_equal(ds[q].values, first[q].values):
                raise ResultsError(f"compare: {name} and {name0} have other questions under the same pair ids ({q})")


def compare_models(
    sources: Sequence[str | Path | xr.Dataset],
    names: Sequence[str] | None = None,
) -> xr.Dataset:
    """Stack results of several models on a new `model` dimension (see the module docstring).

    `sources`: results files or loaded Datasets, at least two, of one kind, on the same pairs;
    A `--positions sequence` sweep is compared on its thoughts (`analysis.sequence.thought_view`).
    `names`: the model labels (default: each file's `model_name`, numbered when repeated).
    Attributes all results share are kept; those that differ become coordinates on `model`
    (`MODEL_COORDS`) or are listed per model in the `compared` attribute (json).
    """
    if len(sources) < 2:
        raise ResultsError(f"compare: needs at least two results, got {len(sources)}")
    dss = [s if isinstance(s, xr.Dataset) else load(s) for s in sources]
    # A sequence sweep's token axis follows each model's tokenizer: models are compared on its
    # thoughts, which are the `--positions each` sweep's patches.
    dss = [thought_view(d) if is_sequence(d) else d for d in dss]
    _check_comparable(dss)
    labels = _names(dss, names)
    shared = {k: v for k, v in dss[0].attrs.items() if all(_same(ds.attrs.get(k), v) for ds in dss[1:])}
    per_model = [{k: v for k, v in ds.attrs.items() if k not in shared} for ds in dss]
    coords = {key: ("model", [str(ds.attrs.get(key, "")) for ds in dss]) for key in MODEL_COORDS if key not in shared}
    stripped = [ds.drop_attrs(deep=False) for ds in dss]
    stacked = xr.concat(
        stripped,
        dim=pd.Index(labels, name="model"),
        join="outer",  # models of other depths: the union of layers, NaN where a model has none
        coords="minimal",
        compat="override",  # per-pair text is the same (checked above)
        combine_attrs="drop",
    )
    stacked = stacked.assign_coords(coords)
    stacked.attrs.update(shared)
    stacked.attrs["compared"] = json.dumps(
        [
            {"model": m, "source": _source(ds, i), **{k: _plain(v) for k, v in attrs.items()}}
            for i, (m, ds, attrs) in enumerate(zip(labels, dss, per_model))
        ]
    )
    stacked.attrs["model_name"] = " vs ".join(labels)
    return stacked


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except Exception:  # attrs of odd types: unequal
        return False


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v if isinstance(v, (int, float, str)) else str(v)


def comparison_summary(ds: xr.Dataset, metric: str = "kl", ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Per model: the layer of the largest mean `metric` with its CI; for each later model, the
    layers where it differs from the first (paired bootstrap CI of the difference excludes 0).

    Other dims (thought position, component) are averaged per pair first, as the figure does.
    """
    if "model" not in ds.dims:
        raise ResultsError("comparison_summary: the Dataset has no model dimension (use compare_models)")
    check_metric(ds, metric)
    keep_dims = {"pair", "layer", "model"}
    da = stats.metric_array(ds, metric)
    other = [d for d in da.dims if d not in keep_dims]
    flat = ds.assign({metric: da.mean(other, skipna=True) if other else da})
    summ = stats.layer_summary(flat, metric, ci=ci, seed=seed)
    models = [str(m) for m in ds["model"].values]
    out: dict[str, Any] = {"metric": metric, "ci": ci, "models": {}, "differences": {}}
    for m in models:
        s = summ.sel(model=m)
        mean = s["mean"].values
        if not np.isfinite(mean).any():
            out["models"][m] = None
            continue
        j = int(np.nanargmax(mean))
        out["models"][m] = {
            "peak_layer": int(s["layer"].values[j]),
            "mean": float(mean[j]),
            "ci_low": float(s["ci_low"].values[j]),
            "ci_high": float(s["ci_high"].values[j]),
            "n": int(s["n"].values[j]),
        }
    ref = flat.sel(model=models[0])
    for m in models[1:]:
        cmp = stats.compare(flat.sel(model=m), ref, metric, seed=seed, ci=ci)
        layers = cmp["layer"].values
        lo, hi = cmp["ci_low"].values, cmp["ci_high"].values
        both = cmp["n"].values > 0  # layers both models have (another depth: NaN elsewhere)
        out["differences"][m] = {
            "against": models[0],
            "higher_at": [int(x) for x in layers[both & (lo > 0)]],
            "lower_at": [int(x) for x in layers[both & (hi < 0)]],
            "n_layers": int(both.sum()),
        }
    return out


def finding_lines(summary: dict[str, Any], units: str) -> list[str]:
    """The report's first sentences: each model's peak, then where later models differ from the first."""
    ci = summary["ci"]
    parts = []
    for m, s in summary["models"].items():
        if s is None:
            parts.append(f"{m} has no defined {summary['metric']}")
            continue
        parts.append(
            f"{m} peaks at layer {s['peak_layer']} (mean {s['mean']:.3g} {units}, "
            f"{ci:.0%} CI {s['ci_low']:.3g}–{s['ci_high']:.3g}, n={s['n']})"
        )
    lines = ["; ".join(parts) + "."]
    for m, d in summary["differences"].items():
        hi, lo = d["higher_at"], d["lower_at"]
        if not hi and not lo:
            lines.append(
                f"{m} and {d['against']} do not differ at any of {d['n_layers']} shared layers "
                f"(paired {ci:.0%} bootstrap CI of the difference includes 0 everywhere)."
            )
            continue
        said = []
        if hi:
            said.append(f"higher than {d['against']} at layers {', '.join(map(str, hi))}")
        if lo:
            said.append(f"lower at layers {', '.join(map(str, lo))}")
        lines.append(
            f"{m} is {' and '.join(said)} (paired {ci:.0%} bootstrap CI of the difference excludes 0; "
            f"not corrected for {d['n_layers']} layers)."
        )
    return lines


def write_comparison(
    ds: xr.Dataset,
    out_dir: str | Path,
    metric: str = "kl",
    force: bool = False,
    seed: int = 0,
) -> Path:
    """Write `comparison.nc`, `figures/profile_<metric>.png`, `summary.json`, `report.md` and
    `report.html` (figure embedded) into `out_dir`; return the path of `report.md`.

    The folder rules are the report's (`prepare_report_dir`): a folder holding a report or other
    files is refused without `force`, and only files an earlier report listed are replaced.
    """
    from ..run.writer import write_results
    from .plots import plot_layer_means, save_figure
    from .report import ReportFiles, _Doc, clear_report_files, prepare_report_dir

    check_metric(ds, metric)
    summary = comparison_summary(ds, metric, seed=seed)  # everything computed before a file is touched
    out = prepare_report_dir(out_dir, force)
    clear_report_files(out)
    out.mkdir(parents=True, exist_ok=True)
    written = ReportFiles(out)
    try:
        (out / "figures").mkdir(exist_ok=True)
        fig = plot_layer_means(ds, metric, hue="model", seed=seed)
        for p in save_figure(fig, out / "figures" / f"profile_{metric}", formats=("png",)):
            written.add(p)
        nc = write_results(ds, out / "comparison.nc")
        written.add(nc)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        written.add(out / "summary.json")
        units = stats.unit_words(ds, metric)
        doc = _Doc()
        models = [str(m) for m in ds["model"].values]
        doc.h(1, f"{' vs '.join(models)}: {metric} by layer")
        for line in finding_lines(summary, units):
            doc.p(line)
        doc.img(f"Mean {metric} by layer per model, {summary['ci']:.0%} CI", f"figures/profile_{metric}.png")
        rows = []
        for m in models:
            s = summary["models"][m]
            method = str(ds["latent_method"].sel(model=m).values) if "latent_method" in ds.coords else ""
            rows.append(
                [m, method]
                + (
                    ["–"] * 3
                    if s is None
                    else [str(s["peak_layer"]), f"{s['mean']:.4g}", f"{s['ci_low']:.4g}–{s['ci_high']:.4g}"]
                )
            )
        doc.table(["model", "method", "peak layer", f"mean {metric}", f"{summary['ci']:.0%} CI"], rows)
        doc.p(
            "Other dimensions (thought position, component) are averaged per pair before the layer means; "
            "models of other depths are compared on the layers they share."
        )
        (out / "report.md").write_text(doc.markdown(), encoding="utf-8")
        written.add(out / "report.md")
        (out / "report.html").write_text(doc.html(out, f"comparison: {' vs '.join(models)}"), encoding="utf-8")
        written.add(out / "report.html")
    finally:
        written.save()
    return out / "report.md"
