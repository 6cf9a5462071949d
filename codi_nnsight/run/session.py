"""`Run`: one command's execution on one backend — identity, provenance, batching and writing.

Every command (sweep, ablation, attribution, early exit, lens, tuned lens, attention, probe) makes
one `Run` for its model and `remote=` value and asks it, rather than re-deriving each answer:

    run = Run(model, remote)                  # resolves the backend, refuses a forbidden target
    with run.errors(), model.trace(..., **run.trace_kwargs()):
        ...
    ds.attrs.update(run.provenance())          # what really computed the numbers (server probed once)
    run.write(ds, "out.nc")                    # the one atomic writer

A command that loops over batches hands the loop to the run (`Run.map`), which runs it on the
run's executor — this process, or Ray workers with `workers=` / `ray_address=` — made on first
use and kept for every later loop of the command (one Ray cluster per command, however many
loops it has); `with Run(...) as run:` releases it.

The provenance is probed where the numbers are computed: on a server, its dtype, device, weights
fingerprint, checkpoint hash and library versions, with a server holding other weights than the
client's checkpoint refused before any work (`ServerModelMismatch`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as _md
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import xarray as xr

from ..errors import UserError
from ..model.remote import scrub
from .backend import Backend, resolve_backend
from .executors import Executor, OnResult, WorkFn, check_executor, use_executor
from .writer import clean_attrs, write_results

#: Libraries whose versions decide the numbers (recorded in every results file).
VERSIONED = ("codi-nnsight", "nnsight", "torch", "transformers", "numpy", "xarray")


def _version(name: str) -> str:
    try:
        return _md.version(name)
    except _md.PackageNotFoundError:
        return "unknown"


def client_versions() -> dict[str, str]:
    """`version_<lib>` of this process for every library in `VERSIONED`."""
    return {f"version_{n.replace('-', '_')}": _version(n) for n in VERSIONED}


def now() -> str:
    """UTC time, ISO 8601 to the second (start/end of a run)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def recorded_command(command: str | None = None) -> str:
    """The command line to record, credentials scrubbed: the given one, else the `codi-nnsight`
    command being run (from click's context), else this process's argv."""
    if command is None:
        import click

        ctx = click.get_current_context(silent=True)
        argv = ctx.find_root().meta.get("argv") if ctx is not None else None
        command = shlex.join(["codi-nnsight", *argv]) if argv is not None else shlex.join(sys.argv)
    return scrub(command)


class Run:
    """One command's execution of `model`'s traces on the backend `remote` resolves to.

    Args:
        model: a `CODIModel` (loaded with weights, or `remote_only` for a server backend).
        remote: nnsight's `remote=` value or a `Backend`.
        command: the command line to record (default: this process's argv), credentials scrubbed.
        workers: where `map` runs the batches: None or 1, this process; N > 1, N Ray workers; or
            an `Executor` the caller owns (used, never closed here).
        ray_address: an existing Ray cluster for the workers (`--ray-address`).

    Raises:
        UserError: a refused target, or `workers` / `ray_address` that cannot run (Ray missing,
            a remote backend) — both checked here, before any work — or a local backend for a
            model that has no local weights.
    """

    def __init__(
        self,
        model: Any,
        remote: bool | str | Backend | None = False,
        command: str | None = None,
        workers: int | Executor | None = None,
        ray_address: str | None = None,
    ) -> None:
        self.model = model
        self.backend = resolve_backend(remote)
        self.backend.check()
        if self.backend.needs_local_weights and getattr(model, "remote_only", False):
            raise UserError(
                f"{model.name} was loaded for remote runs only (remote_only=True): it has no weights here, "
                f"so it cannot run {'locally' if self.backend.kind == 'local' else 'with remote=local'}"
            )
        if not isinstance(workers, Executor):
            check_executor(workers, ray_address, self.backend)
        self.workers, self.ray_address = workers, ray_address
        self._executor: Executor | None = None
        self.command = recorded_command(command)
        self.start_time = now()
        self._provenance: dict[str, Any] | None = None

    # -- where the batches run ----------------------------------------------------------------------
    def map(self, work: WorkFn, context: Any, jobs: Any, on_result: OnResult) -> None:
        """Run `work(model, context, job)` for every job on this run's executor; `on_result(index,
        result)` runs here as each finishes (completion order on workers: store by index).

        `work` must be a module-level function (a worker imports it by name) and must not depend
        on where it runs: on a worker, `model` is the worker's own copy, loaded from this model's
        spec. The executor is made on the first call and reused by later ones.
        """
        if self._executor is None:
            self._executor = use_executor(self.workers, self.ray_address, self.backend)
        self._executor.map(self.model, work, context, list(jobs), on_result)

    def close(self) -> None:
        """Release the executor (a local Ray cluster started for this run stops); idempotent."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the trace call ---------------------------------------------------------------------------
    @property
    def remote(self) -> bool | str:
        """nnsight's `remote=` value of this run."""
        return self.backend.remote

    def trace_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.trace` / `model.session`."""
        return self.backend.trace_kwargs()

    def errors(self) -> Any:
        """Context manager for one trace: transport and server failures become one line."""
        return self.backend.errors()

    # -- what computes the numbers ------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        """Attrs saying what computed the numbers, the same keys for every result kind.

        `computed_on`, `dtype` (the dtype the numbers were computed in) and its source, the
        device, the weights fingerprint and checkpoint hash (see `CODIModel.provenance`; on a
        server, probed there once per run), `remote` (the target's name, "" when local),
        `version_*` (the libraries that ran the traces: the server's where it reports them, with
        this process's as `client_version_*`), `command` (credentials scrubbed) and `start_time`.

        Raises:
            ServerModelMismatch: the server holds other weights than the client's checkpoint.
        """
        if self._provenance is None:
            attrs = dict(self.model.provenance(self.remote))
            for key, mine in client_versions().items():
                if key in attrs and attrs[key] != mine:
                    attrs[f"client_{key}"] = mine
                attrs.setdefault(key, mine)
            method = getattr(self.model, "method", None)
            attrs["latent_method"] = getattr(method, "name", "codi")
            attrs.update(remote=self.backend.label, command=self.command, start_time=self.start_time)
            self._provenance = clean_attrs(attrs)
        return dict(self._provenance)

    def weights_identity(self) -> str:
        """A string naming the weights the traces run on, for run fingerprints.

        The checkpoint hash where one is known (the server's on a server), else a hash of the
        weights fingerprint: a run resumed against other weights never matches.
        """
        prov = self.provenance()
        if prov.get("checkpoint_sha256"):
            return str(prov["checkpoint_sha256"])
        norms = json.loads(prov.get("weights_fingerprint") or "[]")
        text = json.dumps([float(f"{x:.6e}") for x in norms])
        return "fingerprint-sha256:" + hashlib.sha256(text.encode()).hexdigest()

    # -- batching -----------------------------------------------------------------------------------
    def auto_batch_size(self, rows_per_pair: int, prompt_len: int) -> int:
        """Pairs per trace for `--batch-size auto` on this run's backend (`batching.auto_batch_size`)."""
        from .batching import auto_batch_size

        return auto_batch_size(self.model, rows_per_pair, prompt_len, self.backend)

    # -- output -------------------------------------------------------------------------------------
    def finish(self, ds: xr.Dataset, **attrs: Any) -> xr.Dataset:
        """`ds` with this run's provenance, `attrs` and the end time in its attrs (netCDF-safe)."""
        ds.attrs = clean_attrs({**ds.attrs, **self.provenance(), **attrs, "end_time": now()})
        return ds

    @staticmethod
    def write(ds: xr.Dataset, path: str | os.PathLike) -> Path:
        """Write a results Dataset atomically (the one writer: `writer.write_results`)."""
        return write_results(ds, path)
