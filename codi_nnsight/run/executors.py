"""Executors of the run layer: where a command's batches run — this process, or a pool of Ray workers.

A command that loops over batches hands the loop to its run, which owns the executor (made on
first use, one per command, closed with the run):

    with Run(model, remote, workers=workers, ray_address=ray_address) as run:
        run.map(work, context, jobs, on_result)

`work(model, context, job)` is a module-level function (so a worker process can import it by
name) that traces one batch and returns what the driver keeps; `on_result(index, result)` runs in
the driver, in completion order, and is where a finished batch reaches the partial store and the
progress bar. The executors are one table (`EXECUTORS`), as the backends are:

- `local` — this process, one batch after the other: what every command did before executors.
- `ray` — a pool of Ray actors, each loading the model once from the driver's *spec* (its config
  file, dtype, device and question normalization, never the weights) on one torch thread, and
  taking batches from the driver's queue. A worker that dies (SIGKILL, out of memory) has its
  batch run again on a fresh worker; a worker that cannot load the model is one line naming it.

Results do not depend on the executor: a batch is the same pairs, traced by the same code with
the same kernels, wherever it runs. On CPU the kernels are the same only on the same number of
torch threads, and a Ray worker runs on one, so a sharded run equals a one-process run on one
thread (`torch.set_num_threads(1)`) bit for bit — see docs/sharding.md.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .backend import Backend, resolve_backend

log = logging.getLogger(__name__)

#: The line that says how to get the optional extra.
INSTALL_RAY = 'pip install -e ".[ray]"'

#: A dead worker is replaced at most this many times per worker of the pool, then the run stops:
#: a batch that kills every worker it meets (out of memory) must not loop forever.
REPLACEMENTS_PER_WORKER = 3

#: Seconds the driver waits for a result before looking at signals again (Ctrl-C stays prompt).
POLL_S = 0.5

WorkFn = Callable[[Any, Any, Any], Any]
OnResult = Callable[[int, Any], None]


# --------------------------------------------------------------------------- the model spec


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the driver's model: what it was loaded from, not its weights.

    Attributes:
        model_class: the wrapper class (`CODIModel`), imported by name on the worker.
        config_json: the model's config (`CODIConfig` or Coconut's) as canonical JSON with absolute
            paths — what names the model (two folders with the same relative layout differ).
        dtype: e.g. "float64".
        device: "cpu" or "cuda" (a Ray worker sees the one GPU Ray gives it).
        question_normalization: as the driver's.
        checkpoint_sha256: the driver's checkpoint hash: a worker that loads other bytes is refused.
    """

    model_class: type
    config_json: str
    dtype: str
    device: str
    question_normalization: str
    checkpoint_sha256: str

    @classmethod
    def of(cls, model: Any) -> ModelSpec:
        """The spec of a loaded model; one line if workers could not rebuild it."""
        config = getattr(model, "codi_config", None)
        if config is None:
            raise UserError(
                "--workers: this model was built from a ready module, so a worker cannot load it; "
                "load it with codi_nnsight.load_model(...)"
            )
        device = getattr(model, "device", None)
        return cls(
            model_class=type(model),
            config_json=config.to_json(resolved=True),
            dtype=str(model.dtype).replace("torch.", ""),
            device="cuda" if device is not None and device.type == "cuda" else "cpu",
            question_normalization=model.question_normalization,
            checkpoint_sha256=str(getattr(model, "checkpoint_sha256", "") or ""),
        )

    def load(self) -> Any:
        """Load the model as the driver did (weights read here, from the config's checkpoint)."""
        import json

        from ..model.config import config_from_dict

        config = config_from_dict(json.loads(self.config_json), source="the driver's model spec")
        model = self.model_class(
            config, dtype=self.dtype, device=self.device, question_normalization=self.question_normalization
        )
        got = str(getattr(model, "checkpoint_sha256", "") or "")
        if self.checkpoint_sha256 and got != self.checkpoint_sha256:
            raise UserError(
                f"its checkpoint has sha256 {got[:12]}…, the driver's {self.checkpoint_sha256[:12]}… "
                "(another file at the same path?)"
            )
        return model


# --------------------------------------------------------------------------- executors


class Executor:
    """Runs a command's batches; a context manager (a Ray executor owns a cluster and workers)."""

    name = "executor"
    workers = 1

    def map(self, model: Any, work: WorkFn, context: Any, jobs: Sequence[Any], on_result: OnResult) -> None:
        """Run `work(model, context, job)` for every job; `on_result(i, result)` in the driver as each ends."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor holds (idempotent)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalExecutor(Executor):
    """This process, one batch after the other, in job order."""

    name = "local"

    def map(self, model: Any, work: WorkFn, context: Any, jobs: Sequence[Any], on_result: OnResult) -> None:
        for i, job in enumerate(jobs):
            on_result(i, work(model, context, job))


def _import_ray(workers: int | None, address: str | None) -> Any:
    """`ray`, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        what = f"--workers {workers}" if workers is not None else f"--ray-address {address}"
        raise UserError(f"{what} needs Ray, an optional extra: {INSTALL_RAY}") from None
    return ray


class BatchWorker:
    """One Ray actor: holds one loaded model (one torch thread) and traces the batches it is given.

    The model is loaded by `load` (once per model spec: a pool serves several commands' models in
    turn, so a Ray session and its workers' imports are paid once per session, not per command).
    """

    def __init__(self, index: int) -> None:
        import torch

        # One thread per worker: workers share the cores, and one thread is the kernel choice a
        # one-process run must make to give the same bits (docs/sharding.md).
        torch.set_num_threads(1)
        self.index = index
        self.spec: ModelSpec | None = None
        self.model: Any = None

    def load(self, spec: ModelSpec) -> tuple[int, str, str | None]:
        """Load `spec`'s model (unless it is the one held): (PID, host, the load error or None)."""
        error = None
        if spec != self.spec:
            self.model, self.spec = None, None  # the old model's memory goes before the new one's
            try:
                self.model, self.spec = spec.load(), spec
            except UserError as e:
                error = _first_line(e)
            except Exception as e:  # any load failure is reported by the driver in one line
                error = f"{type(e).__name__}: {_first_line(e)}"
        return os.getpid(), socket.gethostname(), error

    def run(self, work: WorkFn, context: Any, job: Any) -> Any:
        """Trace one batch."""
        if self.model is None:  # pragma: no cover - the driver checks `load` first
            raise UserError(f"ray worker {self.index}: no model is loaded")
        return work(self.model, context, job)


class RayExecutor(Executor):
    """A pool of Ray actors on a local cluster started for the run, or on the cluster at `address`.

    Args:
        workers: actors in the pool (default with `address`: one per CPU, or per GPU for a CUDA
            model, that the cluster has free).
        address: an existing cluster ("ray://host:10001", "host:6379" or "auto"); without it a
            local cluster of `workers` CPUs is started, bound to 127.0.0.1, and stopped on `close`.
            A Ray session this process already opened (`ray.init`) is used as it is and left open.

    The pool is made on the first `map` and kept until `close`: the next `map` (a stacked sweep's
    next part, or another command given this executor) reuses its workers, which load another
    model only when the spec differs. Worker start-up (a Python process importing torch) is paid
    once per executor.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        self.ray = _import_ray(workers, address)
        self.requested = workers
        self.workers = workers or 1
        self.address = address
        self._owns_session = False
        self._started = False
        self._pool: list[Any] = []
        self._pool_spec: ModelSpec | None = None
        self._pids: dict[int, tuple[int, str]] = {}
        #: Replacement workers still loading the model: {worker: the ref of its `load`}.
        self._loading: dict[int, Any] = {}
        #: Batches run again after their worker died (for messages and tests).
        self.requeued = 0

    # -- the cluster ----------------------------------------------------------------------------
    def _start(self, spec: ModelSpec) -> None:
        ray = self.ray
        if self._started:
            return
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            t = time.perf_counter()
            if self.address:
                try:
                    ray.init(address=self.address, **kwargs)
                except Exception as e:
                    raise UserError(f"--ray-address {self.address}: cannot connect ({_first_line(e)})") from None
            else:
                gpus = _cuda_count() if spec.device == "cuda" else 0
                try:
                    ray.init(
                        num_cpus=self.workers,
                        num_gpus=gpus,
                        _node_ip_address="127.0.0.1",
                        runtime_env=worker_environment(),
                        **kwargs,
                    )
                except Exception as e:  # e.g. its processes did not come up in Ray's 30 s on a starved machine
                    raise UserError(
                        f"--workers {self.workers}: could not start a local Ray cluster ({_first_line(e)})"
                    ) from None
            self._owns_session = True
            log.info("ray: session started in %.1f s", time.perf_counter() - t)
        self._started = True
        per_worker = "GPU" if spec.device == "cuda" else "CPU"
        free = int(ray.available_resources().get(per_worker, 0))
        if self.requested is None:
            self.workers = max(1, free)
        if free < self.workers:  # an actor that cannot be placed would wait forever
            where = f"the cluster at {self.address}" if self.address else "this Ray session"
            raise UserError(f"--workers {self.workers}: {where} has {free} free {per_worker}(s); each worker needs one")

    def _spawn(self, spec: ModelSpec, index: int) -> Any:
        gpu = 1 if spec.device == "cuda" else 0
        return self.ray.remote(BatchWorker).options(num_cpus=1, num_gpus=gpu, max_restarts=0).remote(index)

    def _loaded(self, w: int, ref: Any) -> None:
        """Check the answer of worker `w`'s `load`; one line naming the worker if it failed."""
        try:
            pid, host, error = self.ray.get(ref)
        except Exception as e:  # the actor could not even start (the package missing there, ...)
            raise UserError(f"ray worker {w} could not start: {_first_line(e)}") from None
        self._pids[w] = (pid, host)
        if error is not None:
            raise UserError(f"ray worker {w} (PID {pid} on {host}) cannot load the model: {error}")

    def _ensure_pool(self, model: Any) -> ModelSpec:
        spec = ModelSpec.of(model)
        self._start(spec)
        for w, ref in list(self._loading.items()):  # replacements begun by an earlier map
            del self._loading[w]
            self._loaded(w, ref)
        if self._pool and self._pool_spec == spec:
            return spec
        if self._pool and self._pool_spec is not None and self._pool_spec.device != spec.device:
            self._kill_pool()
        if not self._pool:
            self._pool = [self._spawn(spec, i) for i in range(self.workers)]
        self._pool_spec = None  # until every worker holds the new model
        refs = [a.load.remote(spec) for a in self._pool]
        for w, ref in enumerate(refs):
            self._loaded(w, ref)
        self._pool_spec = spec
        return spec

    def _kill_pool(self) -> None:
        for actor in self._pool:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        self._pool, self._pool_spec, self._loading = [], None, {}

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the pool's workers (index = worker number; 0 while one is starting)."""
        return [self._pids.get(w, (0, ""))[0] for w in range(len(self._pool))]

    # -- the queue ------------------------------------------------------------------------------
    def map(self, model: Any, work: WorkFn, context: Any, jobs: Sequence[Any], on_result: OnResult) -> None:
        """Each worker takes the next batch of the queue as soon as it is free. A batch whose
        worker died goes back to the front of the queue, for the next free worker; a fresh worker
        replaces the dead one and joins once it has loaded the model."""
        ray = self.ray
        if not jobs:
            return
        spec = self._ensure_pool(model)
        ctx = ray.put(context)
        queue = collections.deque(range(len(jobs)))
        running: dict[Any, tuple[int, int]] = {}  # ref -> (worker, job)
        idle = list(range(len(self._pool)))
        deaths = 0
        try:
            while queue or running:
                while queue and idle:
                    w, j = idle.pop(0), queue.popleft()
                    running[self._pool[w].run.remote(work, ctx, jobs[j])] = (w, j)
                loading = {ref: w for w, ref in self._loading.items()}
                done, _ = ray.wait([*running, *loading], num_returns=1, timeout=POLL_S)
                for ref in done:
                    if ref in loading:  # a replacement worker is ready
                        w = loading[ref]
                        del self._loading[w]
                        self._loaded(w, ref)
                        idle.append(w)
                        continue
                    w, j = running.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # the batch itself failed: the driver's error
                        raise _cause(e) from None
                    except ray.exceptions.RayActorError as e:
                        deaths += 1
                        pid, host = self._pids.pop(w, (0, ""))
                        if deaths > REPLACEMENTS_PER_WORKER * len(self._pool):
                            raise UserError(
                                f"ray worker {w} (PID {pid} on {host}) died running batch {j}, after "
                                f"{deaths - 1} other deaths in this run; stopping ({_first_line(e)})"
                            ) from None
                        log.warning("ray worker %d (PID %d) died during batch %d; it runs again", w, pid, j)
                        self.requeued += 1
                        queue.appendleft(j)
                        self._pool[w] = self._spawn(spec, w)
                        self._loading[w] = self._pool[w].load.remote(spec)
                        continue
                    idle.append(w)
                    on_result(j, result)
        except BaseException:
            # Interrupted or failed: the batches still running are not waited for.
            self._kill_pool()
            raise

    def close(self) -> None:
        if self.ray.is_initialized():
            self._kill_pool()
            if self._owns_session:
                self.ray.shutdown()
        self._pool, self._pool_spec, self._loading = [], None, {}
        self._owns_session = False
        self._started = False


def worker_environment() -> dict[str, Any]:
    """Ray's `runtime_env` for a local cluster: workers import this very package (a checkout that
    is not installed too), by putting the folder holding it first on their PYTHONPATH."""
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cause(e: Any) -> BaseException:
    """The exception a batch raised on a worker, as the driver would have raised it."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return RuntimeError(_first_line(e))


#: The executors, by name (as `BACKENDS` is the table of trace targets).
EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor, "ray": RayExecutor}


def check_executor(
    workers: int | None = None, ray_address: str | None = None, remote: bool | str | Backend | None = False
) -> str:
    """The executor's name for `workers=` / `ray_address=`, checked before any work (one line each).

    `workers` None or 1 without an address is this process (`local`); more workers, or an address,
    is Ray, which must be installed and needs traces on this machine's weights.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UserError(f"--workers {workers!r}: expected an int >= 1")
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise UserError(f"--ray-address {ray_address!r}: expected a Ray address (host:port, ray://host:port or auto)")
    if ray_address is None and (workers is None or workers == 1):
        return "local"
    _import_ray(workers, ray_address)
    backend = resolve_backend(remote)
    if backend.kind != "local":
        what = f"--workers {workers}" if workers is not None else f"--ray-address {ray_address}"
        raise UserError(
            f"{what} runs the traces on Ray workers that load the model here; it cannot be combined with "
            f"--remote {backend.label or backend.remote}"
        )
    return "ray"


def executor_for(
    workers: int | Executor | None = None,
    ray_address: str | None = None,
    remote: bool | str | Backend | None = False,
) -> Executor:
    """The executor for `workers=` / `ray_address=` (an `Executor` is returned as it is)."""
    if isinstance(workers, Executor):
        return workers
    name = check_executor(workers, ray_address, remote)
    if name == "local":
        return LocalExecutor()
    return RayExecutor(workers, ray_address)


class _Borrowed(Executor):
    """An executor the caller owns: used, not closed."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.name = inner.name
        self.workers = inner.workers

    def map(self, model: Any, work: WorkFn, context: Any, jobs: Sequence[Any], on_result: OnResult) -> None:
        self.inner.map(model, work, context, jobs, on_result)


def use_executor(
    workers: int | Executor | None = None,
    ray_address: str | None = None,
    remote: bool | str | Backend | None = False,
) -> Executor:
    """`executor_for`, as a context manager that closes only an executor it made."""
    if isinstance(workers, Executor):
        return _Borrowed(workers)
    return executor_for(workers, ray_address, remote)
