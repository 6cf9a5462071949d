"""Opt-in: a patching sweep run on a real NDIF server (self-hosted on loopback) equals the local one.

Runs when either
  * CODI_NNSIGHT_NDIF_URL names a running server (e.g. from `scripts/ndif_local.sh start`) that has
    the CODI model at CODI_NNSIGHT_NDIF_MODEL (default /tmp/codi-ndif/tiny/codi.json) deployed, or
  * the `ndif` marker is selected (`pytest -m ndif`) or CODI_NNSIGHT_NDIF_START=1, and
    `scripts/ndif_local.sh check` passes (its venv exists: `scripts/ndif_local.sh install`); then
    this module starts the stack itself and stops it afterwards (unless it was already running).
Otherwise it is skipped, so the default test run never starts a server.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ndif

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ndif_local.sh"
DEFAULT_MODEL = "/tmp/codi-ndif/tiny/codi.json"


def _script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def _start_requested(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr", default="") or ""
    return os.environ.get("CODI_NNSIGHT_NDIF_START") == "1" or ("ndif" in markexpr and "not ndif" not in markexpr)


@pytest.fixture(scope="module")
def ndif_server(request):
    """`(url, codi.json path deployed there)`."""
    url = os.environ.get("CODI_NNSIGHT_NDIF_URL")
    if url:
        model = os.environ.get("CODI_NNSIGHT_NDIF_MODEL", DEFAULT_MODEL)
        if not Path(model).is_file():
            pytest.skip(f"CODI_NNSIGHT_NDIF_MODEL {model} does not exist on this machine")
        yield url, model
        return
    if not _start_requested(request.config):
        pytest.skip(
            "no NDIF server: set CODI_NNSIGHT_NDIF_URL, or run `pytest -m ndif` "
            "(or CODI_NNSIGHT_NDIF_START=1) to start one with scripts/ndif_local.sh"
        )
    check = _script("check")
    if check.returncode:
        pytest.skip(f"cannot start a local NDIF server: {check.stderr.strip()}")
    was_running = _script("status").returncode == 0
    started = _script("start", timeout=600)
    if started.returncode:
        pytest.fail(f"scripts/ndif_local.sh start failed:\n{started.stderr[-3000:]}")
    env = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    try:
        yield env["CODI_NNSIGHT_NDIF_URL"], env["CODI_NNSIGHT_NDIF_MODEL"]
    finally:
        if not was_running:
            _script("stop", timeout=120)


def test_remote_sweep_equals_local(ndif_server):
    from codi_nnsight import load_model, patch_sweep
    from codi_nnsight.data.synthetic import make_synthetic_pairs

    url, model_path = ndif_server
    model = load_model(model_path, dtype="float32", device="cpu")
    pairs = make_synthetic_pairs(2, seed=1)
    remote = patch_sweep(model, pairs, remote=url)
    local = patch_sweep(model, pairs)

    assert remote.attrs["remote"] == url
    assert set(remote.data_vars) == set(local.data_vars)
    assert dict(remote.sizes) == dict(local.sizes)
    for name in local.coords:
        assert np.array_equal(local[name].values, remote[name].values), name
    for name in local.data_vars:
        a, b = local[name].values, remote[name].values
        assert a.shape == b.shape, name
        if a.dtype.kind in "fc":
            assert np.allclose(a, b, atol=1e-5, rtol=0, equal_nan=True), name
        else:
            assert np.array_equal(a, b), name
