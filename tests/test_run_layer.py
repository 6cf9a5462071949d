"""The run layer: one backend per run, truthful provenance for every command, one writer, strict API arguments.

Remote behaviour is checked against `tests/fake_ndif.py` (frozen parameters, one thread, its own
deployment of the checkpoint), which runs the trace bodies as NDIF does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from fake_ndif import FakeNDIF

from codi_nnsight.cli import main
from codi_nnsight.data.synthetic import make_synthetic_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.model import wrapper as wrapper_mod
from codi_nnsight.model.schedule import CallSchedule
from codi_nnsight.model.wrapper import load_model
from codi_nnsight.patching.config import SweepConfig
from codi_nnsight.patching.sweep import patch_sweep
from codi_nnsight.run import Backend, Run, clean_attrs, resolve_backend

# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize(
    "remote,kind,label",
    [
        (False, "local", ""),
        (None, "local", ""),
        ("local", "remote-simulation", "local"),
        (True, "server", "ndif"),
        ("ndif", "server", "ndif"),
        ("https://user:hunter22@ndif.example.org", "server", "https://***@ndif.example.org"),
    ],
)
def test_backends_resolve_once_from_remote(remote, kind, label):
    backend = resolve_backend(remote)
    assert backend.kind == kind and backend.label == label
    assert backend.needs_local_weights == (kind != "server")
    assert resolve_backend(backend) is backend


def test_backend_refuses_an_empty_or_odd_target():
    with pytest.raises(UserError) as e:
        resolve_backend("")
    assert str(e.value) == "--remote '': expected local, ndif or the URL of an NDIF host"
    with pytest.raises(TypeError, match=r"remote=3: expected False, True, 'local', 'ndif' or a host URL"):
        resolve_backend(3)


def test_a_weightless_model_cannot_run_here(tiny_dirs):
    client = load_model(tiny_dirs["gpt2"], remote_only=True)
    for remote in (False, "local"):
        with pytest.raises(UserError, match=r"loaded for remote runs only \(remote_only=True\)"):
            Run(client, remote)
    assert Run(client, "http://127.0.0.1:9").backend.is_server  # no work yet: nothing contacted


def test_recorded_command_and_attrs_never_hold_credentials():
    run_cmd = "codi-nnsight patch --remote https://alice:s3cretpw@ndif.example.org --out r.nc"
    attrs = clean_attrs({"command": run_cmd, "remote": "https://alice:s3cretpw@ndif.example.org", "n": True})
    assert "s3cretpw" not in json.dumps(attrs) and "alice" not in json.dumps(attrs)
    assert attrs["n"] == 1


def test_cli_patch_never_stores_a_url_password(tiny_dirs, tiny_models, tmp_path):
    out = tmp_path / "r.nc"
    with FakeNDIF(checkpoint=tiny_dirs["gpt2"], dtype="float64") as server:
        url = server.url.replace("http://", "http://alice:s3cretpw@")
        r = CliRunner().invoke(
            main, ["patch", "--model", tiny_dirs["gpt2"], "--out", str(out), "--limit", "1", "--remote", url]
        )
    assert r.exit_code == 0, r.output
    raw = out.read_bytes()
    assert b"s3cretpw" not in raw and b"alice" not in raw
    with xr.open_dataset(out) as ds:
        assert ds.attrs["remote"] == server.url.replace("http://", "http://***@")
        assert "***@" in ds.attrs["command"]


# --------------------------------------------------------------------------- every command, remotely

COMMANDS = {
    "patch": ["patch", "--layers", "0"],
    "ablation": ["patch", "--layers", "0", "--ablation", "mean"],
    "early-exit": ["early-exit"],
    "attribute": ["attribute", "--layers", "0"],
    "lens": ["lens"],
    "attention": ["attention"],
    "probe": ["probe", "--seeds", "0"],
}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return str(make_synthetic_pairs(4, seed=4).save(tmp_path_factory.mktemp("pairs") / "p.json"))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_runs_remotely_without_weights_and_records_the_server(
    command, tiny_dirs, pairs_file, tmp_path, monkeypatch
):
    """No weights read on the client; the file names what the server ran (its dtype, its checkpoint)."""
    out = tmp_path / "r.nc"
    with FakeNDIF(checkpoint=tiny_dirs["gpt2"], dtype="float64") as server:
        loads = []
        real = wrapper_mod.build_codi

        def spy(cfg, *args, **kwargs):
            loads.append("meta" if kwargs.get("meta") else "weights")
            return real(cfg, *args, **kwargs)

        monkeypatch.setattr(wrapper_mod, "build_codi", spy)
        args = [*COMMANDS[command], "--model", tiny_dirs["gpt2"], "--pairs", pairs_file, "--out", str(out)]
        r = CliRunner().invoke(main, [*args, "--dtype", "float32", "--remote", server.url])
    assert r.exit_code == 0, r.output
    assert loads == ["meta"], f"{command} read weights on the client: {loads}"
    with xr.open_dataset(out) as ds:
        attrs = dict(ds.attrs)
    assert attrs["computed_on"] == "server" and attrs["remote"] == server.url
    assert attrs["dtype"] == "float64" and attrs["dtype_source"] == "server" and attrs["client_dtype"] == "float32"
    sha = wrapper_mod._local_file_sha256(str(Path(tiny_dirs["gpt2"]).parent / "ckpt" / "model.safetensors"))
    assert attrs["checkpoint_sha256"] == sha != "" and attrs["checkpoint_sha256_source"] == "server"
    assert "version_torch" in attrs and attrs["command"].startswith(f"codi-nnsight {COMMANDS[command][0]} ")


@pytest.mark.parametrize("command", ["patch", "lens", "early-exit", "attribute"])
def test_cli_refuses_a_server_with_other_weights_in_one_line(command, tiny_dirs, pairs_file, tmp_path):
    """The client's codi.json names checkpoint B, the server runs A: refused before any work, naming both."""
    other = tmp_path / "other"
    shutil.copytree(Path(tiny_dirs["gpt2"]).parent, other)
    from codi_nnsight.testing.tiny import write_tiny_codi

    b = write_tiny_codi(tmp_path / "b", family="gpt2", n_layers=2, num_latent=3, seed=7)
    out = tmp_path / "r.nc"
    with FakeNDIF(checkpoint=tiny_dirs["gpt2"], dtype="float32") as server:
        args = [*COMMANDS[command], "--model", str(b), "--pairs", pairs_file, "--out", str(out)]
        r = CliRunner().invoke(main, [*args, "--remote", server.url])
    assert r.exit_code == 2
    line = r.output.strip()
    assert line.startswith("error: remote ") and "\n" not in line
    assert "the server runs checkpoint sha256" in line or "the server's weights are not this model's" in line
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_remote_resume_against_redeployed_weights_is_refused(tiny_dirs, tmp_path, monkeypatch):
    """Interrupt a remote sweep against weights A, swap the checkpoint file for B, resume: refused, never mixed."""
    from codi_nnsight.patching import sweep as sweep_mod
    from codi_nnsight.testing.tiny import write_tiny_codi

    model_dir = tmp_path / "m"
    shutil.copytree(Path(tiny_dirs["gpt2"]).parent, model_dir)
    codi_json = model_dir / "codi.json"
    pairs = make_synthetic_pairs(4, seed=4)
    out = tmp_path / "r.nc"
    real = sweep_mod.run_batch
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "run_batch", interrupted)
    with FakeNDIF(checkpoint=str(codi_json), dtype="float64") as server:
        client = load_model(codi_json, dtype="float64", remote_only=True)
        with pytest.raises(KeyboardInterrupt):
            patch_sweep(client, pairs, layers=[0], batch_size=2, out=out, remote=server.url)
    assert len(list(Path(f"{out}.partial").glob("batch-*.nc"))) == 1
    monkeypatch.setattr(sweep_mod, "run_batch", real)
    b = write_tiny_codi(tmp_path / "b", family="gpt2", n_layers=2, num_latent=3, seed=7)
    shutil.copy(Path(b).parent / "ckpt" / "model.safetensors", model_dir / "ckpt" / "model.safetensors")
    with FakeNDIF(checkpoint=str(codi_json), dtype="float64") as server:  # redeployed: weights B
        client = load_model(codi_json, dtype="float64", remote_only=True)  # the client's file is B too
        with pytest.raises(UserError) as e:
            patch_sweep(client, pairs, layers=[0], batch_size=2, out=out, remote=server.url, resume=True)
    assert "partial run has a different configuration (checkpoint_sha256 differ" in str(e.value)
    assert "refusing to mix results" in str(e.value) and not out.exists()


# --------------------------------------------------------------------------- defects fixed on the way


def test_mean_ablation_over_two_components_keeps_the_reference(tiny_models):
    model = tiny_models["gpt2"]
    pairs = make_synthetic_pairs(3, seed=5)
    reference = [p.corrupted.question for p in make_synthetic_pairs(4, seed=11)]
    both = patch_sweep(model, pairs, layers=[0, 1], component=["resid", "attn"], ablation="mean", reference=reference)
    for c in ("resid", "attn"):
        one = patch_sweep(model, pairs, layers=[0, 1], component=c, ablation="mean", reference=reference)
        for name in ("kl", "logprob_diff", "flipped"):
            np.testing.assert_array_equal(both[name].sel(component=c).values, one[name].values, err_msg=name)
    default = patch_sweep(model, pairs, layers=[0, 1], component="attn", ablation="mean")
    assert not np.array_equal(default["kl"].values, both["kl"].sel(component="attn").values)


def test_validate_checks_without_changing_the_config(tiny_models):
    cfg = SweepConfig(layers=[0, 1], component="latent")
    assert cfg.layers == [0]  # normalised once, at construction
    before = dict(cfg.__dict__)
    cfg.validate(tiny_models["gpt2"])
    assert cfg.__dict__ == before


def test_patch_help_names_every_component_and_mode():
    from codi_nnsight.patching.options import MODES
    from codi_nnsight.patching.sites import COMPONENTS

    text = " ".join(CliRunner().invoke(main, ["patch", "--help"], terminal_width=400).output.split())
    for name in (*COMPONENTS, *MODES):
        assert name in text, name


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layers": [True]}, "layers: True is not a layer index (expected ints 0-1)"),
        ({"layers": [0.7]}, "layers: 0.7 is not a layer index (expected ints 0-1)"),
        ({"layers": [0, 0]}, "layers: [0, 0] names a layer twice"),
        ({"layers": "0"}, "layers='0': expected a list of layer indices"),
        ({"batch_size": 1.5}, "batch_size=1.5: expected an int >= 1 or 'auto'"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: expected an int >= 1 (or None: the answer's length + 3)"),
        ({"seed": 2**70}, "seed=1180591620717411303424: expected an int in 0 .. 2**63-1"),
        ({"component": []}, "component=[]: expected one of resid, attn, mlp, latent, head or a non-empty list of them"),
        ({"component": ["resid", "resid"]}, "--component resid,resid: a component is named twice"),
        ({"remote": ""}, "--remote '': expected local, ndif or the URL of an NDIF host"),
    ],
)
def test_api_arguments_are_checked_as_strictly_as_the_cli(tiny_models, kwargs, message):
    with pytest.raises(UserError) as e:
        patch_sweep(tiny_models["gpt2"], make_synthetic_pairs(1, seed=4), **kwargs)
    assert str(e.value) == message


def test_api_refuses_a_path_for_pairs(tiny_models):
    with pytest.raises(UserError) as e:
        patch_sweep(tiny_models["gpt2"], "pairs.json")
    assert str(e.value) == "pairs='pairs.json': expected pairs, not a path; load them with codi_nnsight.load_pairs"


def test_api_never_replaces_a_finished_file_without_force(tiny_models, tmp_path):
    model, pairs = tiny_models["gpt2"], make_synthetic_pairs(1, seed=4)
    out = tmp_path / "r.nc"
    patch_sweep(model, pairs, layers=[0], out=out)
    before = out.read_bytes()
    with pytest.raises(UserError) as e:
        patch_sweep(model, pairs, layers=[1], out=out)
    assert str(e.value) == f"{out}: file exists; add --force to overwrite it"
    assert out.read_bytes() == before
    ds = patch_sweep(model, pairs, layers=[1], out=out, force=True)
    with xr.open_dataset(out) as f:
        assert f["layer"].values.tolist() == [1] == ds["layer"].values.tolist()


# --------------------------------------------------------------------------- the step iterator


@pytest.mark.parametrize("prefill_calls", [1, 2])
def test_step_iterator_is_the_one_map_of_calls(prefill_calls):
    sched = CallSchedule(num_latent=4, prefill_calls=prefill_calls)
    steps = sched.step_calls()
    assert [kind for _, kind, _ in steps] == ["question", "latent", "latent", "latent", "latent", "suffix"]
    assert [c for c, _, _ in steps] == list(sched.readout_calls)
    assert sched.latent_of_calls() == {sched.latent_call(k): k for k in range(4)}
    assert all(sched.latent_of_call(c) == k for c, k in sched.latent_of_calls().items())
    fed = sched.thought_fed_by()
    assert fed[sched.question_call] == 0 and [fed[sched.latent_call(k)] for k in range(4)] == [1, 2, 3, 4]
    assert sched.suffix_call not in fed


def test_backend_is_a_value():
    assert Backend("local") == resolve_backend(False)


def _square_plus(model, context, job):
    """A work function (module level, as executors need)."""
    return job * job + context


def test_a_run_makes_one_executor_for_all_its_loops_and_closes_it(tiny_models, monkeypatch):
    """`Run.map` makes the executor on first use and reuses it for later loops (steer's base runs
    and edits share one Ray cluster); leaving the `with` block closes it."""
    import codi_nnsight.run.session as session
    from codi_nnsight.run import LocalExecutor, Run

    made: list = []

    class Counting(LocalExecutor):
        closed = False

        def close(self) -> None:
            self.closed = True

    def make(*args, **kwargs):
        made.append(Counting())
        return made[-1]

    monkeypatch.setattr(session, "use_executor", make)
    got: list[tuple[int, int]] = []
    with Run(tiny_models["gpt2"], False) as run:
        run.map(_square_plus, 10, [1, 2], lambda n, r: got.append((n, r)))
        run.map(_square_plus, 0, [3], lambda n, r: got.append((n, r)))
        assert len(made) == 1 and not made[0].closed
    assert got == [(0, 11), (1, 14), (0, 9)] and made[0].closed
