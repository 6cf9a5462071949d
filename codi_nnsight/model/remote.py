"""Running the package's traces remotely (NDIF): target names, errors, and the API key.

`remote` values, as nnsight takes them: False (local), "local" (nnsight's local simulation of
the remote path: the request is serialized exactly as for NDIF and run with local modules
hidden), True (the configured NDIF host), or a host URL ("http://127.0.0.1:8001").
The API key comes from nnsight's config / `NDIF_API_KEY`; it is never printed, logged or stored,
and it is scrubbed from any error message that passes through here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)


class RemoteUnavailable(UserError):
    """The remote host could not be reached, refused the key, or failed the job."""


def describe(remote: bool | str) -> str:
    """Human name of a remote target (never includes credentials)."""
    if remote is True:
        from nnsight import CONFIG

        return f"NDIF ({CONFIG.API.HOST})"
    return str(remote)


def api_key() -> str:
    """The NDIF API key nnsight will send (empty when none)."""
    try:
        from nnsight import CONFIG

        return CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY", "") or ""
    except Exception:  # config unreadable: no key
        return os.environ.get("NDIF_API_KEY", "")


def scrub(text: str) -> str:
    """`text` with the API key (if any) replaced."""
    key = api_key()
    return text.replace(key, "***") if key and len(key) >= 4 else text


@contextlib.contextmanager
def remote_errors(remote: bool | str) -> Iterator[None]:
    """Turn transport and server failures of a remote trace into one clear line.

    Under debug logging, nnsight's verbose output (the request payload size of every trace)
    is captured and re-emitted through `logging`, with the key scrubbed.
    """
    if not remote:
        yield
        return
    buf = io.StringIO() if log.isEnabledFor(logging.DEBUG) else None
    try:
        with contextlib.redirect_stdout(buf) if buf is not None else contextlib.nullcontext():
            yield
    except UserError:
        raise
    except Exception as e:
        if remote == "local":
            raise
        raise _classify(remote, e) from None
    finally:
        if buf is not None:
            for line in buf.getvalue().splitlines():
                log.debug("remote %s: %s", describe(remote), scrub(line.strip()))


def _classify(remote: bool | str, e: Exception) -> RemoteUnavailable:
    text = scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    status = getattr(e, "status_code", None) or getattr(getattr(e, "response", None), "status_code", None)
    lowered = text.lower()
    if status in (401, 403) or "401" in text or "403" in text or "unauthorized" in lowered \
            or "api key" in lowered or "forbidden" in lowered:
        return RemoteUnavailable(f"remote {describe(remote)}: API key refused ({text}); set NDIF_API_KEY "
                                 "or nnsight's CONFIG.set_default_api_key")
    if isinstance(e, (ConnectionError, OSError, TimeoutError)) or "connect" in lowered \
            or "refused" in lowered or "resolve" in lowered:
        return RemoteUnavailable(f"remote {describe(remote)}: host unreachable ({text})")
    return RemoteUnavailable(f"remote {describe(remote)}: request failed ({type(e).__name__}: {text})")


def trace_kwargs(remote: bool | str) -> dict[str, Any]:
    """Keyword arguments for `model.trace` (verbose payload sizes under debug logging)."""
    if not remote:
        return {}
    return {"remote": remote, "verbose": log.isEnabledFor(logging.DEBUG)}
