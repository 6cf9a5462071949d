"""Interventions on thoughts: their defining invariants, batch independence, remote runs, the chain, the CLI."""

from __future__ import annotations

import click
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from fake_ndif import FakeNDIF

from codi_nnsight.analysis.interventions import graph_edges, intervention_summary, transplant_table
from codi_nnsight.contract import RESULT_KINDS
from codi_nnsight.data.pairs import Pair, PairSet, Question
from codi_nnsight.data.synthetic import make_toy_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.interventions.chain import carried_answer
from codi_nnsight.interventions.commands import register
from codi_nnsight.interventions.graph import thought_graph
from codi_nnsight.interventions.steer import steer
from codi_nnsight.interventions.transplant import transplant
from codi_nnsight.model.wrapper import load_model
from codi_nnsight.patching.ablation import early_exit, norm_scaled_sigma

TOL = 1e-9


def pairs4():
    return make_toy_pairs(4, seed=2)


# --------------------------------------------------------------------------- invariants


def test_a_self_transplant_changes_nothing(tiny_models):
    model = tiny_models["llama"]
    for layers in (None, [1]):
        ds = transplant(model, pairs4(), layers=layers, donors=("self",))
        # The donor state is the question's own, from another trace: equal up to float64 rounding.
        assert np.abs(ds["kl"].values).max() < 1e-12
        assert (ds["answer_changed"].values == 0).all()
        base = ds["recipient_base_answer"].broadcast_like(ds["answer"])
        assert ((ds["answer"] == base) | (ds["answer"].isnull() & base.isnull())).all()


def test_steering_with_zero_scale_changes_nothing_exactly(tiny_models):
    model = tiny_models["gpt2"]
    ds = steer(model, pairs4(), intermediate=0, thought=1, scales=[0.0, 0.5])
    # h + 0·‖h‖·v is h bit for bit, and the edited row runs beside its base row in the same trace; two
    # rows of one batch need not take bit-identical kernel paths, so KL is 0 up to float64 rounding.
    assert np.abs(ds["kl"].sel(scale=0.0).values).max() < 1e-15
    assert (ds["answer_changed"].sel(scale=0.0).values == 0).all()
    assert np.nanmax(ds["kl"].sel(scale=0.5).values) > 1e-6  # a real step does something


def test_projecting_out_a_direction_orthogonal_to_the_thought_changes_nothing(tiny_models):
    model = tiny_models["llama"]
    pairs = pairs4()[:1]
    k = 1
    from codi_nnsight.interventions.common import base_runs, site_state
    from codi_nnsight.run import Run

    index, got = base_runs(model, Run(model, False), [pairs[0].clean])
    h = site_state(got, index[pairs[0].clean.question], k, None)
    v = np.random.default_rng(0).standard_normal(h.shape[0])
    v -= (v @ h) / (h @ h) * h  # orthogonal to this thought
    ds = steer(
        model,
        pairs,
        intermediate=0,
        thought=k,
        directions={"orth": v, "along": h},
        scales=[1.0],
        project=True,
        fit_pairs=pairs4(),  # the value probe (for the predicted answer) needs two distinct values
    )
    assert float(np.abs(ds["kl"].sel(direction="orth")).max()) < 1e-12
    assert float(ds["answer_changed"].sel(direction="orth").max()) == 0
    assert float(ds["kl"].sel(direction="along").max()) > 1e-6  # removing the thought itself does something


def test_the_graphs_diagonal_and_below_are_empty(tiny_models):
    model = tiny_models["gpt2"]
    ds = thought_graph(model, pairs4())
    K = model.num_latent
    for name in ("state_l2", "state_cos", "lens_kl", "lens_top_changed"):
        v = ds[name].values
        for i in range(K):
            assert np.isnan(v[:, :, i, : i + 1]).all(), name
            assert np.isfinite(v[:, :, i, i + 1 :]).all(), name
    assert ds.attrs["noise_scale"] == 1.0 and "sqrt(d)" in ds.attrs["noise_sigma_rule"]
    d = model.codi.lm.config.hidden_size
    assert np.allclose(ds["noise_sigma"].values, ds["mean_state_norm"].values / np.sqrt(d))
    # The analysis: the mean graph keeps the empty triangle; the floor is the resample intervention's.
    edges = graph_edges(ds, "zero")
    assert np.isnan(edges["mean"].values[np.tril_indices(K)]).all()
    floor = ds["lens_kl"].sel(intervention="resample")
    expected = floor.mean("pair") + 2 * floor.std("pair") / np.sqrt(ds.sizes["pair"])
    assert np.allclose(edges["floor"].values, expected.values, equal_nan=True)
    assert intervention_summary(ds).startswith("thought graph; ") and "resample floor" in intervention_summary(ds)


def test_norm_scaled_sigma_has_the_expected_norm():
    d = 4096
    sigma = norm_scaled_sigma(10.0, d, 2.0)
    assert sigma == pytest.approx(20.0 / 64.0)
    z = np.random.default_rng(0).standard_normal((200, d)) * sigma
    assert np.linalg.norm(z, axis=1).mean() == pytest.approx(20.0, rel=0.01)


# --------------------------------------------------------------------------- batch 1 = batch 4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batch_1_equals_batch_4(tiny_models, family):
    model = tiny_models[family]
    pairs = pairs4()
    runs = {
        "transplant": lambda bs: transplant(model, pairs, layers=[0], batch_size=bs),
        "steer": lambda bs: steer(model, pairs, intermediate=0, thought=1, scales=[-0.5, 0.5], batch_size=bs),
        "graph": lambda bs: thought_graph(model, pairs, batch_size=bs),
    }
    for f in runs.values():
        a, b = f(1), f(4)
        xr.testing.assert_allclose(a.drop_attrs(), b.drop_attrs(), rtol=0, atol=TOL)


# --------------------------------------------------------------------------- remote


def test_every_command_runs_remote_against_the_fake_host(tiny_dirs, tiny_models):
    pairs = pairs4()[:2]
    client = load_model(tiny_dirs["gpt2"], dtype="float64", remote_only=True)
    local = tiny_models["gpt2"]
    calls = {
        "transplant": lambda m, r: transplant(m, pairs, thoughts=[0, 2], remote=r),
        "steer": lambda m, r: steer(m, pairs, intermediate=0, thought=1, scales=[0.5], n_random=1, remote=r),
        "graph": lambda m, r: thought_graph(m, pairs, interventions=("zero", "noise"), remote=r),
    }
    with FakeNDIF(model=local) as server:
        remote = {n: f(client, server.url) for n, f in calls.items()}
    assert not server.errors
    for name, f in calls.items():
        here = f(local, False)
        xr.testing.assert_allclose(here.drop_attrs(), remote[name].drop_attrs(), rtol=0, atol=TOL)
        attrs = remote[name].attrs
        assert attrs["computed_on"] == "server" and attrs["remote"] == server.url, name
        assert attrs["checkpoint_sha256"] and attrs["checkpoint_sha256_source"] == "server", name
    assert not client.dispatched  # no weights read here


# --------------------------------------------------------------------------- the chain


def _q(question: str, answer: float, steps: list[str]) -> Question:
    return Question(question, answer, {"steps": steps})


def test_carried_answer_follows_the_chain():
    q = _q("x", 9, ["10-9=1", "1+5=6", "6+7=13", "13-4=9"])
    assert carried_answer(q, 0, 2) == 10  # 2+5=7, 7+7=14, 14-4=10
    assert carried_answer(q, 2, 13) == 9  # its own value: its own answer
    assert carried_answer(q, 3, 5) == 5  # the last step is the answer
    # The second operand equal to the old result stays (only the chain's first operand carries).
    q2 = _q("x", 10, ["3+2=5", "5+5=10"])
    assert carried_answer(q2, 0, 6) == 11
    # GSM8K-style annotations refer to earlier results by value.
    q3 = _q("x", 30, ["<<4*3=12>>", "<<12/2=6>>", "<<6*5=30>>"])
    assert carried_answer(q3, 0, 20) == 50
    assert np.isnan(carried_answer(Question("x", 3, {"intermediates": [1, 2]}), 0, 5))  # no expressions
    assert np.isnan(carried_answer(_q("x", 99, ["1+1=2"]), 0, 5))  # the chain does not end at the answer


def test_transplant_from_the_twin_records_the_carried_answer(tiny_models):
    model = tiny_models["gpt2"]
    pairs = pairs4()
    ds = transplant(model, pairs, thoughts=[0], donors=("twin",))
    for p in pairs:
        last = len(p.clean.meta["steps"]) - 1
        # Carrying the donor's last value through nothing gives the donor's answer.
        assert ds["carried_answer"].sel(pair=p.pair_id, donor="twin", intermediate=last) == p.corrupted.answer
        assert ds["intermediate_equal"].sel(pair=p.pair_id, donor="twin", intermediate=last) == 0
    table = transplant_table(ds)
    assert float(table["follows_donor"].sel(donor="twin", thought=0)) == float(
        ds["follows_donor"].sel(donor="twin", thought=0).mean()
    )


# --------------------------------------------------------------------------- errors


def test_bad_arguments_are_one_line_errors(tiny_models):
    model = tiny_models["gpt2"]
    pairs = pairs4()
    K = model.num_latent
    with pytest.raises(UserError, match=rf"^--thoughts: thought {K} out of range 0..{K - 1}$"):
        transplant(model, pairs, thoughts=[K])
    with pytest.raises(UserError, match=r"^--donors other: expected some of twin, next, self$"):
        transplant(model, pairs, donors=["other"])
    with pytest.raises(UserError, match=r"^the 'next' donor needs at least 2 pairs"):
        transplant(model, pairs[:1])
    with pytest.raises(UserError, match=r"^--layers: layer 9 out of range \(model has 2 layers, 0-1\)$"):
        steer(model, pairs, layer=9)
    with pytest.raises(UserError, match=r"^--directions up: expected some of probe, mean-diff, random$"):
        steer(model, pairs, directions=["up"])
    with pytest.raises(UserError, match=r"^--interventions drop: expected some of zero, mean, resample, noise$"):
        thought_graph(model, pairs, interventions=["drop"])
    with pytest.raises(UserError, match=r"^--intermediate 7: no question of the fitting pairs has a gold value"):
        steer(model, pairs, intermediate=7)


# --------------------------------------------------------------------------- number of thoughts


def test_early_exit_past_the_trained_k(tiny_models):
    model = tiny_models["llama"]
    pairs = pairs4()[:2]
    K = model.num_latent
    ds = early_exit(model, pairs, past_trained=2)
    assert list(ds["n_latent"].values) == list(range(K + 3)) and ds.attrs["trained_num_latent"] == K
    plain = early_exit(model, pairs)
    assert np.allclose(ds["logp_answer"].sel(n_latent=K), plain["logp_answer"].sel(n_latent=K), atol=TOL, rtol=0)
    assert not np.allclose(ds["logp_answer"].sel(n_latent=K + 2), ds["logp_answer"].sel(n_latent=K))
    with pytest.raises(UserError, match=rf"^--steps: {K + 3} out of range 0..{K + 2}$"):
        early_exit(model, pairs, steps=[K + 3], past_trained=2)
    with pytest.raises(UserError, match=r"^--past-trained -1: expected an int >= 0$"):
        early_exit(model, pairs, past_trained=-1)


# --------------------------------------------------------------------------- Coconut


def test_the_interventions_run_on_coconut(tmp_path):
    from codi_nnsight.testing.tiny_coconut import write_tiny_coconut

    path = write_tiny_coconut(tmp_path / "c", family="llama", n_layers=2, kv_heads=2, num_latent=3, seed=3)
    model = load_model(path, dtype="float64", device="cpu")
    pairs = pairs4()[:3]
    same = transplant(model, pairs, donors=("self",))
    assert same.attrs["latent_method"] == "coconut" and np.abs(same["kl"].values).max() < 1e-12
    other = transplant(model, pairs, donors=("next",))
    assert np.nanmax(other["kl"].values) > 1e-6
    g = thought_graph(model, pairs, interventions=("zero",))
    assert np.isnan(g["lens_kl"].values[:, :, 1, :2]).all() and np.isfinite(g["lens_kl"].values[:, :, 0, 1:]).all()
    s = steer(model, pairs, intermediate=0, thought=2, scales=[0.0], n_random=1)
    assert (s["kl"].values == 0).all()


# --------------------------------------------------------------------------- the CLI


def test_the_commands_write_their_files(tiny_dirs, tmp_path):
    group = click.Group("main")
    register(group)
    pairs = str(make_toy_pairs(3, seed=2).save(tmp_path / "p.json"))
    base = ["--model", tiny_dirs["gpt2"], "--dtype", "float64", "--pairs", pairs]
    runs = {
        "transplant": ["transplant", "--thoughts", "0,1"],
        "steer": ["steer", "--thought", "1", "--scales", "0,0.5", "--n-random", "1"],
        "thought-graph": ["thought-graph", "--interventions", "zero,resample"],
    }
    for kind, args in runs.items():
        out = tmp_path / f"{kind}.nc"
        r = CliRunner().invoke(group, [*args, *base, "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert r.output.startswith(f"wrote {out}: ")
        with xr.open_dataset(out) as ds:
            assert ds.attrs["result_kind"] == kind
            assert ds.attrs["result_dims"] == ",".join(RESULT_KINDS[kind].dims)
            assert all(d in ds.dims for d in RESULT_KINDS[kind].dims)
    r = CliRunner().invoke(group, ["steer", *base, "--scales", "a,b", "--out", str(tmp_path / "x.nc")])
    # (`codi_nnsight.cli`'s main group prints a UserError as "error: ..."; a plain group raises it.)
    assert isinstance(r.exception, UserError) and str(r.exception) == "--scales 'a,b': expected numbers like -1,0,0.5"
    assert not (tmp_path / "x.nc").exists()


def test_pairs_without_chains_give_nan_carried_answers(tiny_models):
    model = tiny_models["gpt2"]
    pairs = PairSet.from_pairs(
        [
            Pair(0, Question("Sam has 4 cats and 3 dogs. How many pets?", 7, {}), Question("Sam has 5 cats.", 5, {})),
            Pair(1, Question("A bag has 12 nuts.", 12, {}), Question("A bag has 13 nuts.", 13, {})),
        ]
    )
    ds = transplant(model, pairs, thoughts=[0])
    assert ds.sizes["intermediate"] == 0 and np.isfinite(ds["kl"].values).all()


def test_steering_pairs_without_chains_is_one_line(tiny_models):
    """No gold intermediate anywhere (pairs without `steps`): the one-line refusal, not an IndexError."""
    q = [Question(f"Sam has {a} cats and 4 dogs. How many pets?", a + 4, {}) for a in (3, 5)]
    pairs = PairSet.from_pairs([Pair(0, q[0], q[1])])
    with pytest.raises(UserError) as e:
        steer(tiny_models["gpt2"], pairs, scales=(0.5,), n_random=1)
    assert str(e.value) == "--intermediate 0: no question of the fitting pairs has a gold value at this step"
