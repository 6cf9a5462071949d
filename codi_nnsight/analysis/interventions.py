"""Summaries and figures of the interventions on thoughts (transplant, steer, thought-graph); model-free.

* `transplant_table`: per thought and donor, the share of transplants whose answer is the
  recipient's, the donor's, and the recipient's chain carried on from the donor's value (only
  where that carried answer differs from both the recipient's and the donor's answers);
* `steering_curve`: per direction group (probe, mean-diff, random) and scale, the share of answers
  changed and of answers equal to the predicted one;
* `graph_edges`: the mean graph of one intervention and the edges above the noise floor (the
  resample intervention's mean plus two standard errors);
* `intervention_summary`: one paragraph of what a file found; `plot_intervention`: one figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

__all__ = [
    "graph_edges",
    "intervention_summary",
    "intervention_table",
    "plot_intervention",
    "steering_curve",
    "transplant_table",
]


def _kind(ds: xr.Dataset) -> str:
    return (
        str(ds.attrs.get("codi_nnsight_schema", "")).split("/")[1]
        if "/" in str(ds.attrs.get("codi_nnsight_schema", ""))
        else ""
    )


def transplant_table(ds: xr.Dataset) -> xr.Dataset:
    """(donor, thought[, layer]) shares: `follows_recipient`, `follows_donor`, `follows_carried` (best step), n."""
    # Only where the carried answer is neither A's nor B's own: otherwise "follows the donor's value
    # carried through A's chain" cannot be told from "keeps A's answer" or "copies B's answer".
    real = (ds["carried_answer"] != ds["recipient_true_answer"]) & (ds["carried_answer"] != ds["donor_true_answer"])
    carried = ds["follows_carried"].where(real)
    by_step = carried.mean("pair")
    return xr.Dataset(
        {
            "follows_recipient": ds["follows_recipient"].mean("pair"),
            "follows_donor": ds["follows_donor"].mean("pair"),
            "follows_carried_by_step": by_step,
            "n_carried": carried.notnull().sum("pair"),
        }
    )


def _groups(ds: xr.Dataset) -> np.ndarray:
    return np.array([("random" if str(d).startswith("random") else str(d)) for d in ds["direction"].values])


def steering_curve(ds: xr.Dataset) -> xr.Dataset:
    """(group, scale): mean `answer_changed` and `follows_predicted` over pairs and the group's directions."""
    tagged = ds[["answer_changed", "follows_predicted"]].assign_coords(group=("direction", _groups(ds)))
    return tagged.groupby("group").mean(["pair", "direction"])


def graph_edges(ds: xr.Dataset, intervention: str = "zero", metric: str = "lens_kl") -> xr.Dataset:
    """The mean (source, target) graph of `intervention`, and where it exceeds the resample floor (mean + 2 SE)."""
    mean = ds[metric].sel(intervention=intervention, drop=True).mean("pair")
    out = {"mean": mean}
    if "resample" in ds["intervention"].values:
        r = ds[metric].sel(intervention="resample", drop=True)
        se = r.std("pair") / np.sqrt(max(r.sizes["pair"], 1))
        floor = r.mean("pair") + 2 * se
        out["floor"] = floor
        out["above_floor"] = (mean > floor).where(np.isfinite(floor))
    return xr.Dataset(out)


def intervention_summary(ds: xr.Dataset) -> str:
    """One paragraph of what an intervention file found, numbers included."""
    kind = _kind(ds)
    if kind == "transplant":
        t = transplant_table(ds)
        lines = []
        for donor in t["donor"].values:
            fd = t["follows_donor"].sel(donor=donor)
            fd = fd.mean([d for d in fd.dims if d != "thought"])
            lines.append(
                f"{donor}: answer = donor's "
                + ", ".join(f"k={int(k)} {v:.0%}" for k, v in zip(fd["thought"].values, fd.values))
            )
        return "transplant; " + "; ".join(lines)
    if kind == "steer":
        c = steering_curve(ds)["answer_changed"]
        return "steer; answer changed by scale: " + "; ".join(
            f"{g}: " + ", ".join(f"{s:g} {v:.0%}" for s, v in zip(c["scale"].values, c.sel(group=g).values))
            for g in c["group"].values
        )
    if kind == "thought-graph":
        e = graph_edges(ds, "zero")
        n = int(e["above_floor"].sum()) if "above_floor" in e else 0
        total = int(np.isfinite(e["mean"].values).sum())
        return f"thought graph; {n} of {total} edges of the zero intervention exceed the resample floor (lens KL)"
    return ""


def intervention_table(ds: xr.Dataset) -> str:
    """The table behind the summary, as text (a report's "Table" section)."""
    kind = _kind(ds)
    if kind == "transplant":
        t = transplant_table(ds)
        return "\n\n".join(
            f"{name}:\n{t[name].to_pandas().round(3).to_string()}"
            for name in ("follows_recipient", "follows_donor")
            if t[name].ndim <= 2
        )
    if kind == "steer":
        return steering_curve(ds).to_dataframe().round(3).to_string()
    if kind == "thought-graph":
        return "\n\n".join(
            f"{x} (mean lens KL, nats; rows: source i, columns: target j):\n"
            f"{graph_edges(ds, str(x))['mean'].to_pandas().round(3).to_string()}"
            for x in ds["intervention"].values
        )
    return ""


def plot_intervention(ds: xr.Dataset, path: str | Path | None = None, ax: Any = None) -> Any:
    """One figure of an intervention file (transplant by thought, steering curve, or mean graph), on `ax` if given."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    kind = _kind(ds)
    if kind == "transplant":
        t = transplant_table(ds)["follows_donor"]
        t = t.mean([d for d in t.dims if d not in ("thought", "donor")])
        for donor in t["donor"].values:
            ax.plot(t["thought"].values, t.sel(donor=donor).values, marker="o", label=str(donor))
        ax.set(xlabel="thought k transplanted", ylabel="answer = donor's", ylim=(0, 1))
        ax.legend()
    elif kind == "steer":
        c = steering_curve(ds)["answer_changed"]
        for g in c["group"].values:
            ax.plot(c["scale"].values, c.sel(group=g).values, marker="o", label=str(g))
        ax.set(xlabel="λ (thought norms)", ylabel="answer changed", ylim=(0, 1))
        ax.legend()
    elif kind == "thought-graph":
        m = graph_edges(ds, "zero")["mean"]
        im = ax.imshow(m.values, cmap="viridis")
        fig.colorbar(im, ax=ax, label="lens KL (nats)")
        ax.set(xlabel="target thought j", ylabel="zeroed thought i")
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
