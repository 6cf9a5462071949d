"""What the partial store trusts on --resume: only the bytes it wrote, only pairs of the run, and no
leftover folder from a run that finished nothing."""

from __future__ import annotations

import json
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr

from codi_nnsight.errors import UserError
from codi_nnsight.patching.store import HASHES_NAME, PartialStore, file_sha256

CONFIG = {"mode": "recurrent", "layers": [0, 1], "pairs_sha256": "abc", "seed": 0}


def batch(*pair_ids: int) -> xr.Dataset:
    ids = np.array(pair_ids, dtype=np.int64)
    return xr.Dataset({"kl": ("pair", ids.astype(float) / 10)}, coords={"pair": ids})


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def edit_kl(path: Path, value: float) -> None:
    """Change the stored `kl` values in place, as a hand edit would (attrs, fingerprint included, kept)."""
    with netCDF4.Dataset(path, "r+") as f:
        f["kl"][:] = value


def stored(tmp_path: Path, *batches: tuple[int, ...]) -> Path:
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    store.open(resume=False)
    for ids in batches:
        store.add(batch(*ids))
    store.close()
    return tmp_path / "r.nc.partial"


# --------------------------------------------------------------------------- content hashes


def test_each_batch_has_its_sha256_recorded(tmp_path):
    partial = stored(tmp_path, (1, 2), (3,))
    hashes = json.loads((partial / HASHES_NAME).read_text())
    assert hashes == {p.name: file_sha256(p) for p in sorted(partial.glob("batch-*.nc"))}
    assert len(hashes) == 2


def test_an_edited_batch_is_refused_on_resume_and_on_finish(tmp_path):
    partial = stored(tmp_path, (1, 2), (3,))
    edited = partial / "batch-000000.nc"
    recorded = json.loads((partial / HASHES_NAME).read_text())[edited.name]
    edit_kl(edited, 9.5)
    with xr.open_dataset(edited) as f:  # still a readable batch of this run, as far as its attrs go
        assert f["kl"].values.tolist() == [9.5, 9.5]
    expected = (
        f"{edited}: contents changed since the run wrote it (sha256 {file_sha256(edited)[:12]}…, recorded "
        f"{recorded[:12]}…); refusing to use an edited batch — delete it to recompute its pairs, or "
        f"{partial} to start over"
    )
    with pytest.raises(UserError) as e:
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=True)
    assert one_line(e) == expected
    edited.unlink()  # deleting it is the way out: its pairs are computed again
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    assert store.open(resume=True) == {3}
    # An edit while a run holds the store is caught when it finishes.
    store.add(batch(1, 2))
    edit_kl(partial / "batch-000001.nc", 0.0)
    with pytest.raises(UserError, match="batch-000001.nc: contents changed since the run wrote it"):
        store.finish({}, [1, 2, 3])
    assert not (tmp_path / "r.nc").exists() and not store.locked


def test_a_batch_without_a_recorded_hash_is_refused(tmp_path):
    partial = stored(tmp_path, (1, 2))
    (partial / HASHES_NAME).unlink()
    with pytest.raises(UserError) as e:
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=True)
    assert one_line(e) == (
        f"{partial / 'batch-000000.nc'}: no content hash recorded for it in {HASHES_NAME} (not written by "
        f"this run, or by an older version); refusing to use it — delete it to recompute its pairs, or "
        f"{partial} to start over"
    )


def test_a_corrupt_hash_record_is_a_one_line_error(tmp_path):
    partial = stored(tmp_path, (1,))
    (partial / HASHES_NAME).write_text('{"batch-000000.nc": ')
    with pytest.raises(UserError) as e:
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=True)
    assert one_line(e).startswith(f"{partial / HASHES_NAME}: corrupt (Expecting value")
    assert one_line(e).endswith(f"cannot check the batch files — delete {partial} to start over")


def test_a_hash_recorded_for_a_batch_that_never_arrived_is_harmless(tmp_path):
    # A run killed between recording a hash and moving the batch into place leaves such an entry.
    partial = stored(tmp_path, (1,))
    hashes = json.loads((partial / HASHES_NAME).read_text())
    (partial / HASHES_NAME).write_text(json.dumps({**hashes, "batch-000001.nc": "0" * 64}))
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    assert store.open(resume=True) == {1}
    store.add(batch(2))  # takes that name; its real hash replaces the stale one
    assert store.finish({}, [1, 2])["kl"].values.tolist() == [0.1, 0.2]


def test_sweep_resume_refuses_an_edited_kl(tiny_models, tmp_path, monkeypatch):
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
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, layers=[0])
    monkeypatch.setattr(sweep_mod, "run_batch", real)
    edited = tmp_path / "r.nc.partial" / "batch-000000.nc"
    edit_kl(edited, 0.0)
    with pytest.raises(UserError) as e:
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, layers=[0], resume=True)
    assert one_line(e).startswith(f"{edited}: contents changed since the run wrote it (sha256 ")
    assert not out.exists()


# --------------------------------------------------------------------------- pair ids outside the run


def test_a_stored_pair_id_not_in_the_pairs_is_refused_by_batch_and_id(tmp_path):
    partial = stored(tmp_path, (1,), (2, 99))
    message = (
        f"{partial / 'batch-000001.nc'}: pair_id 99 is not in the pairs file; refusing to mix results — "
        f"delete it, or {partial} to start over"
    )
    with pytest.raises(UserError) as e:
        PartialStore(tmp_path / "r.nc", CONFIG).open(resume=True, pair_ids=[1, 2, 3])
    assert one_line(e) == message
    store = PartialStore(tmp_path / "r.nc", CONFIG)
    assert store.open(resume=True) == {1, 2, 99}  # without the run's pairs it cannot tell
    with pytest.raises(UserError) as e:
        store.finish({}, [1, 2])
    assert one_line(e) == message
    assert not (tmp_path / "r.nc").exists()


def test_sweep_resume_with_a_batch_of_a_pair_not_in_the_pairs_file(tiny_models, tmp_path, monkeypatch):
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
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, layers=[0])
    monkeypatch.setattr(sweep_mod, "run_batch", real)
    partial = tmp_path / "r.nc.partial"
    # A batch of this very run (fingerprint and hash recorded by the store), but for pair 77.
    config = json.loads((partial / "config.json").read_text())
    with xr.open_dataset(partial / "batch-000000.nc") as f:
        first = f.load()
    first.attrs = {}
    store = PartialStore(out, config)
    store.open(resume=True)
    store.add(first.isel(pair=[0]).assign_coords(pair=np.array([77], dtype=np.int64)))
    store.close()
    with pytest.raises(UserError) as e:
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, layers=[0], resume=True)
    assert one_line(e).startswith(f"{partial / 'batch-000001.nc'}: pair_id 77 is not in the pairs file")
    assert not out.exists()


# --------------------------------------------------------------------------- a run that finished nothing


def test_a_failed_run_with_no_finished_batch_leaves_no_folder(tmp_path):
    partial = tmp_path / "r.nc.partial"
    with pytest.raises(RuntimeError, match="first request failed"):
        with PartialStore(tmp_path / "r.nc", CONFIG) as store:
            store.open(resume=False)
            raise RuntimeError("first request failed")
    assert not partial.exists()
    with PartialStore(tmp_path / "r.nc", CONFIG) as store:
        assert store.open(resume=False) == set()  # no --resume demanded
        store.add(batch(1))
    assert partial.exists()
    # A failure after a finished batch keeps everything; so does a failure of a resumed run.
    for _ in range(2):
        with pytest.raises(RuntimeError):
            with PartialStore(tmp_path / "r.nc", CONFIG) as store:
                store.open(resume=True)
                raise RuntimeError("later request failed")
        assert len(list(partial.glob("batch-*.nc"))) == 1 and (partial / "config.json").exists()


def test_a_refused_resume_never_removes_the_folder_it_refused(tmp_path):
    PartialStore(tmp_path / "r.nc", CONFIG).open(resume=False)  # a run killed before its first batch
    partial = tmp_path / "r.nc.partial"
    with pytest.raises(UserError, match="a partial run exists"):
        with PartialStore(tmp_path / "r.nc", CONFIG) as store:
            store.open(resume=False)
    assert (partial / "config.json").exists()


def test_sweep_whose_first_request_fails_can_be_rerun_without_resume(tiny_models, tmp_path, monkeypatch):
    from codi_nnsight.data.synthetic import make_synthetic_pairs
    from codi_nnsight.patching import sweep as sweep_mod

    model, pairs = tiny_models["gpt2"], make_synthetic_pairs(2, seed=4)
    real = sweep_mod.run_batch

    def refused(*a, **k):
        raise UserError("request failed (server unavailable)")

    monkeypatch.setattr(sweep_mod, "run_batch", refused)
    out = tmp_path / "r.nc"
    with pytest.raises(UserError) as e:
        sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, layers=[0])
    assert one_line(e) == "request failed (server unavailable)"
    assert not (tmp_path / "r.nc.partial").exists()
    monkeypatch.setattr(sweep_mod, "run_batch", real)
    ds = sweep_mod.patch_sweep(model, pairs, out=out, batch_size=2, layers=[0])
    assert ds.sizes["pair"] == 2 and out.exists()
