"""Results on disk: a partial store that keeps every finished batch, and an atomic final file.

Layout while a sweep runs (`results.nc` being the requested output):

    results.nc.partial/
        config.json        what the sweep is (model, pairs hash, mode, ...): resume must match it
        batch-000000.nc    one netCDF per finished batch, each written to a temp name then renamed

At the end the batches are concatenated, the provenance attrs added, and the result written to
`results.nc.tmp-<pid>` and renamed over `results.nc` — so the final file is complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import UserError

SCHEMA = "codi-nnsight/results/1"


class DiskError(UserError):
    """Output could not be written (disk full, permissions)."""


def _write_atomic_nc(ds: xr.Dataset, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        encoded = ds.copy()
        for name in list(encoded.variables):
            if encoded[name].dtype == object:  # netCDF4 stores python strings as vlen str
                encoded[name] = encoded[name].astype(str)
        encoded.to_netcdf(tmp, engine="netcdf4")
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DiskError(f"{path}: cannot write ({_write_failure(e, path.parent)})") from None


def _write_failure(e: Exception, folder: Path) -> str:
    """Why a write failed, in words: netCDF/HDF5 hide ENOSPC behind a generic 'HDF error'."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        if shutil.disk_usage(folder).free < (1 << 20):
            return "No space left on device"
    except OSError:
        pass
    return f"{type(e).__name__}: {e}"


class PartialStore:
    """Finished batches of one sweep, kept on disk so nothing computed is lost."""

    def __init__(self, out: str | Path, config: dict[str, Any]) -> None:
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".partial")
        self.config = config

    def open(self, resume: bool) -> set[int]:
        """Create or reopen the store; return the pair ids already finished.

        Without `resume` an existing store is an error (so work is never silently discarded);
        with it, the stored configuration must equal this one, key by key.
        """
        cfg_path = self.dir / "config.json"
        if self.dir.exists() and cfg_path.exists():
            if not resume:
                raise UserError(f"{self.dir}: a partial run exists; rerun with --resume to continue it, "
                                f"or delete the folder to start over")
            stored = json.loads(cfg_path.read_text())
            diff = [k for k in sorted(set(stored) | set(self.config)) if stored.get(k) != self.config.get(k)]
            if diff:
                k = diff[0]
                raise UserError(f"{self.dir}: partial run has a different configuration "
                                f"({', '.join(diff)} differ; e.g. {k}: stored {stored.get(k)!r}, "
                                f"now {self.config.get(k)!r}); refusing to mix results")
            return {int(p) for ds in self.batches() for p in ds["pair"].values}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = cfg_path.with_name("config.json.tmp")
            tmp.write_text(json.dumps(self.config, sort_keys=True, indent=1))
            os.replace(tmp, cfg_path)
        except OSError as e:
            raise DiskError(f"{self.dir}: cannot write ({e.strerror or e})") from None
        return set()

    def add(self, ds: xr.Dataset) -> None:
        """Persist one finished batch."""
        n = len(list(self.dir.glob("batch-*.nc")))
        while (self.dir / f"batch-{n:06d}.nc").exists():
            n += 1
        _write_atomic_nc(ds, self.dir / f"batch-{n:06d}.nc")

    def batches(self) -> list[xr.Dataset]:
        """All finished batches (loaded into memory, files closed)."""
        out = []
        for path in sorted(self.dir.glob("batch-*.nc")):
            try:
                with xr.open_dataset(path, engine="netcdf4") as ds:
                    out.append(ds.load())
            except Exception:
                # A batch file is renamed into place only when complete; anything else is junk
                # from a kill during the write of a temp file and is ignored.
                continue
        return out

    def finish(self, attrs: dict[str, Any], order: list[int]) -> xr.Dataset:
        """Concatenate the batches in pair-file order, add attrs, write the final file atomically."""
        parts = self.batches()
        if not parts:
            raise UserError(f"{self.dir}: no finished pairs to write")
        ds = xr.concat(parts, dim="pair", data_vars="all", coords="different", compat="equals",
                       join="outer", combine_attrs="override")
        ds.attrs = {}
        rank = {pid: i for i, pid in enumerate(order)}
        ds = ds.isel(pair=np.argsort([rank.get(int(p), len(rank)) for p in ds["pair"].values], kind="stable"))
        ds.attrs.update(attrs)
        _write_atomic_nc(ds, self.out)
        shutil.rmtree(self.dir, ignore_errors=True)
        return ds


def clean_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """netCDF-safe attrs: bools to int, None to "", dicts/lists to JSON."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, bool):
            v = int(v)
        elif v is None:
            v = ""
        elif isinstance(v, (dict, list, tuple)):
            v = json.dumps(v, sort_keys=True)
        out[k] = v
    return out
