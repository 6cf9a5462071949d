"""Writers on a full disk, and the no-replace move: one line naming the file, no temporary file left."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from codi_nnsight import atomic
from codi_nnsight.atomic import (
    DiskError,
    write_atomic,
    write_json_atomic,
    write_netcdf_atomic,
    write_text_atomic,
)
from codi_nnsight.errors import UserError
from codi_nnsight.patching.store import PartialStore

CONFIG = {"mode": "recurrent", "pairs_sha256": "abc", "seed": 0}


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, so the disk really fills (needs mount rights; skipped without)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        # lazy: a netCDF handle that HDF5 could not close (full disk) may still point into it
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the filesystem of `folder` to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def big() -> xr.Dataset:
    return xr.Dataset({"kl": ("pair", np.arange(50_000, dtype=np.float64))})


def test_netcdf_larger_than_the_free_space(small_disk):
    out = small_disk / "r.nc"
    free = shutil.disk_usage(small_disk).free
    with pytest.raises(DiskError) as e:
        write_netcdf_atomic(big(), out)
    assert one_line(e) == f"{out}: cannot write (No space left on device)"
    assert os.listdir(small_disk) == []
    # HDF5 keeps the failed file open; its space must be free again all the same
    assert shutil.disk_usage(small_disk).free == free


def test_netcdf_on_a_full_disk_is_not_permission_denied(small_disk):
    # netCDF4 reports the create on a full tmpfs as EACCES; it is the disk, not the permissions.
    fill(small_disk)
    out = small_disk / "r.nc"
    with pytest.raises(DiskError) as e:
        write_netcdf_atomic(xr.Dataset({"kl": ("pair", [0.5])}), out)
    assert one_line(e) == f"{out}: cannot write (No space left on device)"
    with pytest.raises(DiskError) as e:
        write_text_atomic(small_disk / "t.json", "{}")
    assert one_line(e) == f"{small_disk / 't.json'}: cannot write (No space left on device)"
    assert os.listdir(small_disk) == ["filler"]


def test_store_batches_on_a_disk_that_fills(small_disk):
    store = PartialStore(small_disk / "r.nc", CONFIG)
    store.open(resume=False)
    ids = np.arange(1000, dtype=np.int64)
    with pytest.raises(DiskError) as e:
        for start in range(0, 30_000, 1000):
            part = ids + start
            store.add(xr.Dataset({"kl": ("pair", part.astype(float))}, coords={"pair": part}))
    assert "cannot write (No space left on device)" in one_line(e)
    store.close()
    partial = small_disk / "r.nc.partial"
    assert not [p for p in partial.iterdir() if ".tmp-" in p.name], "no temporary file left"
    kept = sorted(partial.glob("batch-*.nc"))
    assert kept, "batches written before the disk filled are kept"
    resumed = PartialStore(small_disk / "r.nc", CONFIG)
    assert len(resumed.open(resume=True)) == 1000 * len(kept)  # each kept batch is whole and recorded
    resumed.close()


def test_a_writer_that_hits_enospc_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "r.bin"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskError) as e:
        write_atomic(out, write)
    assert one_line(e) == f"{out}: cannot write (No space left on device)"
    assert os.listdir(tmp_path) == []


def test_permission_denied_on_a_full_disk_is_called_a_full_disk(tmp_path, monkeypatch):
    out = tmp_path / "r.nc"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(DiskError) as e:  # plenty of space: the library's words stand
        write_atomic(out, write)
    assert one_line(e) == f"{out}: cannot write (Permission denied)"

    def full(path):
        return shutil._ntuple_diskusage(64 << 10, 64 << 10, 0)  # type: ignore[attr-defined]

    monkeypatch.setattr(atomic.shutil, "disk_usage", full)
    with pytest.raises(DiskError) as e:
        write_atomic(out, write)
    assert one_line(e) == f"{out}: cannot write (No space left on device)"

    def hdf_error(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("NetCDF: HDF error")

    with pytest.raises(DiskError) as e:
        write_atomic(out, hdf_error)
    assert one_line(e) == f"{out}: cannot write (No space left on device)"

    def bug(tmp: Path) -> None:
        raise TypeError("cannot encode object")

    with pytest.raises(DiskError) as e:  # not an I/O failure: named as itself, even on a full disk
        write_atomic(out, bug)
    assert one_line(e) == f"{out}: cannot write (TypeError: cannot encode object)"
    assert os.listdir(tmp_path) == []


def test_interrupt_during_a_write_leaves_no_temporary_file(tmp_path):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    write_json_atomic(tmp_path / "r.json", {})
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "r.bin", write)
    assert os.listdir(tmp_path) == ["r.json"]


# --------------------------------------------------------------------------- move into place only if absent


def test_no_replace_refuses_an_existing_file_and_keeps_it(tmp_path):
    out = tmp_path / "r.txt"
    out.write_text("mine")
    with pytest.raises(UserError) as e:
        write_text_atomic(out, "theirs", replace=False)
    assert not isinstance(e.value, DiskError)
    assert one_line(e) == f"{out}: file exists; add --force to overwrite it"
    assert out.read_text() == "mine" and os.listdir(tmp_path) == ["r.txt"]
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="file exists; add --force"):
        write_text_atomic(link, "x", replace=False)
    assert not (tmp_path / "nowhere").exists()
    write_text_atomic(tmp_path / "new.txt", "fresh", replace=False)
    assert (tmp_path / "new.txt").read_text() == "fresh"
    write_text_atomic(out, "theirs")  # replace=True, the --force path
    assert out.read_text() == "theirs"


def test_no_replace_without_hard_links_still_refuses(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    out = tmp_path / "r.txt"
    write_text_atomic(out, "first", replace=False)
    assert out.read_text() == "first"
    with pytest.raises(UserError, match="file exists; add --force to overwrite it"):
        write_text_atomic(out, "second", replace=False)
    assert out.read_text() == "first" and os.listdir(tmp_path) == ["r.txt"]
