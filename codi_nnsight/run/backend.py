"""Where a trace runs: one `Backend` object, resolved once from nnsight's `remote=` value.

nnsight's own `remote=` is a loose value (False, True, "local", a URL). Resolving it once, up front,
gives every command the same answers to the questions a run must settle before any work: is the
target allowed, are local weights needed, what keyword arguments does `model.trace` take, how are
its failures reported, and how is it named in a results file. A new executor (a Ray pool, another
remote service) is one more row of `BACKENDS`, not a branch in every command.

Traces stay written as `with backend.errors(), model.trace(..., **backend.trace_kwargs()):` at
their call site: nnsight captures the source of the `with` block from the caller's frame, so the
trace itself cannot be wrapped in a helper context manager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..model import remote as remote_mod


@dataclass(frozen=True)
class Backend:
    """One execution target of traces.

    Attributes:
        kind: `local` (this process), `remote-simulation` (nnsight's `remote="local"`: serialised
            as for a server, run here) or `server` (an NDIF host).
        remote: the value handed to nnsight's `model.trace(remote=...)`.
    """

    kind: str
    remote: bool | str = False

    @property
    def is_server(self) -> bool:
        """Whether the weights live elsewhere (the client needs none)."""
        return self.kind == "server"

    @property
    def needs_local_weights(self) -> bool:
        """Whether traces run on this machine's weights."""
        return not self.is_server

    @property
    def label(self) -> str:
        """How results files name the target: "" (local), "local" (simulation), "ndif" or the host URL.

        Credentials in a URL are scrubbed: results files are shared.
        """
        if self.kind == "local":
            return ""
        if self.remote is True:
            return "ndif"
        return remote_mod.scrub(str(self.remote), self.remote)

    def describe(self) -> str:
        """Human name for messages ("this machine", "NDIF (host)", a scrubbed URL)."""
        return "this machine" if self.kind == "local" else remote_mod.describe(self.remote)

    def check(self) -> None:
        """Refuse a target that must not be contacted (plain http off loopback, ...) before any work."""
        if self.kind != "local":
            remote_mod.check_remote_target(self.remote)

    def trace_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.trace` / `model.session` on this backend."""
        return remote_mod.trace_kwargs(self.remote)

    def errors(self) -> contextlib.AbstractContextManager[None]:
        """Context manager that turns this backend's transport and server failures into one line."""
        return remote_mod.remote_errors(self.remote)

    def moves_inputs(self) -> bool:
        """Whether index tensors should be moved to the model's device before a trace (local only)."""
        return self.kind == "local"


def _is_local(remote: Any) -> bool:
    return remote is False or remote is None


def _is_simulation(remote: Any) -> bool:
    return remote == "local"


def _is_server(remote: Any) -> bool:
    return remote is True or (isinstance(remote, str) and remote not in ("", "local"))


#: The backends, in resolution order: (kind, predicate on the `remote=` value).
BACKENDS: list[tuple[str, Callable[[Any], bool]]] = [
    ("local", _is_local),
    ("remote-simulation", _is_simulation),
    ("server", _is_server),
]


def resolve_backend(remote: bool | str | Backend | None = False) -> Backend:
    """The `Backend` for nnsight's `remote=` value (a `Backend` is returned as it is).

    `False`/`None` → this process; `"local"` → nnsight's local simulation of a remote run; `True`
    or `"ndif"` → NDIF at nnsight's configured host; any other string → that host URL.

    Raises:
        UserError: an empty string or a value of another type (one line naming it).
    """
    if isinstance(remote, Backend):
        return remote
    if remote == "ndif":
        remote = True
    if isinstance(remote, str) and not remote.strip():
        raise UserError("--remote '': expected local, ndif or the URL of an NDIF host")
    if not (remote is None or isinstance(remote, (bool, str))):
        raise TypeError(f"remote={remote!r}: expected False, True, 'local', 'ndif' or a host URL")
    for kind, matches in BACKENDS:
        if matches(remote):
            return Backend(kind, False if kind == "local" else remote)
    raise UserError(f"--remote {remote!r}: expected local, ndif or the URL of an NDIF host")  # pragma: no cover
