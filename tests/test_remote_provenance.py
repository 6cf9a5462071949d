"""Remote runs record the truth, and feel right: what the server ran, no client weights, quiet logs, fast errors.

The server is `tests/fake_ndif.py` on 127.0.0.1, running whatever model the test hands it: a
server deployed in another dtype, or with other weights, is just another model there.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_ndif import UNDEPLOYED_PUBLIC, FakeNDIF, status_json

from codi_nnsight.data.synthetic import make_synthetic_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.model import wrapper as wrapper_mod
from codi_nnsight.model.config import CODIConfig, check_hub_access
from codi_nnsight.model.inference import generate
from codi_nnsight.model.remote import RemoteUnavailable
from codi_nnsight.model.wrapper import ServerModelMismatch, fingerprints_agree, load_model
from codi_nnsight.patching import sweep as sweep_mod

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is 2 plus 2?", "Tom has 3 cats."]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_f32(tiny_dirs):
    """The same tiny GPT-2 as `tiny_models["gpt2"]`, deployed in float32 (as NDIF deploys in its own dtype)."""
    return load_model(tiny_dirs["gpt2"], dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """A tiny GPT-2 of the same shape with other weights (another checkpoint under the same structure)."""
    from codi_nnsight.testing.tiny import write_tiny_codi

    path = write_tiny_codi(tmp_path_factory.mktemp("tiny-other"), family="gpt2", n_layers=2, num_latent=3, seed=7)
    return load_model(path, dtype="float64", device="cpu")


# --------------------------------------------------------------------------- what the server ran


def test_server_identity_reports_the_servers_dtype_and_checkpoint(tiny_models, server_f32, caplog):
    client = tiny_models["gpt2"]  # float64
    with FakeNDIF(model=server_f32) as server:
        identity = client.server_identity(server.url)
        with caplog.at_level(logging.WARNING, logger="codi_nnsight.model.wrapper"):
            attrs = client.provenance(server.url, identity)
    assert identity["where"] == "server" and identity["dtype"] == "float32"
    assert identity["checkpoint_sha256"] == server_f32.checkpoint_sha256 != ""
    assert identity["n_params"] == sum(p.numel() for p in server_f32.codi.parameters())
    assert attrs["dtype"] == "float32" and attrs["dtype_source"] == "server" and attrs["client_dtype"] == "float64"
    assert attrs["computed_on"] == "server" and attrs["device"] == "cpu"
    assert attrs["checkpoint_sha256_source"] == "server"
    assert all(isinstance(v, (str, int)) for v in attrs.values())  # netCDF attrs
    assert any(
        "computes in float32" in r.getMessage() and "float64 asked for" in r.getMessage() for r in caplog.records
    )


def test_local_and_simulated_runs_describe_the_client(tiny_models):
    model = tiny_models["gpt2"]
    local = model.provenance(False)
    simulated = model.provenance("local")
    assert local["computed_on"] == "local" and simulated["computed_on"] == "remote-simulation"
    for attrs in (local, simulated):
        assert attrs["dtype"] == "float64" and attrs["dtype_source"] == "client"
        assert attrs["checkpoint_sha256"] == model.checkpoint_sha256 and attrs["checkpoint_sha256_source"] == "client"
    assert local["weights_fingerprint"] == simulated["weights_fingerprint"]


def test_a_server_with_other_weights_is_refused(tiny_models, other_weights):
    with FakeNDIF(model=other_weights) as server:
        with pytest.raises(ServerModelMismatch) as e:
            tiny_models["gpt2"].provenance(server.url)
    message = str(e.value)
    assert message.startswith(f"remote {server.url}: the server's weights are not this model's (")
    assert "\n" not in message


def test_a_server_that_reports_no_hash_is_verified_by_fingerprint_or_marked_unknown(tiny_dirs, tiny_models):
    server_model = load_model(tiny_dirs["gpt2"], dtype="float32", device="cpu")
    del server_model.codi.checkpoint_sha256  # a server running an older codi_nnsight
    meta = load_model(tiny_dirs["gpt2"], dtype="float64", remote_only=True)
    with FakeNDIF(model=server_model) as server:
        verified = tiny_models["gpt2"].provenance(server.url)
        unknown = meta.provenance(server.url)
    assert verified["checkpoint_sha256_source"] == "client-verified"
    assert verified["checkpoint_sha256"] == tiny_models["gpt2"].checkpoint_sha256
    assert unknown["checkpoint_sha256_source"] == "unknown" and unknown["checkpoint_sha256"] == ""
    assert unknown["dtype"] == "float32" and unknown["client_dtype"] == "float64"  # never the client's claim


def test_fingerprints_agree_across_dtypes_and_tell_checkpoints_apart(tiny_models, other_weights):
    model = tiny_models["gpt2"]
    mine = model.weights_fingerprint()
    params = dict(model.codi.named_parameters())
    for dtype in ("float32", "bfloat16", "float16"):
        cast = [wrapper_mod._l1_norm(params[n].to(getattr(torch, dtype))) for n in model.fingerprint_parameters()]
        assert fingerprints_agree(mine, "float64", cast, dtype), dtype
    assert not fingerprints_agree(mine, "float64", other_weights.weights_fingerprint(), "float64")
    assert not fingerprints_agree(mine, "float64", mine[:-1], "float64")


# --------------------------------------------------------------------------- no weights on the client


def test_remote_only_model_reads_no_weights_and_sweeps_through_a_server(tiny_dirs, tiny_models, monkeypatch):
    calls = []
    real = wrapper_mod.build_codi

    def spy(cfg, *args, **kwargs):
        calls.append(kwargs.get("meta", False))
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(wrapper_mod, "build_codi", spy)
    client = load_model(tiny_dirs["gpt2"], dtype="float64", remote_only=True)
    assert calls == [True] and not client.dispatched
    assert all(p.device.type == "meta" for p in client.codi.parameters())
    assert client.dtype == torch.float64  # the dtype asked for, not the meta build's default

    pairs = make_synthetic_pairs(2, seed=4)
    local = sweep_mod.patch_sweep(tiny_models["gpt2"], pairs, batch_size=2)
    with FakeNDIF(model=tiny_models["gpt2"]) as server:
        remote = sweep_mod.patch_sweep(client, pairs, batch_size=2, remote=server.url)
        assert generate(client, QUESTIONS, 4, remote=server.url) == generate(tiny_models["gpt2"], QUESTIONS, 4)
    assert not server.errors
    for name in local.data_vars:
        assert np.allclose(local[name].values, remote[name].values, atol=1e-9, rtol=0, equal_nan=True), name
    assert calls == [True] and not client.dispatched  # still no weights read here


def test_remote_only_model_refuses_to_run_here(tiny_dirs):
    client = load_model(tiny_dirs["gpt2"], remote_only=True)
    for remote in (False, "local"):
        with pytest.raises(UserError, match=r"loaded for remote runs only \(remote_only=True\)"):
            generate(client, QUESTIONS, 2, remote=remote)
    with pytest.raises(UserError, match="no local weights"):
        client.server_identity(False)
    assert not client.dispatched


# --------------------------------------------------------------------------- quiet logs


def test_job_status_is_quiet_when_stdout_is_not_a_terminal(tiny_models, capfd):
    with FakeNDIF(model=tiny_models["gpt2"]) as server:
        generate(tiny_models["gpt2"], QUESTIONS, 3, remote=server.url)
    out, err = capfd.readouterr()
    assert "job-1" not in out + err and "RUNNING" not in out + err, out


def test_job_status_still_shows_on_a_terminal(tiny_models, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    with FakeNDIF(model=tiny_models["gpt2"]) as server:
        generate(tiny_models["gpt2"], QUESTIONS, 3, remote=server.url)
    assert "COMPLETED" in screen.getvalue()


# --------------------------------------------------------------------------- an undeployed model


def test_an_undeployed_model_says_so(tiny_models):
    with FakeNDIF(model=tiny_models["gpt2"], deployed=["codi_nnsight.model.CODIModel:{}"]) as server:
        with pytest.raises(RemoteUnavailable) as e:
            generate(tiny_models["gpt2"], QUESTIONS, 3, remote=server.url)
    message = str(e.value)
    assert message.startswith(f"remote {server.url}: model not deployed on this server (")
    assert "docs/remote.md" in message and "\n" not in message


def test_public_ndifs_not_hosted_answer_is_not_called_a_refused_key(tiny_models):
    frames = [status_json("ERROR", description=UNDEPLOYED_PUBLIC)]
    with FakeNDIF("frames", frames=frames) as server:
        with pytest.raises(RemoteUnavailable) as e:
            generate(tiny_models["gpt2"], QUESTIONS, 3, remote=server.url)
    assert "model not deployed on this server" in str(e.value) and "API key refused" not in str(e.value)


# --------------------------------------------------------------------------- offline hub


HUB_ONLY = CODIConfig(base="nobody-codi-test/not-a-model", checkpoint="hf://nobody-codi-test/not-a-ckpt/model.bin")


def test_hub_switched_off_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        check_hub_access(HUB_ONLY)
    assert time.monotonic() - start < 2
    message = str(e.value)
    assert "switched off (HF_HUB_OFFLINE=1)" in message and "local codi.json" in message
    assert "nobody-codi-test/not-a-ckpt/model.bin" in message


def test_unreachable_hub_fails_within_seconds(monkeypatch):
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        check_hub_access(HUB_ONLY)
    assert time.monotonic() - start < 5
    assert f"cannot be reached at {endpoint} (" in str(e.value)


def test_local_models_never_ask_the_hub(tiny_dirs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub_access(CODIConfig.from_json(tiny_dirs["gpt2"]))  # local base folder and checkpoint: nothing to fetch


def _cli_offline(tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith(("HF_", "TRANSFORM"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf-home"), **env_extra)
    args = ["patch", "--model", "codi-gpt2", "--limit", "1", "--out", str(tmp_path / "r.nc")]
    return subprocess.run(
        [sys.executable, "-m", "codi_nnsight", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable-endpoint"])
def test_cli_offline_preset_is_one_fast_line(tmp_path, how):
    extra = (
        {"HF_HUB_OFFLINE": "1"} if how == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    )
    start = time.monotonic()
    r = _cli_offline(tmp_path, **extra)
    elapsed = time.monotonic() - start
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr  # no retry warnings, no traceback
    assert lines[0].startswith("error: preset codi-gpt2: needs gpt2/config.json, zen-E/CODI-gpt2/pytorch_model.bin")
    assert "local codi.json" in lines[0]
    assert elapsed < 30, f"{elapsed:.1f} s"  # interpreter and torch import included; the hub would take ~30 s more


# --------------------------------------------------------------------------- the results file


def test_a_remote_sweep_records_what_the_server_ran(tiny_dirs, server_f32, tmp_path):
    import xarray as xr

    client = load_model(tiny_dirs["gpt2"], dtype="float64", remote_only=True)
    with FakeNDIF(model=server_f32) as server:
        sweep_mod.patch_sweep(client, make_synthetic_pairs(1, seed=4), out=tmp_path / "r.nc", remote=server.url)
    with xr.open_dataset(tmp_path / "r.nc") as ds:
        attrs = dict(ds.attrs)
    assert attrs["dtype"] == "float32" and attrs["dtype_source"] == "server" and attrs["client_dtype"] == "float64"
    assert attrs["computed_on"] == "server" and attrs["device"] == "cpu"
    assert attrs["checkpoint_sha256"] == server_f32.checkpoint_sha256
    assert attrs["checkpoint_sha256_source"] == "server"
