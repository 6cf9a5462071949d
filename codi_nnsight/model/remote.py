"""Running the package's traces remotely (NDIF): target names, errors, the API key, and safety.

`remote` values, as nnsight takes them: False (local), "local" (nnsight's local simulation of
the remote path: the request is serialized exactly as for NDIF and run with local modules
hidden), True (the configured NDIF host), or a host URL ("http://127.0.0.1:8001").
The API key comes from nnsight's config / `NDIF_API_KEY`; it is never printed, logged or stored,
and it is scrubbed from any error message that passes through here (so are credentials written
into a URL, `http://user:pass@host`).

While one of our remote traces runs (inside `remote_errors`), three guards are active:

- responses are deserialised by a restricted unpickler that builds only tensors, plain Python
  values and nnsight's status enum, so a malicious or compromised server cannot run code here
  (nnsight itself loads them with `torch.load(weights_only=False)`);
- the websocket nnsight waits on gets a connect timeout and the whole request a deadline
  (`CODI_NNSIGHT_REMOTE_CONNECT_TIMEOUT`, default 10 s; `CODI_NNSIGHT_REMOTE_TIMEOUT`,
  default 600 s), so a silent server ends in a one-line error instead of a hang;
- plain `http://` to a host that is not loopback is refused unless
  `CODI_NNSIGHT_ALLOW_INSECURE_REMOTE=1` (the key and the results would cross the network in clear).
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import contextvars
import dataclasses
import io
import ipaddress
import logging
import math
import os
import pickle
import re
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)

ENV_TIMEOUT = "CODI_NNSIGHT_REMOTE_TIMEOUT"
ENV_CONNECT_TIMEOUT = "CODI_NNSIGHT_REMOTE_CONNECT_TIMEOUT"
ENV_ALLOW_INSECURE = "CODI_NNSIGHT_ALLOW_INSECURE_REMOTE"
DEFAULT_TIMEOUT = 600.0
DEFAULT_CONNECT_TIMEOUT = 10.0


class RemoteUnavailable(UserError):
    """The remote host could not be reached, refused the key, failed the job, or sent an unsafe response."""

    #: The server's whole traceback (scrubbed) when the job raised there; "" otherwise.
    server_traceback: str = ""


class UnsafeResponse(pickle.UnpicklingError):
    """A remote response asked to build something other than tensors and plain data."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class RemoteDeadline(TimeoutError):
    """The remote request did not finish within its deadline."""


class RemoteConnectTimeout(TimeoutError):
    """Connecting to the remote host (TCP and websocket handshake) took longer than the connect timeout."""


# --------------------------------------------------------------------------- names and secrets

# `scheme://userinfo@` — userinfo may itself contain '@' when typed unescaped, so match greedily
# up to the last '@' before the path.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s?#]*@")


def _url_of(remote: bool | str | None) -> str | None:
    """The URL nnsight will contact for `remote`, or None for local runs."""
    if remote is True:
        try:
            from nnsight import CONFIG

            return str(CONFIG.API.HOST)
        except Exception:  # config unreadable: nnsight will fail on its own, with its own message
            return None
    if not remote or remote == "local" or not isinstance(remote, str):
        return None
    return remote


def _secrets(remote: bool | str | None = None) -> list[str]:
    """Strings that must never be shown: the API key and the credentials in the remote URL."""
    out = []
    key = api_key()
    if key and len(key) >= 4:
        out.append(key)
    for url in {_url_of(remote), _url_of(True) if remote is not True else None} - {None}:
        parts = urllib.parse.urlsplit(str(url))
        for secret in (parts.password, parts.username):
            if secret and len(secret) >= 4:
                out.append(secret)
                out.append(urllib.parse.unquote(secret))
    return sorted(set(out), key=len, reverse=True)  # longest first: a key may contain a shorter one


def describe(remote: bool | str) -> str:
    """Human name of a remote target (never includes credentials)."""
    if remote is True:
        from nnsight import CONFIG

        return f"NDIF ({scrub(str(CONFIG.API.HOST))})"
    return scrub(str(remote), remote)


def api_key() -> str:
    """The NDIF API key nnsight will send (empty when none)."""
    try:
        from nnsight import CONFIG

        return CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY", "") or ""
    except Exception:  # config unreadable: no key
        return os.environ.get("NDIF_API_KEY", "")


def scrub(text: str, remote: bool | str | None = None) -> str:
    """`text` with the API key, URL credentials (`//user:pass@`) and `remote`'s credentials replaced."""
    text = _USERINFO.sub(r"\1***@", text)
    for secret in _secrets(remote):
        text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------- target check


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped is not None and mapped.is_loopback)


def check_remote_target(remote: bool | str) -> None:
    """Refuse a remote URL that is malformed, or plain http:// to a host other than loopback.

    Plain HTTP would carry the API key, the request and the results unencrypted; loopback never
    leaves the machine. `CODI_NNSIGHT_ALLOW_INSECURE_REMOTE=1` allows it anyway (e.g. a trusted
    private network). Local runs (`False`, `"local"`) pass.

    Raises:
        UserError: one line naming the (scrubbed) target and the way out.
    """
    url = _url_of(remote)
    if url is None:
        return
    name = describe(remote)
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError as e:
        raise UserError(f"remote {name}: not a valid URL ({scrub(str(e), remote)})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise UserError(
            f"remote {name}: not an http:// or https:// URL with a host (use local, ndif, or e.g. https://host:port)"
        )
    if parts.scheme == "http" and not _is_loopback(host) and os.environ.get(ENV_ALLOW_INSECURE) != "1":
        raise UserError(
            f"remote {name}: plain http:// to a host that is not loopback would send the API key and "
            f"results unencrypted; use https://, or set {ENV_ALLOW_INSECURE}=1 to allow it"
        )


# --------------------------------------------------------------------------- timeouts


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{env}={raw!r}: must be a positive number of seconds")
    return value


def remote_timeouts() -> tuple[float, float]:
    """`(connect, deadline)` in seconds for one remote request, from the environment.

    `CODI_NNSIGHT_REMOTE_CONNECT_TIMEOUT` (default 10) bounds connecting and the handshake;
    `CODI_NNSIGHT_REMOTE_TIMEOUT` (default 600) bounds the whole request, queueing included.
    """
    return _seconds(ENV_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT), _seconds(ENV_TIMEOUT, DEFAULT_TIMEOUT)


@dataclasses.dataclass(frozen=True)
class _Guard:
    """What is in force while one of our remote traces runs."""

    connect: float
    timeout: float


# Set only inside `remote_errors`: nnsight's other users in the same process keep its behaviour.
_GUARD: contextvars.ContextVar[_Guard | None] = contextvars.ContextVar("codi_nnsight_remote_guard", default=None)


# --------------------------------------------------------------------------- safe deserialisation


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a response may name: tensor rebuilding, plain containers, dtypes, the status enum.

    Found by loading real NDIF responses (tests/fake_ndif.py runs traces like an NDIF actor and
    answers exactly as ndif 0.1.2 does): a result is `torch.save({name: tensor})`, the envelope
    a `torch.save` of `ResponseModel.model_dump()` (str, `Status`, bytes, a dict of numbers).
    Storages are resolved by torch itself (names containing "Storage"), not through this table.
    """
    import builtins
    import collections

    import torch
    from nnsight.schema.response import Status

    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): torch._utils._rebuild_tensor_v3,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("nnsight.schema.response", "Status"): Status,
    }
    for name in ("set", "frozenset", "complex", "slice", "range", "bytearray"):
        table[("builtins", name)] = getattr(builtins, name)
    table[("_codecs", "encode")] = _latin1_bytes  # how pickle protocol 2 (torch.save's default) writes bytes
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            table[("torch", name)] = getattr(torch, name)
    return table


def _latin1_bytes(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes (latin-1 only: no codec lookup by name)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafeResponse(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] | None = None


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals (the pattern in Python's pickle docs).

    Everything that could run code in a pickle goes through `find_class` (GLOBAL, STACK_GLOBAL,
    the copyreg extension codes), so refusing there refuses REDUCE/NEWOBJ/BUILD of anything else.
    """

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        # Protocol 2 (torch.save's default) writes Python 2 names, e.g. __builtin__.set.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeResponse(f"{module}.{name}")
        return found


class _RestrictedPickleModule:
    """A `pickle_module` for `torch.load`: torch subclasses `Unpickler` and calls `load` (legacy format)."""

    __name__ = "codi_nnsight_restricted_pickle"
    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def safe_load(data: bytes) -> Any:
    """Deserialise `torch.save` bytes from a server, building only tensors and plain Python values.

    Why not `torch.load(weights_only=True)`: nnsight pickles responses with protocol 4, whose
    FRAME opcode torch's weights-only unpickler rejects. So torch's own loader runs (storages,
    map_location) with a restricted pickle module instead. TorchScript archives are refused
    before torch sees them: `torch.load` would hand them to `torch.jit.load`.

    Raises:
        UnsafeResponse: the data names a global outside the allow-list (nothing was run).
    """
    import torch

    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
        if any(n.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in f"/{n}" for n in names):
            raise UnsafeResponse("a TorchScript archive")
    restricted: Any = _RestrictedPickleModule  # torch types `pickle_module` as the pickle module itself
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=restricted)


_INSTALL_LOCK = threading.Lock()


def install_safe_loading() -> None:
    """Route nnsight's response deserialisation and websocket through our guards (idempotent).

    nnsight 0.8 loads a server's responses with `torch.load(weights_only=False)` in two places,
    `ResponseModel.unpickle` (a binary websocket frame) and `RemoteBackend.finalize` (the result
    blob): a hostile server could run code here. And it waits on a websocket with no timeout.
    The replacements apply only while `remote_errors` is active (`_GUARD`); elsewhere they call
    nnsight's originals, so other code in the process is unaffected.
    """
    from nnsight.intervention.backends import remote as nn_remote
    from nnsight.schema.response import ResponseModel

    with _INSTALL_LOCK:
        if not getattr(ResponseModel.unpickle, "_codi_safe", False):
            original_unpickle = ResponseModel.unpickle.__func__

            def unpickle(cls: type, data: bytes) -> Any:
                if _GUARD.get() is None:
                    return original_unpickle(cls, data)
                return cls(**safe_load(data))

            unpickle._codi_safe = True  # type: ignore[attr-defined]
            unpickle.__doc__ = original_unpickle.__doc__
            ResponseModel.unpickle = classmethod(unpickle)  # type: ignore[method-assign,assignment]

        backend = nn_remote.RemoteBackend
        if not getattr(backend.finalize, "_codi_safe", False):
            original_finalize = backend.finalize

            def finalize(self: Any, content: bytes) -> Any:
                if _GUARD.get() is None:
                    return original_finalize(self, content)
                # nnsight's finalize, with the load made safe.
                self._log(f"result: {len(content):,} bytes")
                if self.compress:
                    import zstandard as zstd

                    content = zstd.ZstdDecompressor().decompress(content)
                return safe_load(content)

            finalize._codi_safe = True  # type: ignore[attr-defined]
            finalize.__doc__ = original_finalize.__doc__
            backend.finalize = finalize  # type: ignore[method-assign]

        import websocket

        if not getattr(websocket.create_connection, "_codi_safe", False):
            websocket.create_connection = _bounded_create_connection(websocket.create_connection)


def _bounded_create_connection(original: Any) -> Any:
    """Wrap `websocket.create_connection` so nnsight's `/subscribe` socket has a connect timeout and a deadline.

    nnsight 0.8 calls it once per request with no timeout, then loops on `recv()` until COMPLETED;
    with status display on it sets a 0.1 s timeout and retries forever. The socket returned here
    fails every `recv` once the request's deadline has passed, which ends that loop.
    """
    import websocket

    class DeadlineWebSocket(websocket.WebSocket):
        deadline = math.inf
        wait: float | None = None  # the timeout nnsight asked for (its spinner refresh), if any

        def settimeout(self, timeout: float | None) -> None:
            self.wait = timeout
            super().settimeout(timeout)

        def recv(self) -> Any:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteDeadline("no response in time")
            websocket.WebSocket.settimeout(self, remaining if self.wait is None else min(self.wait, remaining))
            try:
                return super().recv()
            except websocket.WebSocketTimeoutException:
                if time.monotonic() >= self.deadline:
                    raise RemoteDeadline("no response in time") from None
                raise

        def close(self, *args: Any, **kwargs: Any) -> None:
            # websocket-client waits up to 3 s for the server's close reply; a silent server never sends it.
            if time.monotonic() >= self.deadline:
                kwargs["timeout"] = min(kwargs.get("timeout", 3), 0.5)
            super().close(*args, **kwargs)

    def create_connection(url: str, timeout: float | None = None, class_: Any = None, **options: Any) -> Any:
        guard = _GUARD.get()
        if guard is None or class_ not in (None, websocket.WebSocket):
            return original(url, timeout=timeout, class_=class_ or websocket.WebSocket, **options)
        try:
            ws = original(
                url, timeout=guard.connect if timeout is None else timeout, class_=DeadlineWebSocket, **options
            )
        except (TimeoutError, websocket.WebSocketTimeoutException) as e:
            raise RemoteConnectTimeout(f"timed out connecting after {guard.connect:g} s") from e
        ws.wait = None  # the connect timeout was for connecting only
        ws.deadline = time.monotonic() + guard.timeout
        return ws

    create_connection._codi_safe = True  # type: ignore[attr-defined]
    create_connection.__doc__ = original.__doc__
    return create_connection


@contextlib.contextmanager
def _guarded(connect: float, timeout: float) -> Iterator[None]:
    """Activate the guards; bound nnsight's HTTP calls (POST, result download) by the same limits."""
    from nnsight.intervention.backends import remote as nn_remote

    install_safe_loading()
    token = _GUARD.set(_Guard(connect=connect, timeout=timeout))
    # nnsight reads these module globals at each call: connect, and each read of the HTTP response.
    saved = nn_remote._CONNECT_TIMEOUT, nn_remote._READ_TIMEOUT
    nn_remote._CONNECT_TIMEOUT, nn_remote._READ_TIMEOUT = connect, min(timeout, saved[1])
    try:
        yield
    finally:
        nn_remote._CONNECT_TIMEOUT, nn_remote._READ_TIMEOUT = saved
        _GUARD.reset(token)


# --------------------------------------------------------------------------- errors


@contextlib.contextmanager
def remote_errors(remote: bool | str) -> Iterator[None]:
    """Guard one remote trace and turn transport and server failures into one clear line.

    Checks the target (`check_remote_target`), then runs the body with safe response loading,
    a connect timeout and a deadline (see the module docstring). Under debug logging, nnsight's
    verbose output (the request payload size of every trace) is captured and re-emitted through
    `logging`, with the key scrubbed.
    """
    if not remote:
        yield
        return
    check_remote_target(remote)
    connect, timeout = remote_timeouts() if remote != "local" else (DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT)
    buf = io.StringIO() if log.isEnabledFor(logging.DEBUG) else None
    try:
        with contextlib.redirect_stdout(buf) if buf is not None else contextlib.nullcontext():
            with _guarded(connect, timeout) if remote != "local" else contextlib.nullcontext():
                yield
    except UserError:
        raise
    except Exception as e:
        if remote == "local":
            raise
        raise _classify(remote, e, timeout) from None
    finally:
        if buf is not None:
            for line in buf.getvalue().splitlines():
                log.debug("remote %s: %s", describe(remote), scrub(line.strip(), remote))


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return out


def _classify(remote: bool | str, e: Exception, timeout: float = DEFAULT_TIMEOUT) -> RemoteUnavailable:
    name = describe(remote)
    chain = _chain(e)
    kinds = {type(c).__name__ for c in chain}
    unsafe = next((c for c in chain if isinstance(c, UnsafeResponse)), None)
    if unsafe is not None:
        return RemoteUnavailable(
            f"remote {name}: refused the server's response: it asks to build "
            f"{scrub(unsafe.what, remote)}, which could run code on this machine "
            "(only tensors and plain Python values are accepted)"
        )
    text = scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, remote)
    whole = scrub(" ".join(str(c) for c in chain), remote).lower()
    if any(marker in whole for marker in _UNDEPLOYED):
        return RemoteUnavailable(
            f"remote {name}: model not deployed on this server (its model key must be deployed there first; "
            f"see docs/remote.md, 'Deploying a CODI model'); the server said: {text}"
        )
    failed = server_exception(str(e))
    if failed is not None:
        # The job ran and raised on the server: its last line says what went wrong; the rest is for --debug.
        full = scrub(str(e).strip(), remote)
        log.debug("remote %s: the server's traceback:\n%s", name, full)
        error = RemoteUnavailable(
            f"remote {name}: request failed on the server ({scrub(failed, remote)}); "
            "--debug shows the server's traceback"
        )
        error.server_traceback = full
        return error
    status = getattr(e, "status_code", None) or getattr(getattr(e, "response", None), "status_code", None)
    lowered = text.lower()
    if (
        status in (401, 403)
        or _HTTP_DENIED.search(text)
        or "unauthorized" in lowered
        or "api key" in lowered
        or "forbidden" in lowered
    ):
        return RemoteUnavailable(
            f"remote {name}: API key refused ({text}); set NDIF_API_KEY or nnsight's CONFIG.set_default_api_key"
        )
    if any(isinstance(c, RemoteConnectTimeout) for c in chain) or "ConnectTimeout" in kinds:
        return RemoteUnavailable(
            f"remote {name}: host unreachable (timed out connecting; {ENV_CONNECT_TIMEOUT} sets the limit)"
        )
    if any(isinstance(c, TimeoutError) for c in chain) or kinds & _TIMEOUTS:
        return RemoteUnavailable(f"remote {name}: no response within {timeout:g} s; set {ENV_TIMEOUT} to wait longer")
    if (
        isinstance(e, (ConnectionError, OSError))
        or "connect" in lowered
        or "refused" in lowered
        or "resolve" in lowered
    ):
        return RemoteUnavailable(f"remote {name}: host unreachable ({text})")
    return RemoteUnavailable(f"remote {name}: request failed ({type(e).__name__}: {text})")


_TRACEBACK_HEAD = "Traceback (most recent call last):"


def server_exception(text: str) -> str | None:
    """The exception a server's traceback text ends in, as one line (`Type: message`); None if not a traceback.

    NDIF answers a request that raised with the whole formatted traceback as the job's
    description. Its frames are indented (`  File ...` and the source lines under them); the
    exception is what follows the last frame, unindented, and its message may span lines (they
    are joined with spaces). With chained exceptions the last one printed is the one raised.
    """
    lines = text.strip().splitlines()
    if not lines or lines[0].strip() != _TRACEBACK_HEAD:
        return None
    heads = [i for i, line in enumerate(lines) if line.strip() == _TRACEBACK_HEAD]
    frames = [i for i, line in enumerate(lines) if i > heads[-1] and line.startswith("  File ")]
    start = (frames[-1] + 1) if frames else heads[-1] + 1
    while start < len(lines) and lines[start][:1].isspace():  # the frame's source line and ^^^ markers
        start += 1
    tail = " ".join(line.strip() for line in lines[start:] if line.strip())
    return tail or None


# What NDIF answers for a model key it has not deployed (lower case; matched anywhere in the message).
# Public NDIF: the model is not scheduled ("not dedicated"). Self-hosted ndif 0.1.2: the controller
# tries to place the unknown key, sizing it through `describe_checkpoint`, and the provisioning fails.
_UNDEPLOYED = (
    "not dedicated and hotswapping is not supported",
    "error provisioning the model deployment",
    "describe_checkpoint",
)

# A 401/403 status in a message, but not inside an address or port ("127.0.0.1:40123").
_HTTP_DENIED = re.compile(r"(?<![\d.:])(401|403)(?!\d)")

# Timeouts of websocket-client and httpx, by name: neither library is imported unless a remote run happens.
_TIMEOUTS = {"WebSocketTimeoutException", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException"}


def status_display_wanted() -> bool:
    """Whether nnsight's live job-status line should show: stdout is a terminal, or this is a notebook.

    Elsewhere (a log file, a pipe, CI) every redraw of the spinner becomes a line of its own.
    """
    import sys

    try:
        if sys.stdout is not None and sys.stdout.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        pass
    ipython = sys.modules.get("IPython")
    try:
        return ipython is not None and ipython.get_ipython() is not None
    except Exception:  # an IPython too old or too odd to ask: no display
        return False


def trace_kwargs(remote: bool | str) -> dict[str, Any]:
    """Keyword arguments for `model.trace` (verbose payload sizes under debug logging)."""
    if not remote:
        return {}
    return {"remote": remote, "verbose": log.isEnabledFor(logging.DEBUG)}
