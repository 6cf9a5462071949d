"""The Python twins of the commands that are not one existing function: pairs, ablate and report.

`codi_nnsight` exports these with the other twins (`load_model`, `patch_sweep`, `attribute`,
`early_exit`, `logit_lens`, ...); this module imports nothing heavy at the top, so that
`codi_nnsight.DEMO_PAIRS` costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import xarray as xr

    from .data.pairs import PairSet
    from .model.wrapper import CODIModel

#: The bundled demo pairs (24 pairs for the bundled toy model), the default of every `--pairs`.
DEMO_PAIRS = Path(__file__).resolve().parent / "assets" / "demo_pairs.json"

__all__ = ["DEMO_PAIRS", "ablate", "demo_pairs", "load_pairs", "report"]


def load_pairs(path: str | os.PathLike | None = None, limit: int | None = None) -> PairSet:
    """A pairs file (default: the bundled demo pairs, `DEMO_PAIRS`), cut to its first `limit` pairs.

    The twin of `--pairs FILE --limit N`; raises `UserError` naming the file and record on a bad file.
    """
    from .data.pairs import load_pairs as load

    return load(DEMO_PAIRS if path is None else path).limit(limit)


def demo_pairs(limit: int | None = None) -> PairSet:
    """The bundled demo pairs (`DEMO_PAIRS`), or their first `limit`."""
    return load_pairs(None, limit)


def ablate(model: CODIModel, pairs: Any, ablation: str = "zero", **kwargs: Any) -> xr.Dataset:
    """`patch --ablation ABLATION`: ablate a site in the clean run instead of patching it.

    `ablation` is `zero`, `mean` (over `reference=` questions, default the clean ones),
    `resample` or `noise`; every other keyword is `patch_sweep`'s (`component`, `layers`,
    `positions`, `reference`, `out`, ...), with the same defaults.
    """
    from .patching.sweep import patch_sweep

    if ablation is None:
        raise UserError("ablate(): ablation=None is a patch, not an ablation; call patch_sweep")
    return patch_sweep(model, pairs, ablation=ablation, **kwargs)


def report(
    results: xr.Dataset | str | os.PathLike,
    out: str | os.PathLike,
    metric: str = "kl",
    k: int = 3,
    force: bool = False,
    **kwargs: Any,
) -> Path:
    """`report RESULTS --out DIR`: figures, tables and the report of a results Dataset (or file) in `out`.

    Returns the path of `report.md` (`readout.md` for a lens, attention or probe Dataset). A
    folder that holds a report already is refused unless `force`. Other keywords go to
    `analysis.write_report` (`formats`, `alpha`, `ci`, `n_resamples`, `seed`).
    """
    from .analysis.readouts import is_readout, write_readout_report
    from .analysis.report import prepare_report_dir

    out = Path(out)
    # Refuses an earlier report and any other non-empty folder without force.
    prepare_report_dir(out, force, flag="force=True")
    ds = _load(results) if isinstance(results, (str, os.PathLike)) else results
    if is_readout(ds):
        return write_readout_report(ds, out)
    from .analysis import kinds

    if kinds.result_kind(ds) in kinds.KIND_REPORTS:
        return kinds.write_kind_report(ds, out, None if metric == "kl" else metric)
    from .analysis.report import write_report

    return write_report(ds, out, metric=metric, k=k, force=force, **kwargs)


def _load(path: str | os.PathLike) -> xr.Dataset:
    """A results file of any kind `report` reads: a readout file as it is, else `analysis.load`'s checks."""
    import xarray as xr

    from .analysis.io import load
    from .analysis.readouts import is_readout

    try:
        ds = xr.load_dataset(path, engine="netcdf4")
    except Exception:  # not netCDF: `load` says in one line what it is
        return load(path)
    return ds if is_readout(ds) else load(path)
