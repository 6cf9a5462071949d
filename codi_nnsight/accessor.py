"""The `codi` xarray accessor: `ds.codi.summary()`, `ds.codi.plot()`, `ds.codi.report(dir)`.

Registered with xarray's extension mechanism (`xr.register_dataset_accessor`) when this module is
imported; `import codi_nnsight` arranges that (at once if xarray is loaded, else right after
xarray's own import), so every Dataset in a session that imported the package has `.codi`.
The methods are the notebook twins of `analyze` and `report`, and draw the kind's main figure;
they work from the Dataset alone and import the analysis code on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CodiAccessor"]


@xr.register_dataset_accessor("codi")
class CodiAccessor:
    """codi-nnsight views of a results Dataset (sweep, ablation) or a readout (lens, attention, probe)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    @property
    def schema(self) -> str:
        """The Dataset's `codi_nnsight_schema` attr (`""` when it has none), e.g. `codi-nnsight/results/2`."""
        return str(self._ds.attrs.get("codi_nnsight_schema", ""))

    def _name(self) -> str:
        """The file the Dataset was read from, else `dataset`: the prefix of one-line errors."""
        return str(self._ds.encoding.get("source") or "dataset")

    def _readout(self) -> bool:
        from .analysis.readouts import is_readout

        return is_readout(self._ds)

    def _results(self, metric: str) -> xr.Dataset:
        """The Dataset checked as results with `metric` (one-line `ResultsError` otherwise), schema-2 names."""
        from .analysis.io import validate

        return validate(self._ds, self._name(), required=(metric,))

    def summary(self, metric: str = "kl") -> str:
        """The text `codi-nnsight analyze` prints: the per-layer table of `metric` (a readout's headline numbers)."""
        from .analysis import kinds

        kind = kinds.result_kind(self._ds, self._name())
        if kind == "sweep":
            from .analysis.report import format_layer_table

            return format_layer_table(self._results(metric), metric)
        # every other kind says in its attrs what it holds (the output contract)
        return kinds.summary(self._ds, None if metric == "kl" else metric)

    def plot(self, metric: str = "kl", **kwargs: Any) -> Figure:
        """The kind's main figure (the first of its report) as a matplotlib `Figure`.

        Results: mean `metric` by layer with bootstrap CIs (`analysis.plots.plot_layer_means`;
        keywords go there). Lens: answer and gold-value ranks per step × layer; attention: the
        step × question-token weights of `pair=` (default the first pair); probe: accuracy,
        control and selectivity (`targets=`).
        """
        if self._readout():
            from .analysis import readouts

            schema = self.schema
            if schema.startswith("codi-nnsight/lens/"):
                return readouts.plot_lens_ranks(self._ds, **kwargs)
            if schema.startswith("codi-nnsight/attention/"):
                kwargs.setdefault("pair", int(self._ds["pair"].values[0]))
                return readouts.plot_attention_tokens(self._ds, **kwargs)
            return readouts.plot_probe(self._ds, **kwargs)
        from .analysis.plots import plot_layer_means

        return plot_layer_means(self._results(metric), metric, **kwargs)

    def report(
        self, out: str | os.PathLike, metric: str = "kl", k: int = 3, force: bool = False, **kwargs: Any
    ) -> Path:
        """`codi-nnsight report`: write figures, tables and the report into folder `out`; returns `report.md`.

        A folder holding a report already is refused unless `force`; see `codi_nnsight.report`.
        """
        from .api import report

        return report(self._ds, out, metric=metric, k=k, force=force, **kwargs)
