"""Two runs on one output: the store's lock covers the final file, so neither replaces the other's result."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from codi_nnsight.errors import UserError
from codi_nnsight.patching.store import PartialStore

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
LONG = {"mode": "recurrent", "pairs_sha256": "long", "seed": 0}
SHORT = {"mode": "recurrent", "pairs_sha256": "short", "seed": 0}


def batch(*pair_ids: int, value: float = 0.0) -> xr.Dataset:
    ids = np.array(pair_ids, dtype=np.int64)
    return xr.Dataset({"kl": ("pair", ids.astype(float) + value)}, coords={"pair": ids})


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


# A run that holds the store (one batch stored), waits for a line on stdin, then finishes.
LONG_RUN = f"""
import sys
import numpy as np, xarray as xr
from codi_nnsight.patching.store import PartialStore
s = PartialStore(sys.argv[1], {LONG!r})
s.open(resume=False)
ids = np.arange(400, dtype=np.int64)
s.add(xr.Dataset({{"kl": ("pair", ids.astype(float))}}, coords={{"pair": ids}}))
print("stored", flush=True)
sys.stdin.readline()
s.finish({{"run": "long"}}, list(range(400)))
print("finished", flush=True)
"""


def test_a_second_run_never_replaces_the_result_of_a_run_that_finished_meanwhile(tmp_path):
    out = tmp_path / "race.nc"
    long_run = subprocess.Popen(
        [sys.executable, "-c", LONG_RUN, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
        text=True,
    )
    try:
        assert long_run.stdout.readline().strip() == "stored"
        # The short run starts now: its own "does OUT exist" check (the CLI's) passes ...
        assert not out.exists()
        with pytest.raises(UserError, match=f"is in use by PID {long_run.pid}"):
            PartialStore(out, SHORT).open(resume=False)
        # ... and it tries again (e.g. after loading its model) once the long run has finished.
        long_run.stdin.write("go\n")
        long_run.stdin.flush()
        assert long_run.stdout.readline().strip() == "finished"
        assert long_run.wait(60) == 0
    finally:
        if long_run.poll() is None:
            long_run.kill()
            long_run.wait(30)
    before = out.read_bytes()
    short = PartialStore(out, SHORT)
    with pytest.raises(UserError) as e:
        short.open(resume=False)
    assert one_line(e) == f"{out}: file exists; add --force to overwrite it"
    assert out.read_bytes() == before
    assert not short.locked
    assert not (tmp_path / "race.nc.partial").exists(), "the refused run must not leave a folder behind"
    # With force, the user's explicit choice, the file is replaced.
    forced = PartialStore(out, SHORT, force=True)
    assert forced.open(resume=False) == set()
    forced.add(batch(0, 1))
    forced.finish({"run": "short"}, [0, 1])
    with xr.open_dataset(out) as f:
        assert f.attrs["run"] == "short" and f.sizes["pair"] == 2


def test_finish_does_not_replace_a_file_written_while_the_run_held_the_store(tmp_path):
    out = tmp_path / "r.nc"
    store = PartialStore(out, SHORT)
    store.open(resume=False)
    store.add(batch(1, 2))
    out.write_text("another tool's result")  # a writer that does not use the store's lock
    with pytest.raises(UserError) as e:
        store.finish({}, [1, 2])
    partial = tmp_path / "r.nc.partial"
    assert one_line(e) == (
        f"{out}: file exists; add --force to overwrite it; this run's pairs are kept in {partial} — "
        "rerun with --resume --force to replace it"
    )
    assert out.read_text() == "another tool's result"
    assert not store.locked and len(list(partial.glob("batch-*.nc"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.nc", "r.nc.partial"], "no temporary file left"
    resumed = PartialStore(out, SHORT, force=True)
    assert resumed.open(resume=True) == {1, 2}
    ds = resumed.finish({"run": "resumed"}, [1, 2])
    assert ds["kl"].values.tolist() == [1.0, 2.0] and not partial.exists()
    with xr.open_dataset(out) as f:
        assert f.attrs["run"] == "resumed"


# Each racer retries while another holds the store (a run started a moment later would), then
# writes its own result: exactly one may succeed, the others must see the finished file.
RACER = """
import sys, time
import numpy as np, xarray as xr
from codi_nnsight.errors import UserError
from codi_nnsight.patching.store import PartialStore
out, i = sys.argv[1], int(sys.argv[2])
ds = xr.Dataset({"kl": ("pair", [float(i)])}, coords={"pair": np.array([1], dtype=np.int64)})
deadline = time.monotonic() + 90
while True:
    store = PartialStore(out, {"racer": i})
    try:
        store.open(resume=False)
    except UserError as e:
        if "is in use by PID" in str(e) and time.monotonic() < deadline:
            time.sleep(0.005)
            continue
        print("refused:", e, flush=True)
        sys.exit(3)
    store.add(ds)
    time.sleep(0.1)
    store.finish({"racer": i}, [1])
    print("wrote", flush=True)
    sys.exit(0)
"""


def test_concurrent_runs_on_one_output_leave_exactly_one_result(tmp_path):
    out = tmp_path / "race.nc"
    n = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(out), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
            cwd=ROOT,
            text=True,
        )
        for i in range(n)
    ]
    results = []
    deadline = time.monotonic() + 240
    for p in procs:
        stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        results.append((p.returncode, stdout.strip(), stderr))
    winners = [i for i, (rc, _, _) in enumerate(results) if rc == 0]
    assert len(winners) == 1, results
    for i, (rc, stdout, _stderr) in enumerate(results):
        if i != winners[0]:
            assert rc == 3 and stdout == f"refused: {out}: file exists; add --force to overwrite it", results
    with xr.open_dataset(out) as f:
        assert f.attrs["racer"] == winners[0] and f["kl"].values.tolist() == [float(winners[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.nc"], "no folder, lock or temp file left"
