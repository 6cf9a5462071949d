"""Sharding batch loops over Ray workers: bit-identical files, a SIGKILLed worker, resume across
worker counts, and one-line errors (a worker that cannot load the model, Ray not installed).

One Ray session and one pool of two workers serve the whole module (worker start-up — a Python
process importing torch — is most of the cost); each worker loads whichever model a test hands it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import xarray as xr

from codi_nnsight.data.pairs import Pair, PairSet, Question
from codi_nnsight.errors import UserError
from codi_nnsight.model.wrapper import load_model
from codi_nnsight.patching.attribution import attribution_patching
from codi_nnsight.patching.store import PartialStore
from codi_nnsight.patching.sweep import patch_sweep

ray = pytest.importorskip("ray")
from codi_nnsight.run.executors import RayExecutor, worker_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Attrs that say when a run happened, not what it computed.
CLOCK = ("start_time", "end_time")


@pytest.fixture(scope="module")
def pool():
    """One local Ray session (4 logical CPUs: room for a second pool of 2) and a pool of 2 workers."""
    assert torch.get_num_threads() == 1  # conftest: the one-process runs use the workers' kernels
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env=worker_environment(),  # the workers import the package from this checkout
    )
    executor = RayExecutor(2)
    yield executor
    executor.close()
    ray.shutdown()


def many_pairs(n: int = 8) -> PairSet:
    """`n` pairs with questions of several lengths (and so several answer prompts and batches)."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 4 + 2 * i
        clean = Question(f"Sam has {a} cats and {b} dogs. How many pets?", a + b, {})
        corrupted = Question(f"Sam has {a + 1} cats and {b} dogs. How many pets?", a + 1 + b, {})
        rows.append(Pair(i, clean, corrupted))
    return PairSet.from_pairs(rows)


def assert_bit_identical(path_a: Path, path_b: Path, ignore: tuple[str, ...] = ()) -> None:
    """Every variable and coordinate equal byte for byte, every attr equal but the clock's (and `ignore`)."""
    with xr.open_dataset(path_a) as a, xr.open_dataset(path_b) as b:
        assert set(a.variables) == set(b.variables)
        for name in a.variables:
            x, y = a[name].values, b[name].values
            assert x.dtype == y.dtype and x.shape == y.shape, name
            if x.dtype == object:
                assert (x == y).all(), name
            else:
                assert x.tobytes() == y.tobytes(), name
            assert a[name].attrs == b[name].attrs, name
        strip = lambda attrs: {k: v for k, v in attrs.items() if k not in CLOCK + ignore}  # noqa: E731
        assert strip(a.attrs) == strip(b.attrs)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_workers_write_the_one_process_file_bit_for_bit(pool, tiny_dirs, tmp_path, dtype):
    model = load_model(tiny_dirs["llama"], dtype=dtype, device="cpu")
    pairs = many_pairs(6)
    kw = dict(batch_size=2, positions="each", component=["resid", "mlp"])  # stacked: the parts share the pool
    patch_sweep(model, pairs, out=tmp_path / "one.nc", **kw)
    patch_sweep(model, pairs, out=tmp_path / "two.nc", workers=pool, **kw)
    assert_bit_identical(tmp_path / "one.nc", tmp_path / "two.nc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.nc", "two.nc"]  # no part or partial left


def test_attribution_on_two_workers_is_bit_identical(pool, tiny_models):
    model, pairs = tiny_models["gpt2"], many_pairs(4)
    one = attribution_patching(model, pairs, batch_size=1, command="x")
    two = attribution_patching(model, pairs, batch_size=1, command="x", workers=pool)
    for name in one.variables:
        assert one[name].values.tobytes() == two[name].values.tobytes(), name


def test_early_exit_on_two_workers_is_bit_identical(pool, tiny_models):
    from codi_nnsight.patching.ablation import early_exit

    model, pairs = tiny_models["llama"], list(many_pairs(4))
    one = early_exit(model, pairs, batch_size=3, past_trained=1)
    two = early_exit(model, pairs, batch_size=3, past_trained=1, workers=pool)
    for name in one.variables:
        assert one[name].values.tobytes() == two[name].values.tobytes(), name


def test_a_sequence_sweep_on_two_workers_is_bit_identical(pool, tiny_dirs, tmp_path):
    """Every token patched on its own (question-token prefills of their own): the same file."""
    model = load_model(tiny_dirs["gpt2"], dtype="float64", device="cpu")
    pairs = many_pairs(4)
    kw = dict(batch_size=1, positions="sequence", layers=[0, 1])
    patch_sweep(model, pairs, out=tmp_path / "one.nc", **kw)
    patch_sweep(model, pairs, out=tmp_path / "two.nc", workers=pool, **kw)
    assert_bit_identical(tmp_path / "one.nc", tmp_path / "two.nc")


def _readouts_and_interventions():
    """Every command with a batch loop outside the patching sweep: (name, call(model, pairs, **kw))."""
    from codi_nnsight.interventions.graph import thought_graph
    from codi_nnsight.interventions.steer import steer
    from codi_nnsight.interventions.transplant import transplant
    from codi_nnsight.readouts.attention import attention_readout
    from codi_nnsight.readouts.lens import logit_lens
    from codi_nnsight.readouts.probe import probe

    return {
        "lens": lambda m, p, **kw: logit_lens(m, p, batch_size=3, **kw),
        "attention": lambda m, p, **kw: attention_readout(m, p, batch_size=3, **kw),
        "probe": lambda m, p, **kw: probe(m, p, seeds=(0,), batch_size=3, **kw),
        "transplant": lambda m, p, **kw: transplant(m, p, thoughts=[0, 2], batch_size=3, **kw),
        # steer runs two loops (the base runs, then the edits) on one executor
        "steer": lambda m, p, **kw: steer(m, p, scales=(-0.5, 0.5), n_random=1, batch_size=3, **kw),
        "thought-graph": lambda m, p, **kw: thought_graph(m, p, interventions=("zero", "noise"), batch_size=5, **kw),
    }


@pytest.mark.parametrize("name", list(_readouts_and_interventions()))
def test_readouts_and_interventions_on_two_workers_are_bit_identical(pool, tiny_models, name):
    call = _readouts_and_interventions()[name]
    from codi_nnsight.data.synthetic import make_toy_pairs

    model, pairs = tiny_models["llama"], make_toy_pairs(4, seed=2)  # with chains: gold values to probe and steer
    one, two = call(model, pairs), call(model, pairs, workers=pool)
    assert set(one.variables) == set(two.variables)
    for var in one.variables:
        x, y = one[var].values, two[var].values
        assert x.dtype == y.dtype and x.shape == y.shape, var
        assert (x == y).all() if x.dtype == object else x.tobytes() == y.tobytes(), var
    strip = lambda attrs: {k: v for k, v in attrs.items() if k not in CLOCK}  # noqa: E731
    assert strip(one.attrs) == strip(two.attrs)


def test_a_worker_that_cannot_load_the_model_is_one_line_naming_it(pool, tiny_dirs, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(Path(tiny_dirs["gpt2"]).parent, folder)
    model = load_model(folder / "codi.json", dtype="float64", device="cpu")
    (folder / "ckpt" / "model.safetensors").unlink()  # the driver has loaded it; the workers cannot
    with pytest.raises(UserError) as e:
        patch_sweep(model, many_pairs(2), batch_size=1, workers=pool)
    message = str(e.value)
    assert "\n" not in message
    assert re.fullmatch(r"ray worker 0 \(PID \d+ on .+\) cannot load the model: .*model\.safetensors.*", message)


def interrupted_store(model, pairs, out, after: int, workers=None) -> None:
    """Run a sweep whose driver is interrupted (Ctrl-C) once `after` batches are stored."""
    real = PartialStore.add
    seen = {"n": 0}

    def add_then_interrupt(self, ds):
        real(self, ds)
        seen["n"] += 1
        if seen["n"] == after:
            raise KeyboardInterrupt

    PartialStore.add = add_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            patch_sweep(model, pairs, batch_size=1, out=out, workers=workers)
    finally:
        PartialStore.add = real
    assert len(list(Path(f"{out}.partial").glob("batch-*.nc"))) == after


def test_resume_continues_with_any_number_of_workers(pool, tiny_models, tmp_path):
    model, pairs = tiny_models["gpt2"], many_pairs(6)
    patch_sweep(model, pairs, batch_size=1, out=tmp_path / "ref.nc")
    # One process interrupted, two workers finish it.
    interrupted_store(model, pairs, tmp_path / "a.nc", after=2)
    patch_sweep(model, pairs, batch_size=1, out=tmp_path / "a.nc", resume=True, workers=pool)
    # Two workers interrupted, one process finishes it.
    interrupted_store(model, pairs, tmp_path / "b.nc", after=3, workers=pool)
    patch_sweep(model, pairs, batch_size=1, out=tmp_path / "b.nc", resume=True)
    # A resumed run whose stored batches include the full-patch check's pair runs that check as a
    # trace of its own (as one process always did), so only the check's value may differ from the
    # uninterrupted run; both resumed files agree on everything.
    check = ("sanity_full_patch_max_abs", "sanity_details")
    assert_bit_identical(tmp_path / "ref.nc", tmp_path / "a.nc", ignore=check)
    assert_bit_identical(tmp_path / "a.nc", tmp_path / "b.nc")


def _running_batch(pids: list[int]) -> int | None:
    """A worker PID that is inside a batch now: Ray titles a process by the task it runs."""
    for pid in pids:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ".run" in title:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds a busy worker through /proc")
def test_a_worker_sigkilled_mid_batch_has_its_batch_run_again(pool, tiny_models, tmp_path):
    model, pairs = tiny_models["llama"], many_pairs(8)
    kw = dict(batch_size=1, positions="each", out=None)
    reference = patch_sweep(model, pairs, **kw)
    before = pool.requeued
    patch_sweep(model, pairs, workers=pool, **kw)  # the pool now holds this model
    killed: list[int] = []

    def kill_one_mid_batch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            pid = _running_batch(pool.worker_pids)
            if pid is None:
                time.sleep(0.002)
                continue
            os.kill(pid, signal.SIGSTOP)  # frozen: it cannot finish the batch between our look and the kill
            if _running_batch([pid]) == pid:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            else:
                os.kill(pid, signal.SIGCONT)

    killer = threading.Thread(target=kill_one_mid_batch)
    killer.start()
    try:
        sharded = patch_sweep(model, pairs, workers=pool, **kw)
    finally:
        killer.join()
    assert killed and pool.requeued == before + 1
    assert killed[0] not in pool.worker_pids  # replaced by a fresh worker
    for name in reference.variables:
        x, y = reference[name].values, sharded[name].values
        assert x.tobytes() == y.tobytes() if x.dtype != object else (x == y).all(), name


def test_cli_patch_on_an_existing_cluster_leaves_it_running(pool, tiny_dirs, tmp_path):
    from codi_nnsight.cli_common import load_cli_pairs

    address = ray.get_runtime_context().gcs_address  # the module's session, as a cluster to connect to
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "codi_nnsight", "patch", "--model", tiny_dirs["gpt2"], "--dtype", "float64"]
    cmd += ["--limit", "3", "--batch-size", "1", "--out", str(tmp_path / "two.nc")]
    r = subprocess.run([*cmd, "--ray-address", address, "--workers", "2"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ray.get(ray.put(7)) == 7  # the cluster is still up after the command disconnected
    model = load_model(tiny_dirs["gpt2"], dtype="float64", device="cpu")
    one = patch_sweep(model, load_cli_pairs(None, 3), batch_size=1)
    with xr.open_dataset(tmp_path / "two.nc") as two:
        for name in one.data_vars:
            assert one[name].values.tobytes() == two[name].values.tobytes(), name


def test_workers_with_a_remote_backend_is_one_line(tiny_models):
    with pytest.raises(UserError, match=r"^--workers 2 runs the traces on Ray workers .* --remote ndif$"):
        patch_sweep(tiny_models["gpt2"], many_pairs(2), workers=2, remote="ndif")
