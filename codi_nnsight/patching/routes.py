"""The route split: one patched thought's total effect = feedback route + attention route + interaction.

Out of the patched site at latent p leave exactly two edges, and every path to the answer starts
with one of them (diagram in docs/results-schema.md, "Modes and routes"):

* the **attention edge** — latent p's keys and values, which every later latent and answer token
  attends to (and whatever those tokens then do, their own feedback included);
* the **feedback edge** — latent p's fed-back embedding prj(h_p), the input of latent p + 1.

Three ordinary sweeps, each through the usual machinery, measure:

* `total` = mode `recurrent`: both edges carry the patch;
* `feedback` = mode `block-thought-attention`: only the feedback edge does;
* `attention` = mode `block-thought-feedback`: only the attention edge does;

and `interaction` = total − feedback − attention is what the two edges do *together* beyond
their sum (zero wherever the answer responds additively to them). So
`total = feedback + attention + interaction` holds by construction, for every pair, layer and
position, and every path is in exactly one of the routes.

The split is defined only for quantities that subtract: the changes of logit and log-probability
differences, log-probabilities and probabilities from the unpatched baseline (`delta_<metric>`),
and the recoveries (already changes, over a per-pair constant). KL, the RMS logit difference, the
top-1 flag and the decoded answer are not additive (KL(total) is not KL(feedback) + KL(attention)
plus anything meaningful): their `interaction` entry is NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

#: The sweep behind each measured route.
ROUTE_MODES: dict[str, str] = {
    "total": "recurrent",
    "feedback": "block-thought-attention",
    "attention": "block-thought-feedback",
}
#: The `route` coordinate: the measured routes, then their interaction.
ROUTES: tuple[str, ...] = (*ROUTE_MODES, "interaction")
#: Level metrics whose change from the baseline run splits additively: `delta_<name>` variables.
DELTA_METRICS: tuple[str, ...] = (
    "logit_diff",
    "logprob_diff",
    "logp_clean_answer",
    "logp_corrupted_answer",
    "p_clean",
    "p_corrupted",
)
#: Metrics that are already changes from the baseline (divided by a per-pair constant): split as they are.
ADDITIVE_METRICS: tuple[str, ...] = ("recovery", "logprob_recovery")
#: Per-pair controls that differ per sweep: stacked on `route` (NaN at `interaction`).
ROUTED_CONTROLS: tuple[str, ...] = ("self_patch_kl", "self_patch_l2")

ROUTE_DOC = (
    "total: mode recurrent; feedback: mode block-thought-attention (only the patched thought's "
    "fed-back embedding carries the patch); attention: mode block-thought-feedback (only its keys "
    "and values do); interaction: total - feedback - attention, for additive quantities only"
)


def stack_routes(parts: Mapping[str, xr.Dataset]) -> xr.Dataset:
    """One Dataset from the three route sweeps (`ROUTE_MODES`), with a `route` dim on every metric.

    Every metric variable keeps each sweep's own values at `total`, `feedback` and `attention`;
    at `interaction` it is total − feedback − attention for `ADDITIVE_METRICS`, NaN otherwise.
    `delta_<m>` (for `DELTA_METRICS`) is the change of `m` from each sweep's own baseline run, with
    its interaction. The per-pair variables and the attrs are the `total` sweep's.
    """
    from .metrics import BY_NAME, METRICS

    missing = [r for r in ROUTE_MODES if r not in parts]
    if missing:
        raise ValueError(f"route split: no sweep for route(s) {', '.join(missing)}")
    total = parts["total"]
    for route, ds in parts.items():
        if ds.attrs.get("mode", ROUTE_MODES[route]) != ROUTE_MODES[route]:
            raise ValueError(f"route {route!r} needs a {ROUTE_MODES[route]} sweep, got mode {ds.attrs['mode']!r}")
        if not all(np.array_equal(ds[d].values, total[d].values) for d in total["kl"].dims):
            raise ValueError(f"route {route!r}: its sweep covers other pairs, layers or positions than the total's")
    measured = list(ROUTE_MODES)
    routed = [m.name for m in METRICS] + [c for c in ROUTED_CONTROLS if c in total]
    out = total.drop_vars(routed)
    for name in routed:
        values = [np.asarray(parts[r][name].values, dtype=np.float64) for r in measured]
        additive = name in ADDITIVE_METRICS
        attrs = {
            **total[name].attrs,
            "interaction": "total - feedback - attention" if additive else "NaN: not additive",
        }
        out[name] = (total[name].dims + ("route",), _with_interaction(values, additive), attrs)
    for name in DELTA_METRICS:
        values = [
            np.asarray(parts[r][name].values, dtype=np.float64)
            - _broadcast(parts[r][f"baseline_{name}"].values, parts[r][name].ndim)
            for r in measured
        ]
        out[f"delta_{name}"] = (
            total[name].dims + ("route",),
            _with_interaction(values, True),
            {
                "long_name": f"change of {name} from the unpatched baseline run (patched - baseline): "
                f"{BY_NAME[name].long_name}",
                "units": BY_NAME[name].units,
                "interaction": "total - feedback - attention",
            },
        )
    out = out.assign_coords(route=("route", np.array(ROUTES), {"long_name": ROUTE_DOC}))
    return out.transpose("pair", "layer", ...)


def _with_interaction(values: list[np.ndarray], additive: bool) -> np.ndarray:
    """The three measured routes stacked on a last axis, then their interaction (or NaN)."""
    total, feedback, attention = values
    interaction = total - feedback - attention if additive else np.full_like(total, np.nan)
    return np.stack([total, feedback, attention, interaction], axis=-1)


def _broadcast(per_pair: Any, ndim: int) -> np.ndarray:
    """A per-pair array shaped to broadcast against a (pair, ...) metric of `ndim` dims."""
    return np.asarray(per_pair, dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))
