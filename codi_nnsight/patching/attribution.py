"""Attribution patching (AtP): a first-order estimate of every patch of a sweep, from one backward pass.

For a corrupted (target) run and its clean (source) run, AtP estimates the effect of patching one
site — layer × latent position × component (× head) — on a metric of the target run as

    AtP(site) = (a_clean(site) − a_corrupted(site)) · ∂metric/∂a(site)   (gradient in the corrupted run)

(Nanda 2023, "Attribution patching"; Kramár et al. 2024, "AtP*"). The gradient is taken through the
whole latent loop: through `prj` and the recurrence (latent k's states reach every later latent
through the fed-back embedding and through attention) and through the teacher-forced answer. So
AtP is the derivative, at ε = 0, of metric(corrupted run with the site set to a + ε·Δ): the
linearisation of the exact `patch_sweep(..., positions="each", mode="recurrent")` of the same
site. It approximates the *change* of the metric, `exact[m] − exact["baseline_" + m]`, not the
metric itself; large patches through the nonlinear loop can differ from it (measure with
`compare_with_exact` and `verify_top`).

Metrics: `logprob_diff` (teacher-forced log p(clean answer) − log p(corrupted answer)) and
`logit_diff` (first tokens at the answer position), as in `metrics.py`; each is one more
backward pass over the same graph.

Cost per batch of pairs: one forward of the clean questions without autograd (the activations),
one forward of the corrupted questions with autograd and one backward per metric — for every
component at once, where the exact sweep runs one patched forward per site.

How: an nnsight trace reads every site's tensor at every latent decoder call (`tracer.iter`, as
`trace.run_batch` does), and, after `model.output`, `torch.autograd.grad` takes the metric's
gradient with respect to all of them at once (nnsight's `with metric.backward(): t.grad` gives the
same numbers across `tracer.iter` iterations when asked in reverse order, but hangs on a tensor
that gets no gradient — the last layer at the last latent). Only the products leave the trace.

Remote-capable: the request itself asks the forward to keep autograd (`keep_grad=True`, a forward
argument, so a server's module does it too); the clean activations travel with the second request.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from ..errors import UserError
from ..model.remote import remote_errors, trace_kwargs
from ..model.wrapper import CODIModel
from .plan import answer_tokens
from .sites import SITES, head_dim, n_heads, output_tensor

SCHEMA = "codi-nnsight/attribution/1"

#: Metrics AtP can differentiate: name -> (long_name, units).
ATP_METRICS: dict[str, tuple[str, str]] = {
    "logprob_diff": (
        "AtP estimate of the change of logprob_diff (log p(clean answer) - log p(corrupted answer), "
        "teacher-forced) when the site is patched",
        "nats",
    ),
    "logit_diff": (
        "AtP estimate of the change of logit_diff (clean - corrupted first-token logit at the answer "
        "position) when the site is patched; NaN when both answers start with the same token",
        "logits",
    ),
}

#: Within one decoder block, the order its parts run in (reads must follow the forward).
_PART_ORDER = {"attention_out": 0, "attention": 1, "mlp": 2, None: 3}


@contextlib.contextmanager
def keeping_grad(model: CODIModel) -> Iterator[None]:
    """Run the model's forward with autograd on (`CODIModule.keep_grad`) inside the block."""
    codi = model.codi
    before = getattr(codi, "keep_grad", False)
    codi.keep_grad = True
    try:
        yield
    finally:
        codi.keep_grad = before


def _batches(model: CODIModel, pairs: list[Any], batch_size: int) -> list[list[Any]]:
    """Consecutive pairs in batches of at most `batch_size` that share one answer-prompt suffix."""
    out: list[list[Any]] = []
    suffix = None
    for p in pairs:
        s = tuple(answer_tokens(model, p.clean.answer, p.corrupted.answer).suffix)
        if not out or len(out[-1]) >= batch_size or s != suffix:
            out.append([])
        out[-1].append(p)
        suffix = s
    return out


def _candidates(tokens: list[Any]) -> torch.Tensor:
    """(rows, 2, A) clean and corrupted answer tokens, right-padded with -1."""
    n = max(max(len(t.clean), len(t.corrupted)) for t in tokens)
    cands = torch.full((len(tokens), 2, n), -1, dtype=torch.long)
    for r, t in enumerate(tokens):
        cands[r, 0, : len(t.clean)] = torch.tensor(t.clean)
        cands[r, 1, : len(t.corrupted)] = torch.tensor(t.corrupted)
    return cands


def _read_sites(tracer: Any, model: CODIModel, components: list[str], layers: list[int], n_latent: int, sched: Any):
    """Every site's tensor at every latent position, in forward order: {component: [[(R, 1, w)] per k] per layer}.

    Runs inside a trace. Layer sites are read at latent decoder calls; `latent` is prj call k.
    """
    layer_comps = sorted((c for c in components if SITES[c].per_layer), key=lambda c: _PART_ORDER[SITES[c].part])
    acts: dict[str, list[list[Any]]] = {c: [[] for _ in layers] for c in layer_comps}
    if "latent" in components:
        acts["latent"] = [[]]
    prj = model.prj
    if "latent" in components:
        acts["latent"][0].append(prj.output)  # prj call 0, before the first latent decoder call
    if layer_comps:
        envoys = {(c, L): SITES[c].envoy(model, L) for c in layer_comps for L in layers}
        for call in tracer.iter[sched.latent_calls.start : sched.latent_calls.stop]:
            for li, L in enumerate(layers):
                for c in layer_comps:
                    e = envoys[(c, L)]
                    acts[c][li].append(e.input if SITES[c].reads == "input" else output_tensor(e.output))
            k = call - sched.prefill_calls + 1
            if "latent" in components and k < n_latent:
                acts["latent"][0].append(prj.output)
    elif "latent" in components:
        for _k in tracer.iter[1:n_latent]:
            acts["latent"][0].append(prj.output)
    return acts


def _metric_values(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """logprob_diff and logit_diff per row (float64; NaN where undefined), as in `metrics.py`."""
    logits = out["logits"].to(torch.float64)
    cand = out["candidate_logprobs"].to(torch.float64)
    first = out["candidate_first"]
    logit = logits.gather(1, first[:, :1]).squeeze(1) - logits.gather(1, first[:, 1:2]).squeeze(1)
    return {
        "logprob_diff": cand[:, 0] - cand[:, 1],
        "logit_diff": torch.where(first[:, 0] == first[:, 1], torch.full_like(logit, float("nan")), logit),
    }


def _run_pair_batch(
    model: CODIModel,
    chunk: list[Any],
    components: list[str],
    layers: list[int],
    metrics: list[str],
    direction: str,
    remote: bool | str = False,
) -> dict[str, Any]:
    """One batch: the source forward (activations), the target forward with autograd, one backward per metric.

    Returns {"atp": {metric: {component: (R, n_layers, K, units) float64}}, "base": {metric: (R,)},
    "source": {metric: (R,)}}; `units` is 1 except for per-head sites.
    """
    tokens = [answer_tokens(model, p.clean.answer, p.corrupted.answer) for p in chunk]
    src_q = [(p.clean if direction == "denoise" else p.corrupted).question for p in chunk]
    tgt_q = [(p.corrupted if direction == "denoise" else p.clean).question for p in chunk]
    extra = {"suffix_ids": torch.tensor(tokens[0].suffix), "candidates": _candidates(tokens), "max_new_tokens": 0}
    sched, K = model.schedule(), model.num_latent
    H = n_heads(model)
    read = _read_sites
    values_of = _metric_values
    # The source run: activations only, no autograd (the fast, preallocated path).
    with remote_errors(remote), model.trace(**model.prepare(src_q, **extra), **trace_kwargs(remote)) as tracer:
        acts = read(tracer, model, components, layers, K, sched)
        source_acts = nnsight.save(
            {
                c: torch.stack([torch.stack([a[:, -1, :] for a in per_k], 1) for per_k in per_layer], 1).to(
                    torch.float64
                )
                for c, per_layer in acts.items()
            }
        )
        source_vals = nnsight.save({m: v.cpu() for m, v in values_of(model.output).items()})
    # The target run with autograd, and the gradient of each metric w.r.t. every site at once.
    target_inputs = model.prepare(tgt_q, **extra, keep_grad=True)
    with remote_errors(remote), model.trace(**target_inputs, **trace_kwargs(remote)) as tracer:
        acts = read(tracer, model, components, layers, K, sched)
        vals = values_of(model.output)
        names = list(acts)
        flat = [a for c in names for per_k in acts[c] for a in per_k]
        result: dict[str, Any] = {}
        for i, m in enumerate(metrics):
            v = vals[m]
            target = torch.where(torch.isfinite(v), v, torch.zeros_like(v)).sum()
            grads = torch.autograd.grad(target, flat, allow_unused=True, retain_graph=i < len(metrics) - 1)
            per_comp: dict[str, Any] = {}
            j = 0
            for c in names:
                rows = []
                for per_k in acts[c]:
                    cols = []
                    for a in per_k:
                        g = grads[j]
                        j += 1
                        cols.append(
                            torch.zeros_like(a[:, -1, :], dtype=torch.float64)
                            if g is None
                            else g[:, -1, :].to(torch.float64)
                        )
                    rows.append(torch.stack(cols, 1))
                grad = torch.stack(rows, 1)  # (R, n_layers, K, width)
                corrupted = torch.stack(
                    [torch.stack([a[:, -1, :].detach() for a in per_k], 1) for per_k in acts[c]], 1
                ).to(torch.float64)
                prod = (source_acts[c].to(grad.device) - corrupted) * grad
                if SITES[c].axis == "head":
                    prod = prod.reshape(*prod.shape[:-1], H, prod.shape[-1] // H)
                else:
                    prod = prod.unsqueeze(-2)
                per_comp[c] = prod.sum(-1).cpu()
            result[m] = per_comp
        atp = nnsight.save(result)
        base_vals = nnsight.save({m: v.detach().cpu() for m, v in vals.items()})
    return {"atp": atp, "base": dict(base_vals), "source": dict(source_vals)}


def attribution_sweeps(
    model: CODIModel,
    pairs: Any,
    components: Sequence[str] = ("resid", "attn", "mlp", "latent", "head"),
    layers: Sequence[int] | None = None,
    positions: str = "each",
    direction: str = "denoise",
    metrics: Sequence[str] = ("logprob_diff", "logit_diff"),
    batch_size: int = 16,
    command: str | None = None,
    remote: bool | str = False,
) -> dict[str, xr.Dataset]:
    """AtP for several components from the same forward and backward passes: {component: Dataset}.

    Each Dataset has the layout `attribution_patching` returns for that component alone.
    """
    components = list(dict.fromkeys(components))
    bad = [c for c in components if c not in SITES]
    if bad:
        raise UserError(f"--component {bad[0]!r}: expected one of {', '.join(SITES)}")
    bad_m = [m for m in metrics if m not in ATP_METRICS]
    if bad_m or not metrics:
        raise UserError(f"metric {bad_m[0] if bad_m else ''!r}: expected some of {', '.join(ATP_METRICS)}")
    if positions not in ("each", "all"):
        raise UserError(f"--positions {positions!r}: expected one of all, each")
    if direction not in ("denoise", "noise"):
        raise UserError(f"--direction {direction!r}: expected one of denoise, noise")
    if model.num_latent == 0:
        raise UserError("model has num_latent = 0: there are no CoT positions to patch")
    layers = list(range(model.n_layers)) if layers is None else [int(L) for L in layers]
    bad_l = [L for L in layers if not 0 <= L < model.n_layers]
    if bad_l or not layers:
        raise UserError(f"--layers: {bad_l[0] if bad_l else 'empty'} out of range 0-{model.n_layers - 1}")
    if int(batch_size) < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    pairs = list(pairs)
    if not pairs:
        raise UserError("no pairs to attribute")
    model.check_fits(pairs, extra=model.num_latent + 48)
    model.check_text(pairs)
    start = _now()
    parts = [
        _run_pair_batch(model, chunk, components, layers, list(metrics), direction, remote)
        for chunk in _batches(model, pairs, int(batch_size))
    ]
    atp = {m: {c: torch.cat([p["atp"][m][c] for p in parts]).numpy() for c in components} for m in metrics}
    base = {m: torch.cat([p["base"][m] for p in parts]).numpy() for m in ATP_METRICS}
    source = {m: torch.cat([p["source"][m] for p in parts]).numpy() for m in ATP_METRICS}
    return {
        c: _dataset(model, pairs, c, layers, positions, direction, metrics, atp, base, source, start, command)
        for c in components
    }


def attribution_patching(
    model: CODIModel,
    pairs: Any,
    component: str | Sequence[str] = "resid",
    layers: Sequence[int] | None = None,
    positions: str = "each",
    direction: str = "denoise",
    metrics: Sequence[str] = ("logprob_diff", "logit_diff"),
    batch_size: int = 16,
    command: str | None = None,
    remote: bool | str = False,
) -> xr.Dataset:
    """Attribution patching: the first-order estimate of `patch_sweep` for every site.

    Args:
        model: a loaded `CODIModel`.
        pairs: a `PairSet` or sequence of pairs.
        component: a site of `sites.SITES`, or a list of them (adds a `component` dim, as the
            sweep does; `head` adds a `head` dim and goes on its own).
        layers: decoder blocks (default all; `latent` has the one layer 0).
        positions: `each` latent position (the `position` dim), or `all`: the sum over positions
            (the first-order estimate of patching every position at once).
        direction: `denoise` (gradient in the corrupted run, Δ = clean − corrupted) or `noise`
            (gradient in the clean run, Δ = corrupted − clean).
        metrics: which of `logprob_diff`, `logit_diff` to differentiate (one backward each).
        batch_size: pairs per forward/backward.
        command: recorded in the attrs.
        remote: nnsight's `remote=` (False, True for NDIF, a host URL, or "local").

    Returns:
        Dataset with dims `(pair, layer[, head][, position][, component])`, variables
        `atp_<metric>` (the estimated change of the target run's metric), per-pair
        `baseline_<metric>` / `source_<metric>` (the unpatched runs) and `comparable`.
    """
    comps = [component] if isinstance(component, str) else list(component)
    axis = next((c for c in comps if c in SITES and SITES[c].axis), None)
    if axis is not None and len(comps) > 1:
        raise UserError(f"--component {axis} adds a {SITES[axis].axis} dimension: attribute it on its own")
    parts = attribution_sweeps(
        model,
        pairs,
        comps,
        layers=layers,
        positions=positions,
        direction=direction,
        metrics=metrics,
        batch_size=batch_size,
        command=command,
        remote=remote,
    )
    if len(comps) == 1:
        return parts[comps[0]]
    per_pair = [n for n in parts[comps[0]].data_vars if not n.startswith("atp_")]
    ds = xr.concat(
        [parts[c] for c in comps],
        dim=xr.DataArray(comps, dims="component", name="component"),
        data_vars=[f"atp_{m}" for m in metrics],
        coords="minimal",
        compat="override",
        join="outer",
        combine_attrs="override",
    )
    ds = ds.transpose("pair", "layer", ..., "component")  # the sweep's order: component last
    for n in per_pair:
        ds[n] = parts[comps[0]][n]
    ds.attrs["component"] = ",".join(comps)
    return ds


def _dataset(
    model: CODIModel,
    pairs: list[Any],
    component: str,
    layers: list[int],
    positions: str,
    direction: str,
    metrics: Sequence[str],
    atp: dict[str, dict[str, np.ndarray]],
    base: dict[str, np.ndarray],
    source: dict[str, np.ndarray],
    start: str,
    command: str | None,
) -> xr.Dataset:
    """The labeled Dataset of one component (same dims and coordinates as the exact sweep's)."""
    from .dataset import with_pair_coordinates
    from .sweep import versions

    site = SITES[component]
    layer_ids = layers if site.per_layer else [0]
    K = model.num_latent
    comparable = np.array([float(p.clean.answer != p.corrupted.answer) for p in pairs])
    keep = comparable > 0
    dims = ("pair", "layer") + (("head",) if site.axis else ()) + (("position",) if positions == "each" else ())
    data: dict[str, Any] = {}
    for m in metrics:
        a = atp[m][component]  # (pair, layer, K, units)
        a = np.moveaxis(a, 2, 3)  # (pair, layer, units, K)
        if not site.axis:
            a = a[:, :, 0]
        if positions == "all":
            a = a.sum(-1)
        defined = keep & np.isfinite(base[m])
        a = np.where(defined.reshape((-1,) + (1,) * (a.ndim - 1)), a, np.nan)
        long_name, units = ATP_METRICS[m]
        data[f"atp_{m}"] = (dims, a, {"long_name": long_name, "units": units})
    for m, (_, units) in ATP_METRICS.items():
        for run, vals in (("baseline", base[m]), ("source", source[m])):
            data[f"{run}_{m}"] = (
                "pair",
                np.where(keep, vals, np.nan),
                {"long_name": f"{m} of the unpatched {run} run", "units": units},
            )
    data["comparable"] = (
        "pair",
        comparable,
        {"long_name": "the clean and corrupted answers differ, so the metrics are defined", "units": "share"},
    )
    coords: dict[str, Any] = {
        "pair": np.array([p.pair_id for p in pairs], dtype=np.int64),
        "layer": np.array(layer_ids, dtype=np.int64),
    }
    if positions == "each":
        coords["position"] = ("position", np.arange(K, dtype=np.int64), {"long_name": "latent token index"})
    if site.axis:
        coords["head"] = ("head", np.arange(n_heads(model), dtype=np.int64), {"long_name": "attention head index"})
    ds = with_pair_coordinates(xr.Dataset(data, coords=coords), pairs)
    ds.attrs = {
        "codi_nnsight_schema": SCHEMA,
        "method": "attribution patching (AtP): (source - target activation) . d metric / d activation, "
        "gradient in the target run through prj and the latent loop",
        "model_name": model.name,
        "component": component,
        "positions": positions,
        "mode": "recurrent",
        "direction": direction,
        "metrics": ",".join(metrics),
        "layers": ",".join(map(str, layer_ids)),
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "computed_on": "local",
        "checkpoint_sha256": model.checkpoint_sha256 or "",
        "num_latent": K,
        "n_layers_model": model.n_layers,
        "head_dim": head_dim(model) if site.axis else 0,
        "command": command if command is not None else shlex.join(sys.argv),
        "start_time": start,
        "end_time": _now(),
        **versions(),
    }
    return ds


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Against the exact sweep
# ---------------------------------------------------------------------------------------------
def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-d arrays (NaN with fewer than 3 points or a constant one)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _top_recall(a: np.ndarray, e: np.ndarray, k: int) -> float:
    """Share of the k sites of largest |exact| effect that are among the k of largest |AtP|."""
    k = min(k, len(e))
    if k == 0:
        return float("nan")
    top_e = set(np.argsort(-np.abs(e), kind="stable")[:k].tolist())
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    return len(top_e & top_a) / k


def compare_with_exact(
    atp_ds: xr.Dataset, exact_ds: xr.Dataset, metric: str = "logprob_diff", k: int = 10
) -> dict[str, dict[str, float]]:
    """How well AtP ranks the sites of an exact sweep, per component.

    The exact effect of a site is `exact[metric] − exact["baseline_" + metric]` (what AtP
    estimates). Per component, over the sites (layer × position × head) both datasets hold:

    * `spearman` — rank correlation of the pair-mean AtP and the pair-mean exact effect;
    * `spearman_pairs` — rank correlation over every (pair, site) value;
    * `top_k_recall` — share of the k sites with the largest |pair-mean exact effect| that are
      among the k with the largest |pair-mean AtP|; `k` — that k (≤ the number of sites);
    * `n_sites`, `n_pairs`; `pearson` of the pair means, for scale.
    """
    effect = exact_ds[metric] - exact_ds[f"baseline_{metric}"]
    atp = atp_ds[f"atp_{metric}"]
    atp, effect = xr.align(atp, effect, join="inner")
    comps = list(atp["component"].values) if "component" in atp.dims else [str(atp_ds.attrs.get("component", ""))]
    out: dict[str, dict[str, float]] = {}
    for c in comps:
        a = atp.sel(component=c) if "component" in atp.dims else atp
        e = effect.sel(component=c) if "component" in effect.dims else effect
        site_dims = [d for d in a.dims if d != "pair"]
        am = a.mean("pair", skipna=True).transpose(*site_dims).values.ravel()
        em = e.mean("pair", skipna=True).transpose(*site_dims).values.ravel()
        ok = np.isfinite(am) & np.isfinite(em)
        ap = a.transpose("pair", *site_dims).values.ravel()
        ep = e.transpose("pair", *site_dims).values.ravel()
        okp = np.isfinite(ap) & np.isfinite(ep)
        kk = min(k, int(ok.sum()))
        pearson = float(np.corrcoef(am[ok], em[ok])[0, 1]) if ok.sum() >= 3 and np.ptp(am[ok]) > 0 else float("nan")
        out[str(c)] = {
            "spearman": _spearman(am[ok], em[ok]),
            "spearman_pairs": _spearman(ap[okp], ep[okp]),
            "top_k_recall": _top_recall(am[ok], em[ok], k),
            "k": kk,
            "pearson": pearson,
            "n_sites": int(ok.sum()),
            "n_pairs": int(np.isfinite(a.values).reshape(a.sizes["pair"], -1).any(1).sum()),
        }
    return out


@dataclass
class Verified:
    """`verify_top`'s answer: the layers checked, AtP and the exact sweep on them, and their comparison."""

    layers: list[int]
    atp: xr.Dataset
    exact: xr.Dataset
    comparison: dict[str, dict[str, float]]


def top_layers(atp_ds: xr.Dataset, n: int, metric: str = "logprob_diff") -> list[int]:
    """The n layers with the largest pair-mean |AtP| at any position (and head), in layer order."""
    a = np.abs(atp_ds[f"atp_{metric}"]).mean("pair", skipna=True)
    score = a.max([d for d in a.dims if d != "layer"]) if a.ndim > 1 else a
    order = np.argsort(-np.nan_to_num(score.values, nan=-1.0), kind="stable")[: max(1, int(n))]
    return sorted(int(atp_ds["layer"].values[i]) for i in order)


def verify_top(
    model: CODIModel, pairs: Any, atp_ds: xr.Dataset, n: int, metric: str = "logprob_diff", **sweep_kwargs: Any
) -> Verified:
    """Run the exact `patch_sweep` only on the n layers AtP ranks highest, and compare the two there.

    The sweep uses the AtP Dataset's component, positions and direction (one component;
    `sweep_kwargs` go to `patch_sweep`, e.g. `batch_size`).
    """
    from .sweep import patch_sweep

    comp = str(atp_ds.attrs["component"])
    if "," in comp:
        raise UserError("verify_top checks one component at a time: select one from the AtP Dataset")
    layers = top_layers(atp_ds, n, metric)
    exact = patch_sweep(
        model,
        pairs,
        layers=layers,
        component=comp,
        positions=str(atp_ds.attrs["positions"]),
        direction=str(atp_ds.attrs["direction"]),
        **sweep_kwargs,
    )
    atp = atp_ds.sel(layer=layers)
    return Verified(layers, atp, exact, compare_with_exact(atp, exact, metric))
