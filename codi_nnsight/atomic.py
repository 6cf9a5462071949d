"""Writing files so that they are complete or absent: every output of the package goes through here.

A file is written under a temporary name beside its target and renamed over it (`os.replace` is
atomic on one filesystem), so a kill, a full disk or an error never leaves half a file where a
reader — or `--resume` — would trust it. With `replace=False` the rename happens only if the
target is still absent at that instant (a hard link, which refuses an existing name), so a
result that another run finished in the meantime is never replaced without `--force`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

NO_SPACE = "No space left on device"
# Below this much free space a failed write is a full disk, whatever the library called it:
# HDF5/netCDF report ENOSPC as "NetCDF: HDF error" or even EACCES ("Permission denied").
_FULL_BELOW = 1 << 20
# errno values of a filesystem that has no hard links: fall back to check-then-rename there.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


class DiskError(UserError):
    """Output could not be written (disk full, permissions)."""


def exists_message(path: str | os.PathLike) -> str:
    """The one-line refusal to overwrite `path` (the same words as the CLI's `--force` check)."""
    path = Path(path)
    kind = "folder" if path.is_dir() else "file"
    return f"{path}: {kind} exists; add --force to overwrite it"


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """Raise `UserError` if `path` exists (a dangling symlink counts) and not `force`."""
    if not force and os.path.lexists(path):
        raise UserError(exists_message(path))


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path`.

    Args:
        path: the file to write.
        write: writes the whole content to the path it is given.
        replace: True to replace an existing `path`; False to move into place only if `path`
            does not exist at the moment of the rename (checked atomically where the
            filesystem has hard links).

    Raises:
        DiskError: the write or the rename failed (one line naming `path`; a full disk is
            reported as "No space left on device" whatever the library said).
        UserError: `replace` is False and `path` exists.

    No temporary file is left behind, also on KeyboardInterrupt.
    """
    path = Path(path)
    # pid and thread: two writers of one target in one process never share a temporary file
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        _move_into_place(tmp, path, replace)
    except UserError:
        _discard(tmp)
        raise
    except Exception as e:
        why = write_failure(e, path.parent)  # before the unlink: the partial file shows a full disk
        _discard(tmp)
        raise DiskError(f"{path}: cannot write ({why})") from None
    except BaseException:
        _discard(tmp)
        raise
    return path


def _discard(tmp: Path) -> None:
    """Remove a temporary file, and free its space even if a library still holds it open.

    netCDF4/HDF5 keep a file open when its close fails (as it does on a full disk); unlinking
    alone would leave its blocks in use until the process exits, so it is emptied first.
    """
    try:
        os.truncate(tmp, 0)
    except OSError:
        pass
    tmp.unlink(missing_ok=True)


def _move_into_place(tmp: Path, path: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails with EEXIST if `path` exists: the check and the move are one step
    except FileExistsError:
        raise UserError(exists_message(path)) from None
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        # No hard links here: check, then rename. Callers that need this race-free hold a lock.
        refuse_existing(path, force=False)
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str, replace: bool = True) -> Path:
    """Write UTF-8 text atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), replace)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 1, replace: bool = True) -> Path:
    """Write JSON atomically (a trailing newline, like a hand-written file)."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n", replace)


def write_netcdf_atomic(
    ds: xr.Dataset, path: str | os.PathLike, replace: bool = True, after: Callable[[Path], None] | None = None
) -> Path:
    """Write a Dataset as netCDF4, complete or absent (python strings as variable-length str).

    `after(tmp)`, if given, runs once the temporary file is complete and before it is moved into
    place (e.g. to record its content hash), so nothing is ever in place unrecorded.
    """

    def write(tmp: Path) -> None:
        encoded = ds.copy()
        for name in list(encoded.variables):
            if encoded[name].dtype == object:  # netCDF4 stores python strings as vlen str
                encoded[name] = encoded[name].astype(str)
        encoded.to_netcdf(tmp, engine="netcdf4")
        if after is not None:
            after(tmp)

    return write_atomic(path, write, replace)


def write_failure(e: BaseException, folder: Path) -> str:
    """Why a write failed, in words.

    netCDF/HDF5 hide ENOSPC behind "NetCDF: HDF error" or "Permission denied", so a failure in a
    writable folder on a (nearly) full filesystem is reported as a full disk.
    """
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return NO_SPACE
    if "os error 28" in str(e) or "No space left on device" in str(e):  # safetensors' Rust I/O error
        return NO_SPACE
    # Only I/O failures (RuntimeError is how netCDF4 raises "NetCDF: HDF error"): a bug that raises
    # e.g. a TypeError on a nearly full disk is reported as itself.
    io_failure = isinstance(e, (OSError, RuntimeError))
    denied = isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM)
    if io_failure and _disk_full(folder) and not (denied and not os.access(folder, os.W_OK)):
        return NO_SPACE
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _FULL_BELOW
    except OSError:
        return False


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks (checkpoints, batch files, report files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` (and its parents) and check a file can be written there, before any work.

    Raises:
        UserError: one line naming the folder and why ("Permission denied", ...).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".codi-nnsight-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{folder}: cannot write there ({e.strerror or e})") from None
    return folder
