"""The same traces through nnsight's remote path: local simulation, dead hosts, refused keys."""

from __future__ import annotations

import http.server
import socket
import threading

import numpy as np
import pytest
import xarray as xr

from codi_nnsight.data.synthetic import make_synthetic_pairs
from codi_nnsight.model.inference import generate
from codi_nnsight.model.remote import RemoteUnavailable
from codi_nnsight.model.wrapper import CODIModel
from codi_nnsight.patching import sweep as sweep_mod

SECRET = "sk-test-0123456789abcdef"


def test_remote_local_sweep_equals_local(tiny_models):
    model = tiny_models["llama"]
    pairs = make_synthetic_pairs(3, seed=4)
    local = sweep_mod.patch_sweep(model, pairs, positions="each", batch_size=2)
    remote = sweep_mod.patch_sweep(model, pairs, positions="each", batch_size=2, remote="local")
    for name in local.data_vars:
        assert np.allclose(local[name].values, remote[name].values, atol=1e-9, rtol=0, equal_nan=True), name
    assert remote.attrs["remote"] == "local"


def test_remote_local_generation_equals_local(tiny_models):
    model = tiny_models["gpt2"]
    qs = ["What is 2 plus 2?", "Tom has 3 cats."]
    assert generate(model, qs, 5, remote="local") == generate(model, qs, 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def secret_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", SECRET)
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    return SECRET


def test_dead_host_gives_clear_error_and_keeps_finished_pairs(tiny_models, tmp_path, secret_key, monkeypatch):
    model = tiny_models["gpt2"]
    pairs = make_synthetic_pairs(4, seed=4)
    out = tmp_path / "r.nc"
    real = sweep_mod.run_batch
    calls = {"n": 0}
    url = f"http://127.0.0.1:{_free_port()}"

    def first_local_then_remote(model_, plan, cfg, remote=False):
        calls["n"] += 1
        return real(model_, plan, cfg, remote=False if calls["n"] == 1 else remote)

    monkeypatch.setattr(sweep_mod, "run_batch", first_local_then_remote)
    # The sweep's one-off probe of the server (`CODIModel.provenance`) would meet the failure before the
    # first, local, batch: describe the local model instead, so the failure comes mid-sweep as intended.
    real_provenance = CODIModel.provenance
    monkeypatch.setattr(CODIModel, "provenance", lambda self, remote, identity=None: real_provenance(self, False))
    with pytest.raises(RemoteUnavailable) as e:
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, remote=url)
    assert str(e.value).startswith(f"remote {url}: host unreachable (")
    assert SECRET not in str(e.value)
    assert len(list((tmp_path / "r.nc.partial").glob("batch-*.nc"))) == 1  # the finished pairs are kept


class _Refuse(http.server.BaseHTTPRequestHandler):
    def _deny(self):
        body = b'{"detail": "Invalid API key"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _deny

    def log_message(self, *args):  # keep test output clean
        pass


def test_refused_key_gives_clear_error(tiny_models, tmp_path, secret_key):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(RemoteUnavailable) as e:
            sweep_mod.patch_sweep(
                tiny_models["gpt2"], make_synthetic_pairs(2, seed=4), out=tmp_path / "r.nc", remote=url
            )
    finally:
        server.shutdown()
    message = str(e.value)
    assert message.startswith(f"remote {url}: API key refused (")
    assert SECRET not in message
    # No pair finished, so nothing is left to resume (and nothing written holds the key).
    assert not (tmp_path / "r.nc.partial").exists()
    assert all(SECRET.encode() not in f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())


def test_key_never_lands_in_results(tiny_models, secret_key, tmp_path):
    ds = sweep_mod.patch_sweep(tiny_models["gpt2"], make_synthetic_pairs(1, seed=4), out=tmp_path / "r.nc")
    assert all(SECRET not in str(v) for v in ds.attrs.values())
    assert SECRET.encode() not in (tmp_path / "r.nc").read_bytes()
    assert isinstance(xr.open_dataset(tmp_path / "r.nc"), xr.Dataset)


def test_request_size_is_reported_in_debug_logging(tiny_models, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="codi_nnsight.model.remote"):
        sweep_mod.patch_sweep(tiny_models["gpt2"], make_synthetic_pairs(1, seed=4), remote="local")
    sizes = [r.getMessage() for r in caplog.records if "payload" in r.getMessage()]
    assert sizes and all("bytes" in m for m in sizes)
