"""Results on disk: a partial store that keeps every finished batch, and an atomic final file.

Layout while a sweep runs (`results.nc` being the requested output):

    results.nc.partial/
        config.json        what the sweep is (model, pairs hash, mode, ...): resume must match it
        lock               {"pid": ..., "host": ...} of the run using the folder (held with flock)
        sha256.json        {batch file name: sha256 of its bytes}, recorded before the file is in place
        batch-000000.nc    one netCDF per finished batch, each written to a temp name then renamed

At the end the batches are concatenated, the provenance attrs added, and the result written to
a temporary file beside `results.nc` and moved into place only if `results.nc` is still absent
(or `force`) — so the final file is complete or absent, and never replaces another run's.

A results file holds exactly one run: every batch file carries the run's fingerprint (attr
`run_fingerprint_sha256`, the sha256 of the canonical JSON of `config`), and a batch of another
run, a batch whose bytes differ from the recorded hash (edited), a folder whose `config.json` is
missing or corrupt, a pair id stored twice or one not in the run's pairs is refused by name. One
run at a time uses a folder and its final file: `open` takes the lock before it checks that the
final file is absent, `finish` / `close` release it. A folder that a failed run began without
finishing any batch is removed on `close`, so the next run does not demand `--resume`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..atomic import DiskError, file_sha256, refuse_existing, write_json_atomic, write_netcdf_atomic, write_text_atomic
from ..errors import UserError
from ..run.fingerprint import fingerprint_difference
from ..run.writer import clean_attrs, write_results  # noqa: F401  (clean_attrs: re-exported)

try:  # POSIX: the lock's liveness is the kernel's flock, which dies with its process
    import fcntl
except ImportError:  # pragma: no cover - Windows: fall back to "is the PID alive"
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FINGERPRINT_ATTR = "run_fingerprint_sha256"
LOCK_NAME = "lock"
HASHES_NAME = "sha256.json"


def _write_atomic_nc(
    ds: xr.Dataset, path: Path, replace: bool = True, after: Callable[[Path], None] | None = None
) -> None:
    """Write a Dataset as netCDF4, complete or absent (see `atomic.write_netcdf_atomic`)."""
    write_netcdf_atomic(ds, path, replace=replace, after=after)


def run_fingerprint(config: dict[str, Any]) -> str:
    """sha256 (hex) of `config` as canonical JSON (sorted keys, no whitespace): what identifies a run."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class _Lock:
    """`<folder>/lock`: created with O_EXCL, holds the owner's PID, and is flock()ed while held.

    Why flock as well as the PID: a SIGKILLed run cannot remove its file, and its PID may be reused
    by an unrelated process; the kernel drops the flock with the process, so "flock free" means
    "stale" exactly. A stale file is taken over in place (never unlinked by a contender, which
    would race with another contender's fresh file).
    """

    # Locks held by this process, by path: a second store in the same process finds its peer here.
    held: dict[str, _Lock] = {}
    registry_lock = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key = str(path.absolute())
        self.fd: int | None = None
        self.thread = 0

    def acquire(self, folder: Path) -> None:
        """Take the lock or raise `UserError` naming the PID that holds it."""
        if self.fd is not None:
            return
        for _ in range(20):  # each retry follows a lock released under our feet; bounded anyway
            with _Lock.registry_lock:
                peer = _Lock.held.get(self.key)
            if peer is not None and peer is not self and peer.fd is not None:
                alive = {t.ident for t in threading.enumerate()}
                if peer.thread != threading.get_ident() and peer.thread in alive:
                    raise UserError(
                        f"{folder}: is in use by PID {os.getpid()} (another thread of this process); "
                        "wait for that sweep to finish"
                    )
                # An earlier sweep in this thread ended without close() (e.g. an exception): it is over.
                peer.release()
            created = True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # released between our two opens
            except FileNotFoundError:  # the folder's last user removed it (empty) just now: remake it
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise DiskError(f"{folder}: cannot write ({e.strerror or e})") from None
                continue
            except OSError as e:
                raise DiskError(f"{self.path}: cannot create the lock ({e.strerror or e})") from None
            if not self._claim(fd, created, folder):
                continue
            return
        raise UserError(
            f"{folder}: could not take the lock {self.path} (it keeps changing); is another run "
            "starting on the same output?"
        )

    def _claim(self, fd: int, created: bool, folder: Path) -> bool:
        """Lock `fd` and write our PID; False to retry; raise if a live run holds it."""
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except (BlockingIOError, PermissionError):
                    raise UserError(self._in_use(folder, fd)) from None
            elif not created:
                holder = self._read(fd)
                pid = holder.get("pid")
                if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
                    raise UserError(self._in_use(folder, fd))
            try:  # the path must still name the file we locked (its holder may have just released it)
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    return False
            except FileNotFoundError:
                os.close(fd)
                return False
            previous = {} if created else self._read(fd)
            body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, body.encode(), 0)
        except UserError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise DiskError(f"{self.path}: cannot write the lock ({e.strerror or e})") from None
        if previous:
            log.info("%s: took over a stale lock of PID %s", folder, previous.get("pid", "?"))
        self.fd = fd
        self.thread = threading.get_ident()
        with _Lock.registry_lock:
            _Lock.held[self.key] = self
        return True

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _in_use(self, folder: Path, fd: int) -> str:
        holder = self._read(fd)
        where = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
        return (
            f"{folder}: is in use by PID {holder.get('pid', '?')}{where}; wait for that run to finish "
            f"(if no such process is running, delete {self.path})"
        )

    def release(self) -> None:
        """Remove the lock file and drop the flock (idempotent)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with _Lock.registry_lock:
            if _Lock.held.get(self.key) is self:
                del _Lock.held[self.key]
        try:  # unlink only our own file: the flock guarantees nobody replaced it while we held it
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- the store


class PartialStore:
    """Finished batches of one sweep, kept on disk so nothing computed is lost.

    Use it as a context manager (or call `close()`) so the folder's lock is released however the
    sweep ends; `finish()` releases it too. A store that is garbage-collected, or a process that
    exits, releases it as well, and a lock left by a killed process is taken over.

    The lock covers the final file too: `open` checks that `out` does not exist only once it
    holds the lock, and `finish` moves the result into place only if `out` is still absent —
    unless `force` — so two runs on one output never replace each other's finished result.
    """

    def __init__(self, out: str | Path, config: dict[str, Any], force: bool = False) -> None:
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".partial")
        self.config = config
        self.force = force
        self.fingerprint = run_fingerprint(config)
        self._lock = _Lock(self.dir / LOCK_NAME)
        self._hashes: dict[str, str] = {}
        # Whether this store began the folder (made it, or wrote its config): only then may
        # `close` remove it when no batch was finished.
        self._made_dir = False
        self._fresh = False
        # Release at garbage collection / interpreter exit; refers to the lock only, not to self.
        self._finalizer = weakref.finalize(self, self._lock.release)

    def __enter__(self) -> PartialStore:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Release the folder's lock (idempotent); the finished batches stay for `--resume`.

        With `failed` (the run ended in an error; the context manager passes it), a folder this
        store began that holds no finished batch is removed: there is nothing in it to resume,
        and leaving it would make the next run demand `--resume`.
        """
        held = self.locked
        if held and failed and (self._fresh or self._made_dir) and not self._batch_files():
            for name in ("config.json", HASHES_NAME):  # only what the store writes; anything else stays
                (self.dir / name).unlink(missing_ok=True)
        self._lock.release()
        if held:
            try:  # only if empty: a folder holding anything is kept
                self.dir.rmdir()
            except OSError:
                pass

    @property
    def locked(self) -> bool:
        """Whether this store holds its folder's lock."""
        return self._lock.fd is not None

    def open(self, resume: bool, pair_ids: Iterable[int] | None = None) -> set[int]:
        """Lock the store, create or reopen it, and return the pair ids already finished.

        Without `resume` an existing store is an error (so work is never silently discarded);
        with it, the stored configuration must equal this one, key by key, and every batch file
        must carry this run's fingerprint and recorded content hash, with no pair id twice and,
        if `pair_ids` (the run's pairs) is given, none outside it. The final file must not exist
        unless `force`. On any error the lock is released.

        Raises:
            UserError: the final file exists, the folder is in use by another run, or it holds
                something that is not exactly this run (each message names the file).
            DiskError: the folder, its lock or its config cannot be written.
        """
        try:
            self.dir.mkdir(parents=True)
            self._made_dir = True
        except FileExistsError:
            pass
        except OSError as e:
            raise DiskError(f"{self.dir}: cannot write ({e.strerror or e})") from None
        self._lock.acquire(self.dir)
        try:
            return self._open_locked(resume, None if pair_ids is None else {int(p) for p in pair_ids})
        except BaseException:
            self.close(failed=True)
            raise

    def _open_locked(self, resume: bool, known: set[int] | None) -> set[int]:
        # Under the lock: a run that finishes `out` meanwhile does so before we look.
        refuse_existing(self.out, self.force)
        cfg_path = self.dir / "config.json"
        if cfg_path.exists():
            if not resume:
                raise UserError(
                    f"{self.dir}: a partial run exists; rerun with --resume to continue it, "
                    f"or delete the folder to start over"
                )
            stored = self._stored_config(cfg_path)
            diff = fingerprint_difference(stored, self.config)
            if diff is not None:
                raise UserError(
                    f"{self.dir}: partial run has a different configuration ({diff}); refusing to mix results"
                )
            self._hashes = self._stored_hashes()
            return {p for ds in self._load(known) for p in ds["pair"].values.astype(int).tolist()}
        orphans = self._batch_files()
        if orphans:
            raise UserError(
                f"{cfg_path}: missing, but the folder holds {len(orphans)} batch file(s) "
                f"({orphans[0].name}, ...) of an unknown run; refusing to mix results — delete "
                f"{self.dir} to start over"
            )
        self._fresh = True
        self._hashes = {}
        write_text_atomic(cfg_path, json.dumps(self.config, sort_keys=True, indent=1))
        return set()

    def _stored_config(self, cfg_path: Path) -> dict[str, Any]:
        try:
            stored = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{cfg_path}: corrupt ({e}); cannot tell which run the folder holds — delete {self.dir} to start over"
            ) from None
        except UnicodeDecodeError:
            raise UserError(
                f"{cfg_path}: corrupt (not UTF-8 text); cannot tell which run the folder holds — "
                f"delete {self.dir} to start over"
            ) from None
        except OSError as e:
            raise UserError(f"{cfg_path}: cannot read ({e.strerror or e})") from None
        if not isinstance(stored, dict):
            raise UserError(
                f"{cfg_path}: corrupt (a JSON {type(stored).__name__}, not an object); cannot tell "
                f"which run the folder holds — delete {self.dir} to start over"
            )
        return stored

    def _stored_hashes(self) -> dict[str, str]:
        """The recorded sha256 of each batch file ({} if none was recorded yet)."""
        path = self.dir / HASHES_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(
                f"{path}: corrupt ({e}); cannot check the batch files — delete {self.dir} to start over"
            ) from None
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise UserError(
                f"{path}: corrupt (not an object of file names to sha256 strings); cannot check the "
                f"batch files — delete {self.dir} to start over"
            )
        return data

    def _batch_files(self) -> list[Path]:
        return sorted(self.dir.glob("batch-*.nc"))

    def _clear(self) -> None:
        """Remove everything in the folder but the lock (which `release` removes)."""
        for entry in self.dir.iterdir():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def add(self, ds: xr.Dataset) -> None:
        """Persist one finished batch, stamped with this run's fingerprint, its hash recorded."""
        if not self.locked:
            raise RuntimeError(f"{self.dir}: PartialStore.add before open() (or after finish/close)")
        n = len(self._batch_files())
        while (self.dir / f"batch-{n:06d}.nc").exists():
            n += 1
        name = f"batch-{n:06d}.nc"
        stamped = ds.copy(deep=False)
        stamped.attrs = {**ds.attrs, FINGERPRINT_ATTR: self.fingerprint}

        def record(tmp: Path) -> None:
            # Recorded before the file is moved into place: a batch in place always has its hash
            # (a crash in between leaves a hash of no file, which the next batch of that name replaces).
            self._hashes[name] = file_sha256(tmp)
            write_json_atomic(self.dir / HASHES_NAME, self._hashes)

        _write_atomic_nc(stamped, self.dir / name, after=record)

    def _load(self, known: set[int] | None = None) -> list[xr.Dataset]:
        """Every finished batch of this run, checked: fingerprint, no pair id twice, content hash,
        and (if `known` is given) no pair id outside it."""
        out = []
        owner: dict[int, str] = {}
        for path in self._batch_files():
            try:
                digest = file_sha256(path)
                with xr.open_dataset(path, engine="netcdf4") as f:
                    ds = f.load()
            except Exception as e:
                # Batch files are renamed into place only when complete, so this one was damaged
                # afterwards; its pairs count as not done and are computed again.
                log.warning("%s: unreadable, its pairs will be recomputed (%s: %s)", path, type(e).__name__, e)
                continue
            stamp = ds.attrs.get(FINGERPRINT_ATTR)
            if stamp != self.fingerprint:
                what = (
                    f"fingerprint {str(stamp)[:12]}…, this run's {self.fingerprint[:12]}…"
                    if stamp
                    else "it has no run fingerprint"
                )
                raise UserError(
                    f"{path}: batch file from a different run ({what}); refusing to mix results — "
                    f"delete it, or {self.dir} to start over"
                )
            ids = ds["pair"].values.astype(int).tolist()
            for pid in ids:
                if pid in owner:
                    raise UserError(
                        f"{path}: pair_id {pid} is also in {owner[pid]} (a copied batch file?); "
                        "refusing to mix results — delete one of them"
                    )
                owner[pid] = path.name
            self._check_hash(path, digest)
            unknown = [pid for pid in ids if known is not None and pid not in known]
            if unknown:
                raise UserError(
                    f"{path}: pair_id {unknown[0]} is not in the pairs file; refusing to mix results — "
                    f"delete it, or {self.dir} to start over"
                )
            ds.attrs.pop(FINGERPRINT_ATTR, None)
            out.append(ds)
        return out

    def _check_hash(self, path: Path, digest: str) -> None:
        """Refuse a batch file whose bytes are not those the run wrote (edited, or put there by hand)."""
        recorded = self._hashes.get(path.name)
        if recorded is None:
            raise UserError(
                f"{path}: no content hash recorded for it in {HASHES_NAME} (not written by this run, "
                f"or by an older version); refusing to use it — delete it to recompute its pairs, "
                f"or {self.dir} to start over"
            )
        if recorded != digest:
            raise UserError(
                f"{path}: contents changed since the run wrote it (sha256 {digest[:12]}…, recorded "
                f"{recorded[:12]}…); refusing to use an edited batch — delete it to recompute its "
                f"pairs, or {self.dir} to start over"
            )

    def batches(self) -> list[xr.Dataset]:
        """All finished batches (loaded into memory, files closed), checked to be this run's."""
        return self._load()

    def finish(
        self, attrs: dict[str, Any], order: list[int], transform: Callable[[xr.Dataset], xr.Dataset] | None = None
    ) -> xr.Dataset:
        """Concatenate the batches in pair-file order, add attrs, write the final file atomically.

        `order` lists every pair of the run: a pair missing from the stored batches is an error
        (the folder is kept, to rerun with --resume), and so is a stored pair outside it.
        `transform`, if given, maps the merged Dataset (attrs set) to the one written. The final
        file is moved into place only if it is still absent (or `force`). The folder is removed
        and the lock released; the lock is released on failure too.
        """
        try:
            parts = self._load(known={int(p) for p in order})
            if not parts:
                raise UserError(f"{self.dir}: no finished pairs to write")
            ds = xr.concat(
                parts,
                dim="pair",
                data_vars="all",
                coords="different",
                compat="equals",
                join="outer",
                combine_attrs="override",
            )
            ds.attrs = {}
            stored = ds["pair"].values.astype(int).tolist()
            missing = sorted(set(order) - set(stored))
            if missing:
                raise UserError(
                    f"{self.dir}: pair_id {', '.join(map(str, missing[:5]))}"
                    f"{' ...' if len(missing) > 5 else ''} missing from the stored batches; rerun "
                    "with --resume to compute them"
                )
            rank = {pid: i for i, pid in enumerate(order)}
            ds = ds.isel(pair=np.argsort([rank[p] for p in stored], kind="stable"))
            ds.attrs.update(attrs)
            if transform is not None:
                ds = transform(ds)
            try:
                write_results(ds, self.out, replace=self.force)  # the one writer of results files
            except DiskError:
                raise
            except UserError as e:  # another run wrote `out` meanwhile: keep ours, say how to use it
                raise UserError(
                    f"{e}; this run's pairs are kept in {self.dir} — rerun with --resume --force to replace it"
                ) from None
            self._clear()
        except BaseException:
            self.close(failed=True)
            raise
        self.close()
        return ds
