"""A one-paragraph summary of a finished sweep (what `codi-nnsight patch` prints)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def sweep_summary(ds: Any, out: str | None = None) -> str:
    """Where the mean KL peaks, the best flip rate over comparable pairs, excluded pairs, sanity."""
    kl = ds["kl"].mean("pair")
    if "route" in kl.dims:  # the split's parts are not KLs of their own: the peak is the total's
        kl = kl.sel(route="total")
    values = kl.values
    where = f"{'wrote ' + str(out) + ': ' if out else ''}{ds.sizes['pair']} pairs x {ds.sizes['layer']} layers"
    if np.isfinite(values).any():
        at = dict(zip(kl.dims, np.unravel_index(int(np.nanargmax(values)), values.shape)))
        peak = f"largest mean KL at {_site(ds, kl, at)} ({float(values[tuple(at.values())]):.4g} nats)"
    else:
        peak = "KL is NaN everywhere (the model produced NaN logits)"
    comparable = ds["comparable"].values > 0 if "comparable" in ds else np.ones(ds.sizes["pair"], dtype=bool)
    flipped = ds["flipped"].mean("pair").max().item() if comparable.any() else math.nan
    flips = (
        f"most pairs flipped: {flipped:.0%} of {int(comparable.sum())}"
        if math.isfinite(flipped)
        else "no pair can flip"
    )
    if ds.attrs.get("ablation") and "kept" in ds:
        kept = ds["kept"].mean("pair")
        flips = (
            f"{ds.attrs['ablation']} ablation: clean answer kept by {float(kept.min()):.0%} to "
            f"{float(kept.max()):.0%} of pairs across sites"
        )
    left_out = int((~comparable).sum())
    excluded = (
        f"; {left_out} pair{'s' if left_out != 1 else ''} left out of flips and recoveries "
        "(clean and corrupted answers equal)"
        if left_out
        else ""
    )
    status = "passed" if int(ds.attrs.get("sanity_passed", 0)) else "FAILED"
    routes = f"; {route_summary(ds)}" if "route" in ds.dims and "delta_logprob_diff" in ds else ""
    return f"{where}; {peak}; {flips}{excluded}{routes}; sanity checks {status}"


def route_summary(ds: Any) -> str:
    """The route split where the mean change of the answer's log-probability gap is largest.

    Means over pairs are linear, so the split of the mean adds up as each pair's does.
    """
    mean = ds["delta_logprob_diff"].mean("pair")
    total = mean.sel(route="total")
    values = np.abs(total.values)
    if not np.isfinite(values).any():
        return "route split: logprob_diff is NaN everywhere"
    where = dict(zip(total.dims, np.unravel_index(int(np.nanargmax(values)), values.shape)))
    at = mean.isel(where)
    label = ", ".join(
        position_label(ds, ds[d].values[i]) if d == "position" else f"{d} {int(ds[d].values[i])}"
        for d, i in where.items()
    )
    t, f, a, i = (float(at.sel(route=r)) for r in ("total", "feedback", "attention", "interaction"))
    return (
        f"route split of the mean change of logprob_diff at {label}: total {t:+.4g} = "
        f"feedback {f:+.4g} + attention {a:+.4g} + interaction {i:+.4g} nats"
    )


def position_label(ds: Any, p: Any) -> str:
    """A position in words: "thought k"; in a sequence sweep also "question token -7 (offset from the
    first thought)", "[bot]" and "answer prompt token j ('is')"."""
    p = int(p)
    if "position_kind" not in ds.coords:
        return f"thought {p}"
    kind = str(ds["position_kind"].sel(position=p).item())
    if kind == "question":
        return f"question token {p}"
    if kind == "bot":
        return "[bot]"
    if kind == "thought":
        return f"thought {p}"
    first = int(ds.position.values[list(ds["position_kind"].values).index("answer prompt")])
    seen = [t for t in ds["token"].sel(position=p).values if t != ""]
    return f"answer prompt token {p - first}" + (f" ({str(seen[0])!r})" if seen else "")


def _site(ds: Any, kl: Any, at: dict) -> str:
    """The patched site in words: the fed-back thought (not "layer 0"), the thought, the head, the component."""
    value = {d: kl[d].values[i] for d, i in at.items()}
    component = str(value.get("component", ds.attrs.get("component", "")))
    parts = []
    if component == "latent":
        parts.append("the fed-back thought" if "position" not in value else "")
    elif "layer" in value:
        parts.append(f"layer {int(value['layer'])}")
    if "head" in value:
        parts.append(f"head {int(value['head'])}")
    if "position" in value:
        parts.append(f"{'fed-back ' if component == 'latent' else ''}{position_label(ds, value['position'])}")
    if "component" in value:
        parts.append(f"({component})")
    return ", ".join(p for p in parts if p).replace(", (", " (")
