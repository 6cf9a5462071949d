"""Opt-in: every command run `--remote` on a real NDIF server (self-hosted on loopback) equals a local run.

The comparison is bit for bit: the server's model actor and the local run both compute on one CPU
thread (`scripts/ndif_cpu_actor.py` sets it there, `torch.set_num_threads(1)` here), in the dtype of
the deployment, with the same torch release (`scripts/ndif_local.sh install` pins the server's to
the client's), so the same kernels run on the same data.

Runs when either
  * CODI_NNSIGHT_NDIF_URL names a running server (e.g. from `scripts/ndif_local.sh start`) that has
    the CODI model at CODI_NNSIGHT_NDIF_MODEL (default /tmp/codi-ndif/tiny/codi.json) deployed, or
  * the `ndif` marker is selected (`pytest -m ndif`) or CODI_NNSIGHT_NDIF_START=1, and
    `scripts/ndif_local.sh check` passes (its venv exists: `scripts/ndif_local.sh install`); then
    this module starts the stack itself and stops it afterwards (unless it was already running).
Otherwise it is skipped, so the default test run never starts a server. The tests that deploy
more models (every command on the bundled toy model and a tiny GPT-2; swapped weights) also need
the server to be the stack `scripts/ndif_local.sh` runs with this environment (`status` shows it).
`.ci/run` runs them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

pytestmark = pytest.mark.ndif

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ndif_local.sh"
TOY = REPO / "codi_nnsight" / "assets" / "toy-codi" / "codi.json"
DEFAULT_MODEL = "/tmp/codi-ndif/tiny/codi.json"
N_PAIRS = 4  # pairs per command: enough for every output dim, few enough for minutes per model


def _script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def _start_requested(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr", default="") or ""
    return os.environ.get("CODI_NNSIGHT_NDIF_START") == "1" or ("ndif" in markexpr and "not ndif" not in markexpr)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Local runs on one thread, as the server's actor: the same reduction order, hence the same bits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="module")
def managed(ndif_server) -> str:
    """The server's URL, when it is the stack `scripts/ndif_local.sh` runs here (so it can deploy)."""
    url = ndif_server[0]
    if _script("status").returncode or _script("url").stdout.strip() != url:
        pytest.skip(f"{url} is not the stack scripts/ndif_local.sh runs with this environment; cannot deploy to it")
    return url


def _deploy(*specs: Path | str, dtype: str = "float32") -> None:
    r = _script("deploy", "--dtype", dtype, *map(str, specs), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _make_tiny(out: Path, seed: int) -> Path:
    from click.testing import CliRunner

    from codi_nnsight.cli import main

    r = CliRunner().invoke(main, ["make-tiny", "--out", str(out), "--family", "gpt2", "--seed", str(seed)])
    assert r.exit_code == 0, r.output
    return out / "codi.json"


@pytest.fixture(scope="module")
def models(managed, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """`{name: (codi.json, dtype deployed in)}`: the bundled toy model in float32, a tiny GPT-2 in bfloat16."""
    gpt2 = _make_tiny(tmp_path_factory.mktemp("ndif-gpt2"), seed=0)
    _deploy(TOY, dtype="float32")
    _deploy(gpt2, dtype="bfloat16")
    return {"toy": (TOY, "float32"), "gpt2": (gpt2, "bfloat16")}


def _cli(*args: str):
    """Run the CLI in this process (one thread: see `_one_thread`); the result, checked to be a success."""
    from click.testing import CliRunner

    from codi_nnsight.cli import main

    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, f"codi-nnsight {' '.join(args)} exited {r.exit_code}:\n{r.output}\n{r.exception!r}"
    return r


def _assert_bit_identical(local: Path, remote: Path) -> None:
    """Every coordinate and data variable of two netCDF files holds the same bytes (attrs may differ)."""
    with xr.open_dataset(local) as a, xr.open_dataset(remote) as b:
        assert dict(a.sizes) == dict(b.sizes)
        assert set(a.coords) == set(b.coords) and set(a.data_vars) == set(b.data_vars)
        for name in [*a.coords, *a.data_vars]:
            x, y = a[name].values, b[name].values
            assert (x.dtype, x.shape) == (y.dtype, y.shape), name
            if x.dtype.kind in "fc":
                # Bytes, not ==: -0.0 vs 0.0 and NaN payloads count too.
                diff = np.nanmax(np.abs(x - y)) if x.size and not np.isnan(x - y).all() else 0.0
                assert x.tobytes() == y.tobytes(), f"{name}: not bit-identical (max |diff| {diff})"
            else:
                assert np.array_equal(x, y), name


COMMANDS = {
    "patch": ["patch"],
    "patch-ablation-mean": ["patch", "--ablation", "mean"],
    # every token on its own: token patches in the question's and the suffix's calls
    # (an explicit batch size: `auto` budgets rows differently for a server, and float32 sums
    # depend on the batch's composition)
    "patch-sequence": ["patch", "--positions", "sequence", "--layers", "0,1", "--batch-size", "2"],
    # a metric function reading the thoughts, shipped to the server by its source
    "patch-metric-fn": [
        "patch",
        "--positions",
        "each",
        "--metric-fn",
        "p1=codi_nnsight.patching.metrics:gold_value_prob(1)",
    ],
    "early-exit": ["early-exit"],
    "attribute": ["attribute"],
    "attribute-atp-star": ["attribute", "--method", "atp*"],
    "lens": ["lens"],
    "attention": ["attention"],
    "probe": ["probe", "--seeds", "0"],
    "evaluate": ["evaluate", "--max-new-tokens", "8"],
}
CASES = [
    pytest.param(command, model, id=f"{name}-{model}")
    for model in ("toy", "gpt2")
    for name, command in COMMANDS.items()
]


@pytest.mark.parametrize(("command", "model_name"), CASES)
def test_remote_command_equals_local_one_thread_run(models, managed, command, model_name, tmp_path):
    spec, dtype = models[model_name]
    suffix = ".json" if command[0] == "evaluate" else ".nc"
    limit = "8" if command[0] == "probe" else str(N_PAIRS)  # a probe needs a train/test split
    args = [*command, "--model", str(spec), "--dtype", dtype, "--limit", limit, "--out"]
    local, remote = tmp_path / f"local{suffix}", tmp_path / f"remote{suffix}"
    _cli(*args, str(local), "--device", "cpu")
    _cli(*args, str(remote), "--remote", managed)
    if suffix == ".json":
        assert json.loads(remote.read_text()) == json.loads(local.read_text())
    else:
        _assert_bit_identical(local, remote)


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
    for name in [*local.coords, *local.data_vars]:
        a, b = local[name].values, remote[name].values
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        # Same kernels on the same data, one thread on both ends: the same bits.
        assert a.tobytes() == b.tobytes() if a.dtype.kind in "fc" else np.array_equal(a, b), name


def _stack_pids() -> set[int]:
    """Every process of the stack: the process groups the script recorded, and all their descendants."""
    run = Path(os.environ.get("NDIF_LOCAL_HOME", "/tmp/codi-ndif")) / "run"
    groups = {int(f.read_text()) for f in run.glob("*.pgid")}
    parent, group = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parent[pid], group[pid] = int(fields[1]), int(fields[2])
    pids = {pid for pid, g in group.items() if g in groups}
    grew = True
    while grew:  # Ray's workers start process groups of their own under the raylet
        more = {pid for pid, ppid in parent.items() if ppid in pids} - pids
        pids |= more
        grew = bool(more)
    return pids


def test_every_socket_of_the_stack_is_on_loopback(managed):
    """Nothing of the stack listens beyond 127.0.0.1 (Ray did, on all addresses, before it was told not to)."""
    pids = _stack_pids()
    listening = subprocess.run(["ss", "-Hltnup"], capture_output=True, text=True, check=True).stdout.splitlines()
    ours = [line.split() for line in listening if any(f"pid={pid}," in line for pid in pids)]
    assert any("gcs_server" in " ".join(f) for f in ours), "found no socket of Ray's GCS to check"
    for fields in ours:
        address = fields[4].rsplit(":", 1)[0]
        assert address in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"), " ".join(fields)


# --- another checkpoint's weights behind the same model key ------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint(spec: Path) -> Path:
    return spec.parent / json.loads(spec.read_text())["checkpoint"]


@pytest.fixture(scope="module")
def weights_ab(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny GPT-2 CODI models of one architecture and tokenizer, different weights: (A, B) codi.json."""
    a = _make_tiny(tmp_path_factory.mktemp("weights-a"), seed=0)
    b = _make_tiny(tmp_path_factory.mktemp("weights-b"), seed=1)
    for name in ("codi.json", "base/config.json", "base/tokenizer.json"):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name
    assert _sha256(_checkpoint(a)) != _sha256(_checkpoint(b))
    return a, b


def _deployed_copy(src: Path, where: Path) -> Path:
    """A copy of the model folder at its own path (so its own model key), deployed; its codi.json."""
    shutil.copytree(src.parent, where)
    spec = where / "codi.json"
    _deploy(spec)
    return spec


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (own process: exit code and stderr as printed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, "-m", "codi_nnsight", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _assert_refused_naming(r: subprocess.CompletedProcess, *hashes: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}; stderr:\n{r.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for h in hashes:
        assert h[:12] in lines[0], f"{h[:12]} not named in: {lines[0]}"


def test_server_with_other_weights_is_refused(managed, weights_ab, tmp_path):
    """Server runs A, the client's codi.json names B (same key, other file contents): refused, naming both."""
    a, b = weights_ab
    spec = _deployed_copy(a, tmp_path / "model")
    # The server loaded A when deployed; from now on the file the client's codi.json names holds B.
    shutil.copyfile(_checkpoint(b), _checkpoint(spec))
    for command in (["patch"], ["lens"]):
        out = tmp_path / f"{command[0]}.nc"
        r = _run(*command, "--model", str(spec), "--limit", "2", "--out", str(out), "--remote", managed)
        _assert_refused_naming(r, _sha256(_checkpoint(a)), _sha256(_checkpoint(b)))
        assert not out.exists()


def test_resume_after_the_server_swapped_weights_is_refused(managed, weights_ab, tmp_path):
    """Interrupt a remote sweep against A, redeploy B, `--resume`: refused in one line, nothing mixed."""
    a, b = weights_ab
    spec = _deployed_copy(a, tmp_path / "model")
    out = tmp_path / "r.nc"
    batch0 = tmp_path / "r.nc.partial" / "batch-000000.nc"
    args = ["patch", "--model", str(spec), "--limit", "24", "--batch-size", "1", "--out", str(out), "--remote", managed]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "codi_nnsight", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        deadline = time.monotonic() + 300
        while not batch0.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # Ctrl-C after the first finished pair
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()[-2000:]
    assert not out.exists(), "the sweep finished before it could be interrupted"
    kept = sorted(batch0.parent.glob("batch-*.nc"))
    assert kept

    shutil.copyfile(_checkpoint(b), _checkpoint(spec))
    r = _script("restart", str(spec), timeout=600)  # the server now runs B behind the same key
    assert r.returncode == 0, r.stderr[-3000:]

    r = _run(*args, "--resume")
    _assert_refused_naming(r, _sha256(_checkpoint(a)), _sha256(_checkpoint(b)))
    assert sorted(batch0.parent.glob("batch-*.nc")) == kept and not out.exists()
