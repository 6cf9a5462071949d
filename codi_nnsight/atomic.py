"""Writing files so that they are complete or absent: every output of the package goes through here.

A file is written under a temporary name beside its target and renamed over it (`os.replace` is
atomic on one filesystem), so a kill, a full disk or an error never leaves half a file where a
reader — or `--resume` — would trust it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError


class DiskError(UserError):
    """Output could not be written (disk full, permissions)."""


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it over `path`.

    Any failure removes the temporary file and becomes a one-line `DiskError` naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DiskError(f"{path}: cannot write ({write_failure(e, path.parent)})") from None
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """Write JSON atomically (a trailing newline, like a hand-written file)."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_failure(e: Exception, folder: Path) -> str:
    """Why a write failed, in words: netCDF/HDF5 hide ENOSPC behind a generic 'HDF error'."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        if shutil.disk_usage(folder).free < (1 << 20):
            return "No space left on device"
    except OSError:
        pass
    return f"{type(e).__name__}: {e}"
