"""The partial store holds exactly one run: fingerprints, config integrity, duplicates, and the lock."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from codi_nnsight.errors import UserError
from codi_nnsight.patching.store import FINGERPRINT_ATTR, PartialStore, run_fingerprint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"mode": "recurrent", "layers": [0, 1], "pairs_sha256": "abc", "seed": 0}
OTHER = {**CONFIG, "mode": "frozen"}


def batch(*pair_ids: int) -> xr.Dataset:
    """A small batch as the sweep stores it: a `pair` dimension and one metric."""
    ids = np.array(pair_ids, dtype=np.int64)
    return xr.Dataset({"kl": ("pair", ids.astype(float) / 10)}, coords={"pair": ids})


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_every_batch_file_carries_the_run_fingerprint(tmp_path):
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    assert store.open(resume=False) == set()
    store.add(batch(1, 2))
    canonical = json.dumps(CONFIG, sort_keys=True, separators=(",", ":"))
    expected = hashlib.sha256(canonical.encode()).hexdigest()
    assert run_fingerprint(CONFIG) == expected
    with xr.open_dataset(tmp_path / "r.nc.partial" / "batch-000000.nc") as f:
        assert f.attrs[FINGERPRINT_ATTR] == expected
    assert all(FINGERPRINT_ATTR not in ds.attrs for ds in store.batches())
    store.close()


def test_a_batch_file_of_another_configuration_is_refused_by_name(tmp_path):
    other = PartialStore(tmp_path / "other.nc", OTHER)
    other.open(resume=False)
    other.add(batch(7))
    other.close()
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    store.open(resume=False)
    store.add(batch(1))
    store.close()
    intruder = tmp_path / "r.nc.partial" / "batch-000001.nc"
    shutil.copy(tmp_path / "other.nc.partial" / "batch-000000.nc", intruder)
    with pytest.raises(UserError) as e:
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=True)
    assert one_line(e).startswith(f"{intruder}: batch file from a different run (fingerprint ")
    assert "refusing to mix results" in str(e.value)
    # ... and at the end of a run as well, not only on resume
    fresh = PartialStore(tmp_path / "s.nc", CONFIG)
    fresh.open(resume=False)
    fresh.add(batch(1))
    shutil.copy(intruder, tmp_path / "s.nc.partial" / "batch-000001.nc")
    with pytest.raises(UserError, match="batch file from a different run"):
        fresh.finish({}, [1, 7])
    assert not (tmp_path / "s.nc").exists()
    assert not fresh.locked


def test_a_batch_file_without_fingerprint_is_refused(tmp_path):
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    store.open(resume=False)
    store.close()
    stray = tmp_path / "r.nc.partial" / "batch-000000.nc"
    batch(3).to_netcdf(stray, engine="netcdf4")
    with pytest.raises(UserError) as e:
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=True)
    assert one_line(e).startswith(f"{stray}: batch file from a different run (it has no run fingerprint)")


@pytest.mark.parametrize("resume", [False, True])
def test_batches_without_config_json_are_refused(tmp_path, resume):
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    store.open(resume=False)
    store.add(batch(1, 2))
    store.close()
    cfg = tmp_path / "r.nc.partial" / "config.json"
    cfg.unlink()
    with pytest.raises(UserError) as e:
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=resume)
    assert one_line(e).startswith(f"{cfg}: missing, but the folder holds 1 batch file(s) (batch-000000.nc, ...)")
    assert not cfg.exists(), "must not adopt the orphaned batches by writing a new config"


@pytest.mark.parametrize(
    "content,why",
    [
        ('{"mode": "recurrent", "lay', "corrupt (Unterminated string starting at: line 1 column 23 (char 22)); "),
        ("[1, 2]", "corrupt (a JSON list, not an object)"),
        ("", "corrupt (Expecting value: line 1 column 1 (char 0)); "),
    ],
)
def test_corrupt_config_json_is_a_one_line_error(tmp_path, content, why):
    PartialStore(tmp_path / "r.nc", CONFIG).open(resume=False)
    cfg = tmp_path / "r.nc.partial" / "config.json"
    cfg.write_text(content)
    with pytest.raises(UserError) as e:
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=True)
    assert one_line(e).startswith(f"{cfg}: {why}")
    assert "delete" in str(e.value)


def test_duplicate_pair_ids_are_refused_on_resume_and_on_finish(tmp_path):
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    store.open(resume=False)
    store.add(batch(1, 2))
    store.add(batch(3))
    partial = tmp_path / "r.nc.partial"
    shutil.copy(partial / "batch-000000.nc", partial / "batch-000009.nc")  # a copied batch file
    with pytest.raises(UserError) as e:
        store.finish({}, [1, 2, 3])
    assert one_line(e) == (
        f"{partial / 'batch-000009.nc'}: pair_id 1 is also in batch-000000.nc (a copied batch "
        "file?); refusing to mix results — delete one of them"
    )
    assert not (tmp_path / "r.nc").exists() and partial.exists()
    with pytest.raises(UserError, match="pair_id 1 is also in batch-000000.nc"):
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=True)


def test_finish_refuses_missing_pairs_and_writes_exactly_one_run(tmp_path):
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    store.open(resume=False)
    store.add(batch(2))
    with pytest.raises(UserError, match=r"pair_id 1 missing from the stored batches; rerun with --resume"):
        store.finish({}, [1, 2])
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    assert store.open(resume=True) == {2}
    store.add(batch(1))
    ds = store.finish({"a": 1}, [1, 2], transform=lambda d: d.assign_attrs(b=2))
    assert ds["pair"].values.tolist() == [1, 2] and ds.attrs == {"a": 1, "b": 2}
    with xr.open_dataset(tmp_path / "r.nc") as f:
        assert f.attrs == {"a": 1, "b": 2}
    assert not (tmp_path / "r.nc.partial").exists()


def test_existing_store_without_resume_is_still_refused(tmp_path):
    PartialStore(tmp_path / "r.nc", CONFIG).open(resume=False)
    with pytest.raises(UserError, match="a partial run exists; rerun with --resume"):
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=False)
    with pytest.raises(UserError, match=r"partial run has a different configuration \(mode differ"):
        PartialStore(tmp_path / "r.nc", OTHER).open(resume=True)
    # the refusals released the lock again
    assert not (tmp_path / "r.nc.partial" / "lock").exists()


def _hold_in_subprocess(out: Path) -> subprocess.Popen:
    code = (
        "import sys\nfrom codi_nnsight.patching.store import PartialStore\n"
        f"s = PartialStore(sys.argv[1], {CONFIG!r})\ns.open(resume=False)\n"
        "print('locked', flush=True)\nsys.stdin.read()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        text=True,
    )
    lock = out.with_name(out.name + ".partial") / "lock"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == proc.pid:
                return proc
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the helper process did not take the lock within 60 s")


def test_a_store_in_use_by_a_live_process_is_refused_then_taken_over_after_sigkill(tmp_path):
    out = tmp_path / "r.nc"
    proc = _hold_in_subprocess(out)
    try:
        with pytest.raises(UserError) as e:
            PartialStore(out, CONFIG).open(resume=True)
        assert one_line(e).startswith(
            f"{tmp_path / 'r.nc.partial'}: is in use by PID {proc.pid}; wait for that run to finish"
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    lock = tmp_path / "r.nc.partial" / "lock"
    assert json.loads(lock.read_text())["pid"] == proc.pid  # a killed run cannot clean up ...
    store = PartialStore(out, CONFIG)
    assert store.open(resume=True) == set()  # ... and its stale lock is taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    store.close()
    assert not lock.exists()


def test_a_stale_lock_file_from_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    partial = tmp_path / "r.nc.partial"
    partial.mkdir()
    (partial / "lock").write_text(json.dumps({"pid": dead.pid, "host": "x"}))
    with PartialStore(tmp_path / "r.nc", CONFIG) as store:
        assert store.open(resume=False) == set()
        assert json.loads((partial / "lock").read_text())["pid"] == os.getpid()
    assert not (partial / "lock").exists()


def test_the_lock_is_released_on_exceptions_close_and_finish(tmp_path):
    out = tmp_path / "r.nc"
    lock = tmp_path / "r.nc.partial" / "lock"
    with pytest.raises(RuntimeError, match="boom"):
        with PartialStore(out, CONFIG) as store:
            store.open(resume=False)
            store.add(batch(1))
            assert lock.exists()
            raise RuntimeError("boom")
    assert not lock.exists()
    store = PartialStore(out, CONFIG)
    assert store.open(resume=True) == {1}
    store.add(batch(2))
    store.finish({}, [1, 2])
    assert not store.locked and out.exists() and not lock.parent.exists()
    with pytest.raises(RuntimeError, match="before open"):
        store.add(batch(3))


def test_same_process_reopen_after_an_unclosed_run_but_not_from_another_thread(tmp_path):
    out = tmp_path / "r.nc"
    abandoned = PartialStore(out, CONFIG)  # a sweep that raised without close(): still referenced
    abandoned.open(resume=False)
    abandoned.add(batch(1))
    errors: list[str] = []

    def other_thread() -> None:
        try:
            PartialStore(out, CONFIG).open(resume=True)
        except UserError as e:
            errors.append(str(e))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(30)
    assert errors and f"is in use by PID {os.getpid()} (another thread of this process)" in errors[0]
    # Abandoned stores are freed at garbage collection; in the same thread, a new run takes over at once.
    store = PartialStore(out, CONFIG)
    assert store.open(resume=True) == {1}
    assert not abandoned.locked and store.locked
    abandoned.close()  # closing the old one must not drop the new one's lock
    assert store.locked and (tmp_path / "r.nc.partial" / "lock").exists()
    store.close()


def test_sweep_refuses_a_copied_batch_file_on_resume(tiny_models, tmp_path, monkeypatch):
    from codi_nnsight.data.synthetic import make_synthetic_pairs
    from codi_nnsight.patching import sweep as sweep_mod

    model, pairs = tiny_models["gpt2"], make_synthetic_pairs(4, seed=4)
    real = sweep_mod.run_batch
    calls = {"n": 0}

    def interrupt_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "run_batch", interrupt_second)
    out = tmp_path / "r.nc"
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2)
    monkeypatch.setattr(sweep_mod, "run_batch", real)
    partial = tmp_path / "r.nc.partial"
    shutil.copy(partial / "batch-000000.nc", partial / "batch-000001.nc")
    with pytest.raises(UserError) as e:
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, resume=True)
    assert one_line(e).startswith(f"{partial / 'batch-000001.nc'}: pair_id ")
    (partial / "batch-000001.nc").unlink()
    ds = sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, resume=True)
    assert ds.sizes["pair"] == 4 and not partial.exists()
