"""The run layer: where traces run (`Backend`), where a command's batches run (`Executor`: this
process or Ray workers, `executors`), and one command's execution (`Run`).

Layers, in the direction imports go: `model` (the CODI module, its nnsight wrapper, remote
transport) → `run` (backend, provenance, writer) → `patching` / `readouts` (what to trace) →
`analysis` (statistics, figures, report) → `cli`.
"""

from .backend import BACKENDS, Backend, resolve_backend
from .executors import EXECUTORS, Executor, LocalExecutor, RayExecutor, executor_for
from .session import Run, client_versions, now, recorded_command
from .writer import clean_attrs, write_results

__all__ = [
    "BACKENDS",
    "EXECUTORS",
    "Backend",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "Run",
    "clean_attrs",
    "client_versions",
    "executor_for",
    "now",
    "recorded_command",
    "resolve_backend",
    "write_results",
]
