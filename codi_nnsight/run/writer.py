"""The one writer of results files: netCDF, complete or absent, with netCDF-safe, scrubbed attrs.

Every command's Dataset goes to disk through `write_results`, so every result kind gets the same
guarantees: an atomic rename (a kill or a full disk never leaves half a file), a one-line error
naming the path, no stray temporary file, and no credentials in any recorded attribute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xarray as xr

from ..atomic import write_netcdf_atomic
from ..contract import declare
from ..model.remote import scrub


def clean_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """netCDF-safe attrs: bools to int, None to "", dicts/lists to JSON, credentials scrubbed from text."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, bool):
            v = int(v)
        elif v is None:
            v = ""
        elif isinstance(v, (dict, list, tuple)):
            v = json.dumps(v, sort_keys=True)
        if isinstance(v, str):
            v = scrub(v)
        out[k] = v
    return out


def encode_for_netcdf(ds: xr.Dataset) -> xr.Dataset:
    """A copy with python-object string variables as str (netCDF4 vlen strings) and clean attrs."""
    encoded = ds.copy()
    for name in list(encoded.variables):
        if encoded[name].dtype == object:
            encoded[name] = encoded[name].astype(str)
    # The output contract: the file says what kind it is and what each of its metrics means.
    encoded.attrs = clean_attrs(declare(dict(encoded.attrs), encoded.data_vars))
    return encoded


def write_results(ds: xr.Dataset, path: str | os.PathLike, replace: bool = True) -> Path:
    """Write `ds` to `path` as netCDF4 atomically; returns the path.

    `replace=False` refuses (one line) when `path` appeared meanwhile: a run never replaces a file
    another run finished while it worked.

    Raises:
        DiskError: the file could not be written (one line naming it; no temporary file left).
    """
    return write_netcdf_atomic(encode_for_netcdf(ds), Path(path), replace=replace)
