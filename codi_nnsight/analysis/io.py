"""Loading and validating ``results.nc`` files written by ``codi-nnsight patch``."""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from ..errors import UserError

SCHEMA_PREFIX = "codi-nnsight/results/"


class ResultsError(UserError):
    """A results file is missing, unreadable, or not in the codi-nnsight results schema."""


def validate(ds: xr.Dataset, name: str = "dataset", required: tuple[str, ...] = ("kl",)) -> None:
    """Check that ``ds`` follows the results schema; raise :class:`ResultsError` if not.

    ``name`` is used as the prefix of the one-line error message (normally the file name).
    """
    schema = ds.attrs.get("codi_nnsight_schema")
    if schema is None:
        raise ResultsError(
            f"{name}: not a codi-nnsight results file (attr codi_nnsight_schema missing)"
        )
    if not str(schema).startswith(SCHEMA_PREFIX):
        raise ResultsError(
            f"{name}: not a codi-nnsight results file (codi_nnsight_schema = {schema!r})"
        )
    for dim in ("pair", "layer"):
        if dim not in ds.dims:
            raise ResultsError(f"{name}: malformed results file (dimension {dim!r} missing)")
    for var in required:
        if var not in ds.data_vars:
            raise ResultsError(f"{name}: malformed results file (variable {var!r} missing)")


def load(path: str | Path) -> xr.Dataset:
    """Open a results netCDF file, load it fully into memory, close it and validate it.

    Raises :class:`ResultsError` with a one-line message naming the file when the file is
    missing, is not a readable netCDF file, is not a codi-nnsight results file, or lacks a
    required dimension or the ``kl`` variable.
    """
    name = str(path)  # as the user gave it: that is the name they recognize
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{name}: no such file")
    if path.is_dir():
        raise ResultsError(f"{name}: is a directory, not a results file")
    try:
        # load() then close: the caller gets an in-memory Dataset and no open file handle
        # (important on Windows and when the file is rewritten later in the same process).
        with xr.open_dataset(path, engine="netcdf4") as handle:
            ds = handle.load()
    except Exception as exc:  # netCDF4 raises OSError/RuntimeError/ValueError variously
        raise ResultsError(f"{name}: not a readable netCDF file (truncated or corrupt?)") from exc
    validate(ds, name)
    return ds
