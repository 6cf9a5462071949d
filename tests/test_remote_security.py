"""A remote server cannot run code here, plain http leaves loopback only on request, nothing hangs.

The client is nnsight's real `RemoteBackend` (websocket `/subscribe`, POST `/request`, status
frames, inline or downloaded results) talking to `tests/fake_ndif.py` on 127.0.0.1.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fake_ndif import FakeNDIF, completed_envelope, status_json

from codi_nnsight.data.synthetic import make_synthetic_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.model import remote as remote_mod
from codi_nnsight.model.inference import generate
from codi_nnsight.model.remote import RemoteUnavailable, UnsafeResponse, check_remote_target, describe, scrub
from codi_nnsight.model.wrapper import CODIModel
from codi_nnsight.patching import sweep as sweep_mod

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is 2 plus 2?", "Tom has 3 cats."]


class MakesMarker:
    """Unpickling this runs `os.mkdir(path)`: the stand-in for any code a hostile server wants run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.path,))


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)  # nnsight compresses by default (CONFIG.API.COMPRESS)


def bounded(fn: Any, limit: float, server: FakeNDIF) -> tuple[BaseException | None, float]:
    """Run `fn` in a thread; fail if it is still running after `limit` s (then stop the server to free it)."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["e"] = e

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    elapsed = time.monotonic() - start
    if thread.is_alive():
        server.stop()  # closes the sockets, which unblocks the client
        thread.join(30)
        pytest.fail(f"the remote call was still waiting after {limit} s")
    return box.get("e"), elapsed


# --------------------------------------------------------------------------- real responses load


def test_sweep_through_a_fake_ndif_equals_local(tiny_models):
    model = tiny_models["llama"]
    pairs = make_synthetic_pairs(3, seed=4)
    local = sweep_mod.patch_sweep(model, pairs, positions="each", batch_size=2)
    with FakeNDIF(model=model) as server:
        remote = sweep_mod.patch_sweep(model, pairs, positions="each", batch_size=2, remote=server.url)
    assert len(server.requests) >= 2 and not server.errors
    for name in local.data_vars:
        assert np.allclose(local[name].values, remote[name].values, atol=1e-9, rtol=0, equal_nan=True), name


@pytest.mark.parametrize("inline", [True, False], ids=["result-on-the-socket", "result-downloaded"])
def test_generation_through_a_fake_ndif_equals_local(tiny_models, inline):
    model = tiny_models["gpt2"]
    with FakeNDIF(model=model, inline=inline) as server:
        assert generate(model, QUESTIONS, 5, remote=server.url) == generate(model, QUESTIONS, 5)


def test_safe_load_round_trips_what_results_hold():
    from nnsight.schema.response import Status

    value = {
        "f32": torch.randn(2, 3),
        "f64": torch.randn(3, dtype=torch.float64),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "i64": torch.arange(6).reshape(2, 3)[:, 1:],
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(1.5),
        "nested": [(1, 2.5, "s", None, b"\x00"), {"k": {3}}, frozenset({1})],
        "status": Status.COMPLETED,
    }
    loaded = remote_mod.safe_load(torch_bytes(value))
    assert loaded.keys() == value.keys() and loaded["status"] is Status.COMPLETED
    assert loaded["nested"] == value["nested"]
    for k in ("f32", "f64", "bf16", "i64", "bool", "scalar"):
        assert loaded[k].dtype == value[k].dtype and torch.equal(loaded[k], value[k])


# --------------------------------------------------------------------------- hostile responses


def _hostile(where: str, marker: Path) -> list[str | bytes]:
    if where == "envelope":  # the binary COMPLETED frame itself (ResponseModel.unpickle)
        return [completed_envelope(MakesMarker(marker))]
    if where == "raw-pickle-envelope":  # not even a torch archive: torch's legacy path unpickles it
        return [pickle.dumps(MakesMarker(marker))]
    if where == "result-inline":  # a well-formed envelope whose result blob is hostile (RemoteBackend.finalize)
        return [completed_envelope(zstd(torch_bytes({"generated": MakesMarker(marker)})))]
    if where == "torchscript-result":  # torch.load would hand a TorchScript archive to torch.jit.load
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(torch.nn.Identity()), buffer)
        return [completed_envelope(zstd(buffer.getvalue()))]
    raise AssertionError(where)


@pytest.mark.parametrize("where", ["envelope", "raw-pickle-envelope", "result-inline", "torchscript-result"])
def test_a_hostile_response_runs_no_code(tiny_models, tmp_path, where):
    marker = tmp_path / "marker"
    with FakeNDIF("frames", frames=_hostile(where, marker)) as server:
        error, _ = bounded(lambda: generate(tiny_models["gpt2"], QUESTIONS, 5, remote=server.url), 60, server)
    assert not marker.exists(), "the server's payload ran on the client"
    assert isinstance(error, RemoteUnavailable), repr(error)
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"remote {server.url}: refused the server's response: it asks to build ")
    assert "(only tensors and plain Python values are accepted)" in message


def test_a_hostile_downloaded_result_runs_no_code(tiny_models, tmp_path):
    marker = tmp_path / "marker"
    server = FakeNDIF("frames")
    server.results["job-1"] = zstd(torch_bytes({"generated": MakesMarker(marker)}))
    server.frames = [status_json("COMPLETED", data=f"{server.url}/result/job-1")]
    with server:
        error, _ = bounded(lambda: generate(tiny_models["gpt2"], QUESTIONS, 5, remote=server.url), 60, server)
    assert not marker.exists()
    assert isinstance(error, RemoteUnavailable) and "asks to build posix.mkdir" in str(error)


def test_response_deserialisers_are_guarded_only_inside_our_remote_runs(tmp_path):
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.schema.response import ResponseModel

    remote_mod.install_safe_loading()
    remote_mod.install_safe_loading()  # idempotent
    assert ResponseModel.unpickle._codi_safe and RemoteBackend.finalize._codi_safe
    marker = tmp_path / "marker"
    with remote_mod._guarded(1.0, 5.0):
        with pytest.raises(UnsafeResponse):
            ResponseModel.unpickle(completed_envelope(MakesMarker(marker)))
        backend = RemoteBackend("k", host="http://127.0.0.1:9")
        backend.compress = False
        with pytest.raises(UnsafeResponse):
            backend.finalize(torch_bytes([MakesMarker(marker)]))
        assert remote_mod.safe_load(torch_bytes({"x": torch.ones(2)}))["x"].sum() == 2
    assert not marker.exists()
    ok = ResponseModel.unpickle(completed_envelope(torch_bytes({"x": 1})))  # outside: nnsight's own path
    assert ok.status.value == "COMPLETED"


# --------------------------------------------------------------------------- nothing hangs


@pytest.fixture
def short_deadline(monkeypatch):
    monkeypatch.setenv("CODI_NNSIGHT_REMOTE_TIMEOUT", "2")
    monkeypatch.setenv("CODI_NNSIGHT_REMOTE_CONNECT_TIMEOUT", "1")


@pytest.mark.parametrize(
    "behaviour,expected",
    [
        (
            "silent-handshake",
            "host unreachable (timed out connecting; CODI_NNSIGHT_REMOTE_CONNECT_TIMEOUT sets the limit)",
        ),
        ("silent-post", "no response within 2 s; set CODI_NNSIGHT_REMOTE_TIMEOUT to wait longer"),
        ("silent-ws", "no response within 2 s; set CODI_NNSIGHT_REMOTE_TIMEOUT to wait longer"),
        ("chatty", "no response within 2 s; set CODI_NNSIGHT_REMOTE_TIMEOUT to wait longer"),
    ],
)
def test_a_silent_server_ends_in_one_line_within_the_deadline(tiny_models, short_deadline, behaviour, expected):
    with FakeNDIF(behaviour) as server:
        error, elapsed = bounded(lambda: generate(tiny_models["gpt2"], QUESTIONS, 5, remote=server.url), 30, server)
    assert isinstance(error, RemoteUnavailable), repr(error)
    assert str(error) == f"remote {server.url}: {expected}"
    assert elapsed < 10, f"took {elapsed:.1f} s for a 2 s deadline"


def test_a_silent_server_mid_sweep_keeps_the_finished_pairs(tiny_models, tmp_path, short_deadline, monkeypatch):
    real = sweep_mod.run_batch
    calls = {"n": 0}

    def first_local_then_remote(model_, plan, cfg, remote=False):
        calls["n"] += 1
        return real(model_, plan, cfg, remote=False if calls["n"] == 1 else remote)

    monkeypatch.setattr(sweep_mod, "run_batch", first_local_then_remote)
    # The sweep's one-off probe of the server (`CODIModel.provenance`) would meet the failure before the
    # first, local, batch: describe the local model instead, so the failure comes mid-sweep as intended.
    real_provenance = CODIModel.provenance
    monkeypatch.setattr(CODIModel, "provenance", lambda self, remote, identity=None: real_provenance(self, False))
    with FakeNDIF("silent-ws") as server:
        error, _ = bounded(
            lambda: sweep_mod.patch_sweep(
                tiny_models["gpt2"],
                make_synthetic_pairs(4, seed=4),
                out=tmp_path / "r.nc",
                batch_size=2,
                remote=server.url,
            ),
            60,
            server,
        )
    assert isinstance(error, UserError) and "no response within 2 s" in str(error), repr(error)
    assert len(list((tmp_path / "r.nc.partial").glob("batch-*.nc"))) == 1


def test_bad_timeout_settings_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("CODI_NNSIGHT_REMOTE_TIMEOUT", "soon")
    with pytest.raises(UserError, match=r"^CODI_NNSIGHT_REMOTE_TIMEOUT='soon': must be a positive number of seconds$"):
        remote_mod.remote_timeouts()
    monkeypatch.setenv("CODI_NNSIGHT_REMOTE_TIMEOUT", "0")
    with pytest.raises(UserError, match="must be a positive number"):
        remote_mod.remote_timeouts()
    monkeypatch.delenv("CODI_NNSIGHT_REMOTE_TIMEOUT")
    assert remote_mod.remote_timeouts() == (10.0, 600.0)


# --------------------------------------------------------------------------- where requests may go


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8001",
        "http://127.9.8.7",
        "http://localhost:28001",
        "http://[::1]:8001",
        "https://ndif.example.org",
        "https://10.0.0.5:443",
        "local",
    ],
)
def test_allowed_targets(url, monkeypatch):
    monkeypatch.delenv("CODI_NNSIGHT_ALLOW_INSECURE_REMOTE", raising=False)
    check_remote_target(url)
    check_remote_target(False)


@pytest.mark.parametrize(
    "url",
    ["http://ndif.example.org:8001", "http://10.0.0.5", "http://[2001:db8::1]:80", "http://127.0.0.1.example.org"],
)
def test_plain_http_off_loopback_needs_an_explicit_opt_in(url, monkeypatch):
    monkeypatch.delenv("CODI_NNSIGHT_ALLOW_INSECURE_REMOTE", raising=False)
    with pytest.raises(UserError) as e:
        check_remote_target(url)
    assert str(e.value) == (
        f"remote {url}: plain http:// to a host that is not loopback would send the API key and "
        "results unencrypted; use https://, or set CODI_NNSIGHT_ALLOW_INSECURE_REMOTE=1 to allow it"
    )
    monkeypatch.setenv("CODI_NNSIGHT_ALLOW_INSECURE_REMOTE", "1")
    check_remote_target(url)


def test_the_configured_ndif_host_is_checked_too(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("CODI_NNSIGHT_ALLOW_INSECURE_REMOTE", raising=False)
    monkeypatch.setattr(CONFIG.API, "HOST", "http://bob:hunter22@ndif.example.org")
    with pytest.raises(UserError) as e:
        check_remote_target(True)
    assert str(e.value).startswith("remote NDIF (http://***@ndif.example.org): plain http:// ")
    assert "hunter22" not in str(e.value) and "bob" not in str(e.value)


@pytest.mark.parametrize("url", ["ftp://host/x", "127.0.0.1:8001", "http://"])
def test_malformed_targets_are_refused(url):
    with pytest.raises(UserError, match="not an http:// or https:// URL with a host"):
        check_remote_target(url)


def test_credentials_in_a_url_are_never_echoed(tiny_models, tmp_path, monkeypatch, caplog):
    import logging

    assert describe("https://alice:s3cret-pw@ndif.example.org/x") == "https://***@ndif.example.org/x"
    assert scrub("failed GET http://u:p@w0rd@h:1/a and ws://x:y@h") == "failed GET http://***@h:1/a and ws://***@h"
    with FakeNDIF("silent-handshake") as dead:
        url = f"http://alice:s3cret-pw@127.0.0.1:{dead.port}"
    monkeypatch.setenv("CODI_NNSIGHT_REMOTE_CONNECT_TIMEOUT", "1")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(RemoteUnavailable) as e:
            sweep_mod.patch_sweep(
                tiny_models["gpt2"], make_synthetic_pairs(2, seed=4), out=tmp_path / "r.nc", remote=url
            )
    assert str(e.value).startswith(f"remote http://***@127.0.0.1:{dead.port}: host unreachable (")
    assert "s3cret" not in str(e.value) and "alice" not in str(e.value)
    assert not any("s3cret" in r.getMessage() for r in caplog.records)
    # No pair finished, so nothing is left to resume (and nothing written holds the password).
    assert not (tmp_path / "r.nc.partial").exists()
    assert all(b"s3cret" not in f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())


def test_cli_refuses_plain_http_and_never_prints_the_password(tiny_dirs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("CODI_NNSIGHT_ALLOW_INSECURE_REMOTE", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "codi_nnsight",
            "patch",
            "--model",
            tiny_dirs["gpt2"],
            "--limit",
            "1",
            "--out",
            str(tmp_path / "r.nc"),
            "--remote",
            "http://alice:s3cret-pw@ndif.example.org:8001",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "s3cret" not in r.stderr + r.stdout and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: remote http://***@ndif.example.org:8001: plain http:// to a host that is not loopback"
    ), last
