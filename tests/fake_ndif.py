"""A stand-in NDIF API on 127.0.0.1 that speaks nnsight 0.8's wire protocol, for tests.

The client side is nnsight's own `RemoteBackend`, unchanged: it opens the `/subscribe` websocket,
reads `{"session_id": ...}`, POSTs the request (multipart: `data` = the JSON envelope, `blob` =
the serialized trace) to `/request`, then reads status updates off the websocket until COMPLETED.

What the server does after the POST is the test's choice (`behaviour`):

- `"execute"`: run the trace on the given model exactly as an ndif 0.1.2 model actor does
  (nnsight's `RequestModel.deserialize`, `tracer.execute` in a trace scope, collect the saved
  values, `torch.save`, zstd when the request asked for compression) and answer COMPLETED the
  way ndif does: a binary frame holding `ResponseModel.pickle()` with the result inline
  (`inline=True`) or a JSON frame whose `data` is a URL to download it from (`inline=False`).
- `"frames"`: send the given frames (`str` = text, `bytes` = binary), then stay silent.
- `"silent-ws"`: answer the POST, then never send anything on the websocket.
- `"silent-post"`: send the session id, but never answer the POST.
- `"silent-handshake"`: accept TCP connections and never answer (not even the HTTP upgrade).
- `"chatty"`: answer the POST, then send a RUNNING status every 0.1 s, forever.

With `deployed=` (model keys), a request for any other key is answered with the ERROR an NDIF
server sends for a key it has not deployed (`undeployed_message`, by default ndif 0.1.2's).

Like a real NDIF model actor (where it changes what a client sees):

- the deployed model's parameters are frozen (`requires_grad_(False)`, as ndif's actor and
  `scripts/ndif_cpu_actor.py` do after loading), so a request that needs gradients must make
  its own leaves. A `model=` handed in by the test is shared with its local runs: it is frozen
  only while a request executes, and its flags are put back after;
- torch runs with one thread while a request executes (`threads`);
- `checkpoint=` and `dtype=` deploy the server's own copy of a checkpoint in its own dtype
  (e.g. `dtype="bfloat16"`, NDIF's default), loaded as a deployment loads it: the client's
  model is not touched;
- a request that raises is answered with ERROR whose description is the whole multi-line
  Python traceback (`Traceback (most recent call last): ...`, ending in `Type: message`), as
  NDIF sends `str()` of nnsight's wrapped exception.

Every wait is bounded (`stop()` ends them; none lasts more than `max_wait` seconds), so a test
whose client hangs still finishes once the server is stopped.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import http.server
import io
import json
import queue
import select
import socket
import struct
import threading
import time
import traceback
from typing import Any

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: What a self-hosted ndif 0.1.2 answers for a model key it has not deployed: its controller tries
#: to place the unknown key, sizes it through `describe_checkpoint` with an argument nnsight 0.8.1
#: does not take, and the queue's processor sends the failed deployment status (lower-cased) followed
#: by its provisioning message (ndif's `Processor.provision`).
UNDEPLOYED_SELF_HOSTED = (
    "typeerror: remotable.describe_checkpoint() got an unexpected keyword argument 'trust_remote_code'"
    "\n\nThere was an error provisioning the model deployment. Please try again later. Sorry for the inconvenience."
)
#: What the public NDIF answers for a model it does not host (ndif's `Processor.enqueue`).
UNDEPLOYED_PUBLIC = (
    "Model is not dedicated and hotswapping is not supported for this API key. "
    "See https://nnsight.net/status/ for a list of scheduled models."
)


def _frame(payload: str | bytes) -> bytes:
    """One unmasked server-to-client websocket frame (FIN set)."""
    opcode, data = (1, payload.encode()) if isinstance(payload, str) else (2, bytes(payload))
    head = bytes([0x80 | opcode])
    n = len(data)
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + data


def status_json(status: str, data: Any = None, description: str = "") -> str:
    """A JSON status update as ndif publishes it (`ResponseModel.model_dump_json()`)."""
    from nnsight.schema.response import ResponseModel, Status

    return ResponseModel(id="job-1", status=Status(status), description=description, data=data).model_dump_json()


def completed_envelope(data: Any, meta: dict | None = None) -> bytes:
    """A COMPLETED response pickled as ndif sends it on the websocket (`ResponseModel.pickle()`)."""
    from nnsight.schema.response import ResponseModel, Status

    meta = (
        {"runtime": 0.01, "max_memory_usage": 0, "max_mem_by_gpu": {}, "max_mem_pct_by_gpu": {}}
        if meta is None
        else meta
    )
    return ResponseModel(
        id="job-1", status=Status.COMPLETED, description="Your job has been completed.", data=data, meta=meta
    ).pickle()


def run_like_ndif(model: Any, metadata: str, blob: bytes) -> bytes:
    """Execute a request as ndif 0.1.2's model actor does; return the result blob it would send."""
    import linecache

    import torch
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import _saves, dec, inc

    request = RequestModel.model_validate_json(metadata)
    saved_cache = dict(linecache.cache)  # deserialize registers the block's source under the client's filename
    try:
        tracer = RequestModel.deserialize(blob, model._remoteable_persistent_objects(), compress=request.compress)
        inc()
        try:
            tracer.execute(tracer.info.code)
            saves = _saves()
            saved = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
        finally:
            dec()
    finally:
        linecache.cache.clear()
        linecache.cache.update(saved_cache)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    data = buffer.getvalue()
    if request.compress:
        import zstandard as zstd

        data = zstd.ZstdCompressor(level=6).compress(data)
    return data


def deploy(checkpoint: str, dtype: str = "float32", frozen: bool = True) -> Any:
    """The server's own copy of a CODI checkpoint in `dtype` on the CPU, frozen as NDIF's actor freezes it."""
    from codi_nnsight.model.wrapper import load_model

    model = load_model(checkpoint, dtype=dtype, device="cpu")
    if frozen:
        model._module.requires_grad_(False)
    return model


def server_traceback(e: BaseException) -> str:
    """What NDIF sends as an ERROR's description: the whole formatted traceback, not one line."""
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()


class FakeNDIF:
    """The server; use as a context manager. `url` is `http://127.0.0.1:<port>`."""

    def __init__(
        self,
        behaviour: str = "execute",
        *,
        model: Any = None,
        frames: list[str | bytes] | None = None,
        inline: bool = True,
        max_wait: float = 60.0,
        deployed: list[str] | None = None,
        undeployed_message: str = UNDEPLOYED_SELF_HOSTED,
        checkpoint: str | None = None,
        dtype: str = "float32",
        frozen: bool = True,
        threads: int = 1,
    ) -> None:
        if checkpoint is not None:
            if model is not None:
                raise ValueError("give the server a model or a checkpoint to deploy, not both")
            model = deploy(checkpoint, dtype, frozen=frozen)
        self.behaviour = behaviour
        self.model = model
        self.frozen = frozen
        self.threads = threads
        self.run_lock = threading.Lock()  # one request executes at a time, as on a model actor
        self.deployed = None if deployed is None else set(deployed)
        self.undeployed_message = undeployed_message
        self.frames = list(frames or [])
        self.inline = inline
        self.max_wait = max_wait
        self.stopping = threading.Event()
        self.sessions: dict[str, queue.Queue] = {}
        self.results: dict[str, bytes] = {}
        self.requests: list[dict[str, Any]] = []
        self.connections: list[socket.socket] = []
        self.errors: list[str] = []
        if behaviour == "silent-handshake":
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(8)
            self.sock.settimeout(0.2)
            self.port = self.sock.getsockname()[1]
            self.thread = threading.Thread(target=self._accept_and_hold, daemon=True)
        else:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
            self.httpd.daemon_threads = True
            self.port = self.httpd.server_address[1]
            self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeNDIF:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close every connection (a client blocked on one then sees EOF)."""
        self.stopping.set()
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        if self.behaviour == "silent-handshake":
            self.thread.join(5)
            self.sock.close()
        else:
            self.httpd.shutdown()
            self.httpd.server_close()

    def execute(self, metadata: str, blob: bytes) -> bytes:
        """Run one request as the model actor does: parameters frozen, torch on `threads` threads."""
        import torch

        with self.run_lock:
            params = list(self.model._module.parameters())
            flags = [p.requires_grad for p in params]
            threads = torch.get_num_threads()
            try:
                if self.frozen:
                    for p in params:
                        p.requires_grad_(False)
                torch.set_num_threads(self.threads)
                return run_like_ndif(self.model, metadata, blob)
            finally:
                torch.set_num_threads(threads)
                for p, flag in zip(params, flags):
                    p.requires_grad_(flag)

    def _wait(self, seconds: float | None = None) -> None:
        self.stopping.wait(self.max_wait if seconds is None else seconds)

    def _accept_and_hold(self) -> None:
        deadline = time.monotonic() + self.max_wait
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)  # never read from, never answered

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                server.connections.append(self.connection)
                if self.path.startswith("/subscribe"):
                    self._subscribe()
                elif self.path.startswith("/result/"):
                    body = server.results.get(self.path.rsplit("/", 1)[-1], b"")
                    self.send_response(200 if body else 404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

            def _subscribe(self) -> None:
                key = self.headers.get("Sec-WebSocket-Key", "")
                accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
                self.send_response(101, "Switching Protocols")
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                session = f"session-{len(server.sessions) + 1}"
                inbox: queue.Queue = queue.Queue()
                server.sessions[session] = inbox
                self.close_connection = True
                try:
                    self.wfile.write(_frame(json.dumps({"session_id": session})))
                    deadline = time.monotonic() + server.max_wait
                    while not server.stopping.is_set() and time.monotonic() < deadline:
                        while not inbox.empty():
                            self.wfile.write(_frame(inbox.get()))
                        readable, _, _ = select.select([self.connection], [], [], 0.05)
                        if readable and self._client_closed():
                            return
                except (OSError, ValueError):
                    return

            def _client_closed(self) -> bool:
                """Read one (masked) client frame; answer a close frame as a server does."""
                head = self.rfile.read(2)
                if len(head) < 2:
                    return True
                n = head[1] & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self.rfile.read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self.rfile.read(8))[0]
                self.rfile.read((4 if head[1] & 0x80 else 0) + n)
                if head[0] & 0x0F == 8:
                    self.wfile.write(bytes([0x88, 0]))
                    return True
                return False

            def do_POST(self) -> None:
                server.connections.append(self.connection)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                parts = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers.get("Content-Type", "").encode() + b"\r\n\r\n" + body
                )
                fields = {
                    p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                    for p in parts.iter_parts()
                }
                metadata = fields["data"].decode()
                session = json.loads(metadata).get("session_id", "")
                server.requests.append({"metadata": metadata, "headers": dict(self.headers), "size": len(body)})
                if server.behaviour == "silent-post":
                    server._wait()
                    self.close_connection = True
                    return
                reply = status_json("RECEIVED", description="Your job has been received.").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                self.wfile.flush()
                inbox = server.sessions.get(session)
                if inbox is None:
                    server.errors.append(f"POST for unknown session {session!r}")
                    return
                threading.Thread(target=server._answer, args=(inbox, metadata, fields["blob"]), daemon=True).start()

        return Handler

    def _answer(self, inbox: queue.Queue, metadata: str, blob: bytes) -> None:
        if self.behaviour == "silent-ws":
            return
        if self.behaviour == "frames":
            for frame in self.frames:
                inbox.put(frame)
            return
        if self.behaviour == "chatty":
            deadline = time.monotonic() + self.max_wait
            while not self.stopping.is_set() and time.monotonic() < deadline:
                inbox.put(status_json("RUNNING", description="still going"))
                self._wait(0.1)
            return
        if self.deployed is not None and json.loads(metadata).get("model_key") not in self.deployed:
            inbox.put(status_json("QUEUED", description="Model Provisioning..."))
            inbox.put(status_json("ERROR", description=self.undeployed_message))
            return
        inbox.put(status_json("RUNNING", description="Your job has started running."))
        try:
            data = self.execute(metadata, blob)
        except Exception as e:  # the job failed: ndif answers ERROR with the whole traceback text
            inbox.put(status_json("ERROR", description=server_traceback(e)))
            return
        if self.inline:
            inbox.put(completed_envelope(data))
        else:
            self.results["job-1"] = data
            inbox.put(
                status_json("COMPLETED", data=f"{self.url}/result/job-1", description="Your job has been completed.")
            )
