"""Statistics over a results Dataset: per-layer summaries, critical layers, comparisons.

Every function takes the results ``xr.Dataset`` (see ``docs/results-schema.md``) and reduces over
the ``pair`` dimension while keeping every other dimension (``layer`` and, when present,
``position`` / ``component``). Tests across layers are done separately for each combination of
the extra dimensions.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats as sps

from ..contract import METRICS as CONTRACT_METRICS
from .io import NOT_SUMMARIZABLE, ResultsError

SUMMARY_VARS = ("mean", "std", "sem", "median", "ci_low", "ci_high", "n")

#: Per metric: the size below which an effect is called negligible, and why — from the output contract
#: (`codi_nnsight.contract`), which every results file also carries in its `metric_info` attr.
#: "Significant" in the report is always paired with this judgement: with many pairs a test can
#: detect a difference far too small to matter.
NEGLIGIBLE: dict[str, tuple[float, str]] = {
    m: (i.negligible, i.negligible_why) for m, i in CONTRACT_METRICS.items() if i.negligible
}

#: Units in words for axis labels and the report (the file's ``units`` attr says "1" for several).
UNIT_WORDS = {m: i.units for m, i in CONTRACT_METRICS.items() if i.units and i.direction != "value"}

#: Metrics that only mean something when the clean and corrupted answers differ: pairs with
#: equal answers (``comparable`` == 0) are counted out of their summaries.
COMPARISON_METRICS = tuple(m for m, i in CONTRACT_METRICS.items() if i.needs_distinct_answers)

#: Metrics that are a 0/1 outcome per pair: their mean is a proportion, so its CI is an exact
#: (Clopper–Pearson) binomial interval, not a bootstrap one (a bootstrap of 24 successes out of
#: 24 gives the useless interval 100%–100%; the exact interval is 85.8%–100%).
PROPORTION_METRICS = tuple(m for m, i in CONTRACT_METRICS.items() if i.proportion)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def negligible_threshold(metric: str) -> float:
    """The :data:`NEGLIGIBLE` threshold of ``metric`` (0.0 = no threshold known)."""
    return NEGLIGIBLE.get(metric, (0.0, ""))[0]


def unit_words(ds: xr.Dataset, metric: str) -> str:
    """Units of ``metric`` in words ("nats", "share of pairs"); "" when it has none."""
    if metric in UNIT_WORDS:
        return UNIT_WORDS[metric]
    units = str(ds[metric].attrs.get("units", "")) if metric in ds else ""
    return "" if units == "1" else units


def comparable_pairs(ds: xr.Dataset) -> np.ndarray:
    """Boolean mask over ``pair``: True where the clean and corrupted answers differ.

    Uses ``comparable`` when present; a pair whose ``flipped`` is NaN everywhere is also counted
    out (schema 2 writes NaN there exactly when there is no flip to measure).
    """
    mask = np.ones(ds.sizes["pair"], dtype=bool)
    if "comparable" in ds:
        mask &= ds["comparable"].values == 1
    if "flipped" in ds and "pair" in ds["flipped"].dims:
        f = ds["flipped"].transpose("pair", ...).values.reshape(ds.sizes["pair"], -1)
        mask &= np.isfinite(f).any(axis=1)
    return mask


def excluded_pairs(ds: xr.Dataset) -> dict[str, Any]:
    """Pairs left out of flip and recovery summaries because there is nothing to measure.

    Returns ``{"count", "total", "pair_ids", "reason", "message"}``; ``message`` is one line for
    the CLI and report ("" when no pair is excluded).
    """
    keep = comparable_pairs(ds)
    ids = [int(v) if isinstance(v, (int, np.integer)) else v for v in ds["pair"].values[~keep].tolist()]
    total = int(ds.sizes["pair"])
    reason = "their clean and corrupted answers are equal, so there is no flip or recovery to measure"
    count = len(ids)
    message = ""
    if count:
        shown = ", ".join(map(str, ids[:10])) + (", …" if count > 10 else "")
        message = (
            f"{_plural(count, 'pair')} of {total} excluded from flip and recovery summaries "
            f"({reason}): pair id{'s' if count > 1 else ''} {shown}"
        )
    return {"count": count, "total": total, "pair_ids": ids, "reason": reason, "message": message}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def metric_array(ds: xr.Dataset, metric: str) -> xr.DataArray:
    """Return ``ds[metric]`` after checking it is a metric over ``pair`` and ``layer``.

    For the :data:`COMPARISON_METRICS` pairs with equal answers are set to NaN (counted out).
    Raises :class:`ResultsError` for variables in :data:`NOT_SUMMARIZABLE` such as ``answer``.
    """
    if metric in NOT_SUMMARIZABLE and metric in ds.data_vars:
        raise ResultsError(f"metric {metric!r} cannot be summarised: {NOT_SUMMARIZABLE[metric]}")
    if metric not in ds.data_vars:
        available = ", ".join(
            str(v) for v in ds.data_vars if {"pair", "layer"} <= set(ds[v].dims) and v not in NOT_SUMMARIZABLE
        )
        raise ResultsError(f"metric {metric!r} not in results (available: {available})")
    da = ds[metric]
    if "pair" not in da.dims or "layer" not in da.dims:
        raise ResultsError(f"variable {metric!r} does not have dims (pair, layer)")
    if metric in COMPARISON_METRICS:
        keep = comparable_pairs(ds)
        if not keep.all():
            da = da.where(xr.DataArray(keep, dims="pair", coords={"pair": ds["pair"]})).assign_attrs(da.attrs)
    return da


def extra_dims(da: xr.DataArray | xr.Dataset) -> list[Hashable]:
    """Dimensions other than ``pair`` and ``layer`` (e.g. ``position``, ``component``)."""
    return [d for d in da.dims if d not in ("pair", "layer")]


def _kept_coords(da: xr.DataArray, dims: Sequence[Hashable]) -> dict[Hashable, xr.DataArray]:
    """Coordinates of ``da`` that live entirely on ``dims`` (drops per-pair coordinates)."""
    return {name: c for name, c in da.coords.items() if set(c.dims) <= set(dims) and c.dims != ()}


def _base_attrs(ds: xr.Dataset, metric: str, da: xr.DataArray) -> dict[str, Any]:
    attrs = dict(ds.attrs)
    attrs.update(
        metric=metric,
        metric_units=str(da.attrs.get("units", "")),
        metric_long_name=str(da.attrs.get("long_name", metric)),
    )
    return attrs


def summarize_1d(
    x: np.ndarray,
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "BCa",
) -> dict[str, float]:
    """Summary statistics of one sample, NaNs dropped.

    Returns mean, std (ddof=1), sem, median, ci_low, ci_high (bootstrap CI of the mean) and n.
    With fewer than two values or constant data the CI collapses to the mean (a bootstrap of
    such data is degenerate and scipy would warn or return NaN).
    """
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    n = x.size
    out = dict.fromkeys(SUMMARY_VARS, np.nan)
    out["n"] = float(n)
    if n == 0:
        return out
    mean = float(np.mean(x))
    out["mean"] = mean
    out["median"] = float(np.median(x))
    if n >= 2:
        out["std"] = float(np.std(x, ddof=1))
        out["sem"] = out["std"] / np.sqrt(n)
    if n < 2 or np.ptp(x) == 0 or n_resamples < 1:
        out["ci_low"] = out["ci_high"] = mean
        return out
    lo, hi = _bootstrap_ci(x, ci, n_resamples, seed, method)
    out["ci_low"], out["ci_high"] = lo, hi
    return out


def _bootstrap_ci(x: np.ndarray, ci: float, n_resamples: int, seed: int, method: str) -> tuple[float, float]:
    # A fresh generator per cell: a cell's CI then does not depend on which other cells were
    # computed before it, so sub-selecting the Dataset reproduces the same numbers.
    methods = [method] if method == "percentile" else [method, "percentile"]
    lo = hi = np.nan
    for m in methods:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = sps.bootstrap(
                (x,),
                np.mean,
                n_resamples=n_resamples,
                confidence_level=ci,
                method=m,
                vectorized=True,
                rng=np.random.default_rng(seed),
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):  # BCa can fail on skewed/tied data
            break
    return lo, hi


def is_binary(x: np.ndarray) -> bool:
    """True when every finite value of ``x`` is 0 or 1 (and there is at least one)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return bool(x.size) and bool(np.isin(x, (0.0, 1.0)).all())


def binomial_ci(successes: int, n: int, ci: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval of a proportion ``successes / n`` at level ``ci``.

    Exact rather than Wilson so the interval never undercovers; with n = 0 it is (NaN, NaN).
    """
    if n <= 0:
        return np.nan, np.nan
    res = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=ci, method="exact")
    return float(res.low), float(res.high)


def summarize_proportion(x: np.ndarray, ci: float = 0.95) -> dict[str, float]:
    """:func:`summarize_1d` for a 0/1 sample: the same statistics, with the exact binomial CI
    (:func:`binomial_ci`) in place of the bootstrap one."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    out = summarize_1d(x, ci, n_resamples=0)
    out["ci_low"], out["ci_high"] = binomial_ci(int(x.sum()), x.size, ci)
    return out


def wilcoxon_p(d: np.ndarray, alternative: str = "two-sided") -> float:
    """Wilcoxon signed-rank p-value of ``d`` (NaNs dropped); 1.0 when all differences are 0."""
    d = np.asarray(d, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return np.nan
    if np.all(d == 0):
        return 1.0  # no evidence of any shift; scipy would error/warn here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sps.wilcoxon(d, alternative=alternative).pvalue)


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values; NaNs are ignored and stay NaN."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q)
    scaled = q[order] * m / np.arange(1, m + 1)
    # enforce monotonicity from the largest p downwards
    scaled = np.minimum.accumulate(scaled[::-1])[::-1]
    adj = np.empty(m)
    adj[order] = np.clip(scaled, 0.0, 1.0)
    out[ok] = adj
    return out


def _cells(da: xr.DataArray, first: Sequence[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    """Transpose ``da`` to (extra..., *first) and return the values plus the extra dims."""
    extras = [d for d in da.dims if d not in first]
    return da.transpose(*extras, *first).values.astype(float), extras


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def layer_summary(
    ds: xr.Dataset,
    metric: str = "kl",
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    method: str = "BCa",
) -> xr.Dataset:
    """Summarize ``ds[metric]`` over pairs, per layer (and per position/component if present).

    Variables: ``mean``, ``std`` (ddof=1), ``sem``, ``median``, ``ci_low``/``ci_high`` (bootstrap
    CI of the mean at level ``ci``, ``method`` "BCa" falling back to "percentile", seeded with
    ``np.random.default_rng(seed)`` per cell) and ``n`` (number of non-NaN pairs). NaNs are
    skipped per cell; with n < 2 or constant data the CI equals the mean. For the 0/1 metrics in
    :data:`PROPORTION_METRICS` the CI is the exact binomial interval (:func:`binomial_ci`)
    instead; attr ``ci_method`` says which.
    """
    da = metric_array(ds, metric)
    arr, extras = _cells(da, ["pair"])  # pair last, other dims keep their order
    shape = arr.shape[:-1]
    out = {k: np.full(shape, np.nan) for k in SUMMARY_VARS}
    proportion = metric in PROPORTION_METRICS and is_binary(arr)
    for idx in np.ndindex(shape):
        if proportion:
            res = summarize_proportion(arr[idx], ci)
        else:
            res = summarize_1d(arr[idx], ci, n_resamples, seed, method)
        for k, v in res.items():
            out[k][idx] = v
    units = da.attrs.get("units", "")
    data_vars = {}
    for k, v in out.items():
        if k == "n":
            data_vars[k] = (extras, v.astype(np.int64), {"long_name": "non-NaN pairs"})
        else:
            data_vars[k] = (extras, v, {"units": units, "long_name": f"{k} of {metric}"})
    attrs = _base_attrs(ds, metric, da)
    attrs.update(ci=ci, n_resamples=n_resamples, bootstrap_method=method, bootstrap_seed=seed)
    attrs["ci_method"] = "exact binomial (Clopper-Pearson)" if proportion else f"bootstrap ({method})"
    return xr.Dataset(data_vars, coords=_kept_coords(da, extras), attrs=attrs)


def layer_tests(ds: xr.Dataset, metric: str = "kl") -> xr.Dataset:
    """Test each layer against the others, separately per position/component.

    For every pair, ``effect = value(layer) − mean(values of the other layers)``; the p-value is a
    one-sided Wilcoxon signed-rank test that this effect is > 0 across pairs, and ``p_adj`` is
    Benjamini–Hochberg adjusted across all layers (within each position/component cell).
    Variables (dims ``layer`` + extras): ``mean``, ``effect`` (mean of the per-pair effect),
    ``p_value``, ``p_adj``, ``n``.
    """
    da = metric_array(ds, metric)
    arr, extras = _cells(da, ["pair", "layer"])  # (..., pair, layer)
    n_layers = arr.shape[-1]
    shape = arr.shape[:-2] + (n_layers,)
    mean = np.full(shape, np.nan)
    effect = np.full(shape, np.nan)
    p = np.full(shape, np.nan)
    p_adj = np.full(shape, np.nan)
    n = np.zeros(shape, dtype=np.int64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        for idx in np.ndindex(arr.shape[:-2]):
            x = arr[idx]  # (pair, layer)
            finite = np.isfinite(x)
            x0 = np.where(finite, x, 0.0)
            tot = x0.sum(axis=1, keepdims=True)
            cnt = finite.sum(axis=1, keepdims=True)
            # leave-one-out mean of the *other* layers for every (pair, layer)
            d = x - (tot - x0) / (cnt - finite)
            mean[idx] = np.nanmean(x, axis=0)
            effect[idx] = np.nanmean(d, axis=0)
            n[idx] = np.isfinite(d).sum(axis=0)
            if n_layers > 1:  # with a single layer there is nothing to compare against
                p[idx] = [wilcoxon_p(d[:, j], alternative="greater") for j in range(n_layers)]
                p_adj[idx] = bh_adjust(p[idx])
    dims = [*extras, "layer"]
    units = da.attrs.get("units", "")
    data_vars = {
        "mean": (dims, mean, {"units": units}),
        "effect": (dims, effect, {"units": units, "long_name": "mean of value − other layers"}),
        "p_value": (dims, p, {"long_name": "one-sided Wilcoxon signed-rank p"}),
        "p_adj": (dims, p_adj, {"long_name": "Benjamini–Hochberg adjusted p"}),
        "n": (dims, n, {"long_name": "pairs in test"}),
    }
    return xr.Dataset(data_vars, coords=_kept_coords(da, dims), attrs=_base_attrs(ds, metric, da)).transpose(
        "layer", *extras
    )


def adjacent_layers(
    ds: xr.Dataset, metric: str = "kl", ci: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> xr.Dataset:
    """Paired comparison of every swept layer with the one before it, per position/component.

    This is what locates an effect along depth: a test of one layer against the mean of all the
    others (:func:`layer_tests`) is passed by every layer of a curve that rises and stays up, so it
    cannot tell a peak from a plateau. For each step, per pair, ``d = value(layer) − value(previous
    layer)``. Dim ``layer`` holds the later layer of each step (all swept layers but the first), plus
    extras. Variables: ``layer_before`` (the previous swept layer), ``mean_before``, ``mean_after``
    (means over the pairs with both values), ``diff`` (mean of d), ``ci_low``/``ci_high``
    (bootstrap CI of that mean, as :func:`summarize_1d`), ``effect_size`` (d_z = mean(d) / sd(d);
    NaN when d is constant), ``share_up`` (share of pairs with d > 0), ``p_value`` (two-sided
    Wilcoxon signed-rank of d), ``p_adj`` (Benjamini–Hochberg over the steps of the cell) and ``n``.
    With a single layer the result has no steps (``layer`` of size 0).
    """
    da = metric_array(ds, metric)
    arr, extras = _cells(da, ["pair", "layer"])  # (..., pair, layer)
    layers = da["layer"].values
    n_steps = max(layers.size - 1, 0)
    shape = arr.shape[:-2] + (n_steps,)
    names = ("mean_before", "mean_after", "diff", "ci_low", "ci_high", "effect_size", "share_up", "p_value", "p_adj")
    out = {k: np.full(shape, np.nan) for k in names}
    n = np.zeros(shape, dtype=np.int64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for idx in np.ndindex(arr.shape[:-2]):
            x = arr[idx]
            for j in range(n_steps):
                both = np.isfinite(x[:, j]) & np.isfinite(x[:, j + 1])
                d = x[both, j + 1] - x[both, j]
                n[idx + (j,)] = d.size
                if d.size == 0:
                    continue
                res = summarize_1d(d, ci, n_resamples, seed)
                sd = res["std"]
                cell = idx + (j,)
                out["mean_before"][cell] = x[both, j].mean()
                out["mean_after"][cell] = x[both, j + 1].mean()
                out["diff"][cell] = res["mean"]
                out["ci_low"][cell], out["ci_high"][cell] = res["ci_low"], res["ci_high"]
                out["effect_size"][cell] = res["mean"] / sd if np.isfinite(sd) and sd > 0 else np.nan
                out["share_up"][cell] = float((d > 0).mean())
                out["p_value"][cell] = wilcoxon_p(d, "two-sided")
            if n_steps:
                out["p_adj"][idx] = bh_adjust(out["p_value"][idx])
    dims = [*extras, "layer"]
    units = da.attrs.get("units", "")
    long = {
        "mean_before": "mean at the previous layer",
        "mean_after": "mean at this layer",
        "diff": "mean of (this layer − previous layer) over pairs",
        "effect_size": "d_z: mean / standard deviation of the paired difference",
        "share_up": "share of pairs where this layer is higher",
        "p_value": "two-sided Wilcoxon signed-rank p",
        "p_adj": "Benjamini–Hochberg adjusted p over the steps",
    }
    data_vars: dict[str, Any] = {
        k: (
            dims,
            v,
            {
                "long_name": long.get(k, k),
                **({"units": units} if k in ("mean_before", "mean_after", "diff", "ci_low", "ci_high") else {}),
            },
        )
        for k, v in out.items()
    }
    data_vars["n"] = (dims, n, {"long_name": "pairs with both values"})
    data_vars["layer_before"] = ("layer", layers[:-1] if n_steps else layers[:0])
    coords: dict[Hashable, Any] = {d: c for d, c in _kept_coords(da, extras).items()}
    coords["layer"] = layers[1:]
    attrs = _base_attrs(ds, metric, da)
    attrs.update(ci=ci, n_resamples=n_resamples, bootstrap_seed=seed, test="two-sided Wilcoxon signed-rank, paired")
    return xr.Dataset(data_vars, coords=coords, attrs=attrs).transpose("layer", *extras)


def min_p_value(n: int) -> float:
    """Smallest one-sided Wilcoxon signed-rank p-value possible with ``n`` pairs (all positive)."""
    return float(0.5 ** max(int(n), 0))


def is_testable(n: int, n_layers: int, alpha: float) -> bool:
    """Whether "this layer stands out from the others" can be tested and come out significant.

    Needs at least 3 layers with values (with 2 the "other layers" are a single layer, a plain
    paired comparison rather than standing out) and enough pairs that p < ``alpha`` is reachable.
    """
    return n_layers >= 3 and min_p_value(n) < alpha


def critical_layers(
    ds: xr.Dataset,
    metric: str = "kl",
    k: int = 3,
    alpha: float = 0.05,
    ci: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> xr.Dataset:
    """The ``k`` layers with the largest mean ``metric``, with CIs, significance and effect size.

    Computed separately for every position/component cell when those dims exist (the result then
    keeps them). Dims: ``rank`` (1 … k) plus extras. Variables: ``layer``, ``mean``, ``ci_low``,
    ``ci_high``, ``median``, ``n``, ``effect`` (mean excess over the other layers), ``p_value``
    (one-sided paired Wilcoxon signed-rank test of value − mean of other layers > 0),
    ``p_adj`` (Benjamini–Hochberg across *all* layers of the cell), ``testable`` (see
    :func:`is_testable`: at least 3 layers with values in the cell and p < ``alpha`` reachable with
    ``n`` pairs), ``significant`` (``testable`` and ``p_adj < alpha``) and ``negligible``
    (|effect| below the :data:`NEGLIGIBLE` threshold of the metric; attr ``negligible_threshold``).
    """
    summ = layer_summary(ds, metric, ci=ci, n_resamples=n_resamples, seed=seed)
    tests = layer_tests(ds, metric)
    extras = extra_dims(summ)
    summ = summ.transpose(*extras, "layer")
    tests = tests.transpose(*extras, "layer")
    layers = summ["layer"].values
    k = int(min(k, layers.size))
    means = summ["mean"].values
    # NaN means rank last; stable sort keeps the lower layer first on ties
    order = np.argsort(-np.nan_to_num(means, nan=-np.inf), axis=-1, kind="stable")[..., :k]
    dims = [*extras, "rank"]
    data_vars: dict[str, Any] = {"layer": (dims, layers[order])}
    for name, src in [
        ("mean", summ["mean"]),
        ("ci_low", summ["ci_low"]),
        ("ci_high", summ["ci_high"]),
        ("median", summ["median"]),
        ("n", summ["n"]),
        ("effect", tests["effect"]),
        ("p_value", tests["p_value"]),
        ("p_adj", tests["p_adj"]),
    ]:
        data_vars[name] = (dims, np.take_along_axis(src.values, order, axis=-1), src.attrs)
    # layers with any value, per cell (a `latent` cell in a multi-component file has only one)
    n_layers = (summ["n"].values > 0).sum(axis=-1)[..., None]
    n = data_vars["n"][1]
    testable = (n_layers >= 3) & (0.5 ** np.maximum(n, 0) < alpha)
    p_adj = data_vars["p_adj"][1]
    threshold = negligible_threshold(metric)
    data_vars["testable"] = (dims, testable)
    data_vars["significant"] = (dims, testable & (np.nan_to_num(p_adj, nan=1.0) < alpha))
    data_vars["negligible"] = (dims, np.abs(np.nan_to_num(data_vars["effect"][1], nan=0.0)) < threshold)
    coords = {d: summ.coords[d] for d in extras if d in summ.coords}
    coords["rank"] = np.arange(1, k + 1)
    attrs = dict(summ.attrs)
    attrs.update(
        alpha=alpha, k=k, test="one-sided Wilcoxon signed-rank, BH across layers", negligible_threshold=threshold
    )
    return xr.Dataset(data_vars, coords=coords, attrs=attrs).transpose("rank", *extras)


def peak_layer(ds: xr.Dataset, metric: str = "kl") -> xr.Dataset:
    """Per pair, the layer where ``metric`` is largest (NaNs ignored), and a histogram of those.

    Variables: ``peak_layer`` (dims pair + extras; the layer value, ties → lowest layer,
    −1 where a pair is all-NaN), ``peak_value``, ``histogram`` (dims layer + extras: number of
    pairs peaking at each layer) and ``share`` (histogram / pairs with a defined peak).
    """
    da = metric_array(ds, metric)
    extras = extra_dims(da)
    arr = da.transpose("pair", "layer", *extras).values.astype(float)
    layers = da["layer"].values
    valid = np.isfinite(arr).any(axis=1)  # (pair, extras...)
    idx = np.argmax(np.where(np.isfinite(arr), arr, -np.inf), axis=1)
    peak = np.where(valid, layers[idx], -1).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        peak_val = np.where(valid, np.take_along_axis(arr, idx[:, None], axis=1)[:, 0], np.nan)
    hist = np.stack([((peak == lay) & valid).sum(axis=0) for lay in layers], axis=0)
    n_valid = valid.sum(axis=0)
    with np.errstate(all="ignore"):
        share = hist / np.where(n_valid > 0, n_valid, np.nan)
    pair_dims = ["pair", *extras]
    layer_dims = ["layer", *extras]
    coords: dict[Hashable, Any] = dict(_kept_coords(da, pair_dims))
    coords.update(_kept_coords(da, layer_dims))
    return xr.Dataset(
        {
            "peak_layer": (pair_dims, peak, {"long_name": "layer of per-pair maximum"}),
            "peak_value": (pair_dims, peak_val, {"units": da.attrs.get("units", "")}),
            "histogram": (layer_dims, hist.astype(np.int64), {"long_name": "pairs peaking here"}),
            "share": (layer_dims, share, {"units": "1"}),
        },
        coords=coords,
        attrs=_base_attrs(ds, metric, da),
    )


def _spearman_matrix(x: np.ndarray) -> np.ndarray:
    """Layer × layer Spearman correlation of ``x`` (pair, layer), pairwise-complete on NaNs."""
    n_layers = x.shape[1]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if np.isfinite(x).all():
            ranks = sps.rankdata(x, axis=0)
            if n_layers == 1:
                return np.ones((1, 1)) if np.ptp(ranks) > 0 else np.full((1, 1), np.nan)
            return np.corrcoef(ranks, rowvar=False)
        out = np.full((n_layers, n_layers), np.nan)
        for i in range(n_layers):
            for j in range(i, n_layers):
                ok = np.isfinite(x[:, i]) & np.isfinite(x[:, j])
                if ok.sum() >= 3:
                    out[i, j] = out[j, i] = sps.spearmanr(x[ok, i], x[ok, j]).statistic
        return out


def layer_similarity(ds: xr.Dataset, metric: str = "kl") -> xr.DataArray:
    """Spearman correlation across pairs between every two layers' ``metric`` values.

    Dims ``layer``, ``layer_other`` (+ extras, computed per cell). NaNs are handled
    pairwise-complete; layers with constant values (or < 3 common pairs) give NaN.
    """
    da = metric_array(ds, metric)
    arr, extras = _cells(da, ["pair", "layer"])
    n_layers = arr.shape[-1]
    out = np.full(arr.shape[:-2] + (n_layers, n_layers), np.nan)
    for idx in np.ndindex(arr.shape[:-2]):
        out[idx] = _spearman_matrix(arr[idx])
    layers = da["layer"].values
    coords: dict[Hashable, Any] = dict(_kept_coords(da, extras))
    coords.update(layer=layers, layer_other=layers)
    attrs = _base_attrs(ds, metric, da)
    attrs.update(long_name=f"Spearman correlation of {metric} across pairs", units="1")
    return xr.DataArray(
        out, dims=[*extras, "layer", "layer_other"], coords=coords, name="spearman", attrs=attrs
    ).transpose("layer", "layer_other", *extras)


def by(ds: xr.Dataset, coord: str = "reasoning_steps", metric: str = "kl", **kw: Any) -> xr.Dataset:
    """:func:`layer_summary` for each group of pairs sharing a value of the pair coordinate
    ``coord`` (e.g. ``reasoning_steps``; −1 = unknown is kept as its own group).

    The result gains a dimension named ``coord`` and a variable ``n_pairs`` (pairs per group).
    Extra keyword arguments go to :func:`layer_summary`.
    """
    if coord not in ds.coords and coord not in ds.data_vars:
        raise ResultsError(f"no pair coordinate {coord!r} in results")
    values = ds[coord]
    if values.dims != ("pair",):
        raise ResultsError(f"{coord!r} is not a per-pair coordinate (dims {values.dims})")
    vals = values.values
    mask = ~xr.DataArray(vals).isnull().values  # works for str and numeric
    groups = np.unique(vals[mask])
    if groups.size == 0:
        raise ResultsError(f"pair coordinate {coord!r} has no values")
    parts = []
    for g in groups:
        sub = ds.isel(pair=np.flatnonzero(mask & (vals == g)))
        part = layer_summary(sub, metric, **kw)
        part["n_pairs"] = ((), sub.sizes["pair"])
        parts.append(part)
    out = xr.concat(parts, dim=xr.DataArray(groups, dims=coord, name=coord))
    out.attrs = dict(parts[0].attrs)
    out.attrs["grouped_by"] = coord
    return out


def compare(
    ds_a: xr.Dataset,
    ds_b: xr.Dataset,
    metric: str = "kl",
    seed: int = 0,
    ci: float = 0.95,
    n_resamples: int = 2000,
) -> xr.Dataset:
    """Paired comparison ``a − b`` of ``metric`` on the pairs and layers both Datasets share.

    Variables (dims layer + extras): ``mean`` (mean paired difference), ``ci_low``/``ci_high``
    (bootstrap CI), ``p_value`` (two-sided Wilcoxon signed-rank), ``n`` (pairs with both values),
    ``mean_a``, ``mean_b``. Raises :class:`ResultsError` when no pairs or layers are shared or the
    dims differ.
    """
    a = metric_array(ds_a, metric)
    b = metric_array(ds_b, metric)
    if set(a.dims) != set(b.dims):
        raise ResultsError(f"cannot compare: dims differ ({a.dims} vs {b.dims})")
    # only the index coordinates matter; drop per-pair text coords that could conflict
    a = a.reset_coords(drop=True)
    b = b.reset_coords(drop=True)
    a, b = xr.align(a, b, join="inner")
    for dim in a.dims:
        if a.sizes[dim] == 0:
            raise ResultsError(f"cannot compare: no common {dim}s between the two results")
    b = b.transpose(*a.dims)
    diff = a.copy(data=a.values - b.values)
    arr, extras = _cells(diff, ["pair"])
    xa, _ = _cells(a, ["pair"])
    xb, _ = _cells(b, ["pair"])
    shape = arr.shape[:-1]
    names = ("mean", "ci_low", "ci_high", "p_value", "n", "mean_a", "mean_b")
    out = {k: np.full(shape, np.nan) for k in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for idx in np.ndindex(shape):
            res = summarize_1d(arr[idx], ci, n_resamples, seed)
            for key in ("mean", "ci_low", "ci_high", "n"):
                out[key][idx] = res[key]
            out["p_value"][idx] = wilcoxon_p(arr[idx], "two-sided")
            both = np.isfinite(arr[idx])
            out["mean_a"][idx] = np.mean(xa[idx][both]) if both.any() else np.nan
            out["mean_b"][idx] = np.mean(xb[idx][both]) if both.any() else np.nan
    units = ds_a[metric].attrs.get("units", "")
    data_vars = {
        k: (extras, v.astype(np.int64) if k == "n" else v, {} if k in ("n", "p_value") else {"units": units})
        for k, v in out.items()
    }
    attrs = _base_attrs(ds_a, metric, ds_a[metric])
    attrs.update(
        ci=ci,
        n_resamples=n_resamples,
        bootstrap_seed=seed,
        model_name_b=str(ds_b.attrs.get("model_name", "")),
        mode_b=str(ds_b.attrs.get("mode", "")),
        direction_b=str(ds_b.attrs.get("direction", "")),
    )
    return xr.Dataset(data_vars, coords=_kept_coords(diff, extras), attrs=attrs)


def recovery_ratio(
    ds: xr.Dataset,
    kind: str = "logit",
    ci: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> xr.Dataset:
    """Recovery as a ratio of means over pairs, ``mean(P − B) / mean(S − B)``, with a paired
    bootstrap CI, per layer (and per position/component when present).

    ``kind`` "logit" uses ``logit_diff`` (P, per layer) with ``baseline_logit_diff`` (B) and
    ``source_logit_diff`` (S); "logprob" uses ``logprob_diff`` and its baseline/source. A pair is
    used in a cell when P, B and S are finite and it is comparable (answers differ). Unlike the mean
    of per-pair recoveries this does not blow up on pairs whose S − B is near 0. 1 means the patch
    moves the patched run all the way to the source run (denoise: clean behaviour fully restored;
    noise: the clean run fully takes on the corrupted behaviour), 0 means no change.

    The CI resamples pairs with replacement (numerator and denominator together), ``n_boot``
    times from ``np.random.default_rng(seed)`` per cell, and takes percentiles. Variables:
    ``ratio``, ``ci_low``, ``ci_high``, ``n`` (pairs used), ``n_left_out``, ``n_not_comparable``,
    ``n_recovery_nan`` (pairs whose per-pair ``recovery`` / ``logprob_recovery`` is NaN),
    ``mean_patched_minus_baseline`` and ``mean_source_minus_baseline``.
    """
    names = {"logit": ("logit_diff", "recovery"), "logprob": ("logprob_diff", "logprob_recovery")}
    if kind not in names:
        raise ResultsError(f"recovery kind must be 'logit' or 'logprob', not {kind!r}")
    var, per_pair = names[kind]
    base_name, src_name = f"baseline_{var}", f"source_{var}"
    missing = [v for v in (var, base_name, src_name) if v not in ds.data_vars]
    if missing:
        raise ResultsError(f"cannot compute {kind} recovery: {', '.join(missing)} not in results")
    da = ds[var]  # not metric_array: comparability is counted here, explicitly
    if "pair" not in da.dims or "layer" not in da.dims:
        raise ResultsError(f"variable {var!r} does not have dims (pair, layer)")
    arr, extras = _cells(da, ["pair"])  # (..., pair)
    b = ds[base_name].values.astype(float)
    s = ds[src_name].values.astype(float)
    comparable = comparable_pairs(ds)
    if per_pair in ds.data_vars:
        rec_nan = ~np.isfinite(_cells(ds[per_pair].transpose(*da.dims), ["pair"])[0])
    else:
        rec_nan = np.ones_like(arr, dtype=bool)
    shape = arr.shape[:-1]
    keys = ("ratio", "ci_low", "ci_high", "mean_patched_minus_baseline", "mean_source_minus_baseline")
    out = {key: np.full(shape, np.nan) for key in keys}
    counts = {key: np.zeros(shape, dtype=np.int64) for key in ("n", "n_left_out", "n_recovery_nan")}
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    for idx in np.ndindex(shape):
        p = arr[idx]
        ok = np.isfinite(p) & np.isfinite(b) & np.isfinite(s) & comparable
        n = int(ok.sum())
        counts["n"][idx] = n
        counts["n_left_out"][idx] = p.size - n
        counts["n_recovery_nan"][idx] = int(rec_nan[idx].sum())
        if n == 0:
            continue
        num, den = p[ok] - b[ok], s[ok] - b[ok]
        out["mean_patched_minus_baseline"][idx] = num.mean()
        out["mean_source_minus_baseline"][idx] = den.mean()
        with np.errstate(all="ignore"):
            ratio = num.mean() / den.mean() if den.mean() != 0 else np.nan
        out["ratio"][idx] = ratio
        if n < 2 or n_boot < 1 or not np.isfinite(ratio):
            out["ci_low"][idx] = out["ci_high"][idx] = ratio
            continue
        # fresh generator per cell: a cell's CI does not depend on which cells came before
        pick = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        with np.errstate(all="ignore"):
            boot = num[pick].mean(axis=1) / den[pick].mean(axis=1)
        boot = boot[np.isfinite(boot)]
        if boot.size:
            out["ci_low"][idx], out["ci_high"][idx] = np.quantile(boot, [lo_q, hi_q])
    n_not_comparable = int((~comparable).sum())
    units = str(da.attrs.get("units", ""))
    data_vars: dict[str, Any] = {
        "ratio": (extras, out["ratio"], {"long_name": f"mean(P - B) / mean(S - B) of {var}", "units": "1"}),
        "ci_low": (extras, out["ci_low"], {"units": "1"}),
        "ci_high": (extras, out["ci_high"], {"units": "1"}),
        "n": (extras, counts["n"], {"long_name": "pairs used"}),
        "n_left_out": (extras, counts["n_left_out"], {"long_name": "pairs left out"}),
        "n_not_comparable": (
            extras,
            np.full(shape, n_not_comparable, dtype=np.int64),
            {"long_name": "pairs with equal clean and corrupted answers"},
        ),
        "n_recovery_nan": (extras, counts["n_recovery_nan"], {"long_name": f"pairs with NaN {per_pair}"}),
        "mean_patched_minus_baseline": (extras, out["mean_patched_minus_baseline"], {"units": units}),
        "mean_source_minus_baseline": (extras, out["mean_source_minus_baseline"], {"units": units}),
    }
    attrs = dict(ds.attrs)
    attrs.update(
        kind=kind,
        metric=var,
        per_pair_metric=per_pair,
        ci=ci,
        n_boot=n_boot,
        bootstrap_seed=seed,
        bootstrap_method="percentile, pairs resampled",
    )
    return xr.Dataset(data_vars, coords=_kept_coords(da, extras), attrs=attrs)
