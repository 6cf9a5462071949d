"""Sanity checks as objects: each has a name, a threshold, how its values merge, and one attr.

Every sweep stores all checks in its attrs. A multi-component file merges the checks of its parts
with each check's own rule (the worst value wins) and recomputes pass/fail and details from the
merged values, so a file never contradicts itself. A NaN value fails a check — except
`full_patch` without any equal-length pair, which is recorded as skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: Largest |logit| difference a full-sequence patch may leave, per dtype.
FULL_PATCH_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@dataclass(frozen=True)
class SanityCheck:
    """One invariant every sweep must satisfy."""

    name: str
    attr: str  # the Dataset attr holding its value
    description: str
    worst: Callable[[Sequence[float]], float]  # merges values of several batches / components
    at_most: bool  # True: value <= threshold passes; False: value >= threshold passes
    limit: float | None  # the threshold; None: `FULL_PATCH_TOL` for the model's dtype

    def threshold(self, dtype: torch.dtype) -> float:
        """The pass threshold for a model of `dtype`."""
        return FULL_PATCH_TOL.get(dtype, 1e-4) if self.limit is None else self.limit

    def passed(self, value: float, threshold: float) -> bool:
        """Whether `value` passes (NaN fails)."""
        if math.isnan(value):
            return False
        return value <= threshold if self.at_most else value >= threshold


SANITY_CHECKS: tuple[SanityCheck, ...] = (
    SanityCheck(
        "self_patch",
        "sanity_self_patch_max_kl",
        "patching the target run with its own activations changes nothing (max KL, nats)",
        max,
        True,
        1e-6,
    ),
    SanityCheck("kl_nonnegative", "sanity_min_kl", "every KL is >= 0 up to rounding (min KL, nats)", min, False, -1e-7),
    SanityCheck(
        "full_patch",
        "sanity_full_patch_max_abs",
        "patching every position of the residual stream at layer 0 reproduces the source logits "
        "(max |logit difference|)",
        max,
        True,
        None,
    ),
)


def _nan_worst(worst: Callable[[Sequence[float]], float], values: Sequence[float]) -> float:
    """`worst` over values, NaN if any value is NaN (a NaN must never hide behind a finite one)."""
    vals = [float(v) for v in values]
    return math.nan if any(math.isnan(v) for v in vals) else float(worst(vals))


def measure(ds: Any, full: dict[str, Any]) -> dict[str, Any]:
    """Raw check values of one sweep's Dataset and its full-patch result."""
    self_kl = ds["self_patch_kl"].values
    kl = ds["kl"].values
    if "patched" in ds.coords:  # a sequence sweep: tokens not patched for a pair are NaN by design
        kl = kl[(ds["patched"] > 0).broadcast_like(ds["kl"]).transpose(*ds["kl"].dims).values]
    return {
        "self_patch": float(np.abs(self_kl).max()) if self_kl.size else 0.0,
        # KL is NaN nowhere by construction; a NaN here means the model produced NaN logits.
        "kl_nonnegative": float(kl.min()) if kl.size else 0.0,
        "full_patch": float(full["max_abs"]),
        "full_patch_pair_id": full["pair_id"],
    }


def sanity_attrs(values: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Attrs for measured check values: one attr per check, `sanity_passed`, `sanity_details` (JSON)."""
    details: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    for check in SANITY_CHECKS:
        value, limit = float(values[check.name]), check.threshold(dtype)
        entry: dict[str, Any] = {"value": value, "threshold": limit, "description": check.description}
        if check.name == "full_patch":
            entry["pair_id"] = values.get("full_patch_pair_id")
        skipped = check.name == "full_patch" and entry["pair_id"] is None
        entry["passed"] = True if skipped else check.passed(value, limit)
        if skipped:
            entry["skipped"] = "no pair whose two questions have the same token length"
        details[check.name] = entry
        attrs[check.attr] = value
    attrs["sanity_passed"] = int(all(d["passed"] for d in details.values()))
    attrs["sanity_details"] = json.dumps(details, sort_keys=True)
    return attrs


def merge_sanity(parts: Sequence[dict[str, Any]], dtype: torch.dtype) -> dict[str, Any]:
    """Sanity attrs of a file stacked from several sweeps (each check's worst value)."""
    details = [json.loads(p["sanity_details"]) for p in parts]
    values: dict[str, Any] = {c.name: _nan_worst(c.worst, [d[c.name]["value"] for d in details]) for c in SANITY_CHECKS}
    # The full-patch check is the same for every component: keep the first pair that ran it.
    values["full_patch_pair_id"] = next(
        (d["full_patch"].get("pair_id") for d in details if d["full_patch"].get("pair_id") is not None), None
    )
    return sanity_attrs(values, dtype)
