"""Tuned lens: identity = logit lens, translators applied as A h + b, training helps, save/load, CLI."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from codi_nnsight.data.synthetic import make_toy_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.model.families import resolve
from codi_nnsight.readouts.lens import logit_lens
from codi_nnsight.readouts.probe import collect_states
from codi_nnsight.readouts.tuned import (
    META_FILE,
    TunedLens,
    load_tuned_lens,
    model_identity,
    save_tuned_lens,
    train_tuned_lens,
)

TOL = 1e-9
# Two computations of the same float64 lens that run different GEMM kernels (another trace, or the
# same values at another address: MKL takes another path for data that is only 8-byte aligned) agree
# to a few ulps of the probabilities (<= 1): measured <= 4.2e-17, so 1e-12 leaves 10^4 of headroom.
KERNEL_TOL = 1e-12


@pytest.fixture(scope="module")
def few():
    return make_toy_pairs(3, seed=0)


@pytest.fixture(scope="module")
def toy():
    from codi_nnsight.model import load_model

    return load_model()


def _same(a: xr.Dataset, b: xr.Dataset, tol: float) -> None:
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        if x.dtype.kind in "fi":
            assert np.allclose(x, y, atol=tol, rtol=0, equal_nan=True), name
        else:
            assert np.array_equal(x, y), name


def _random_lens(model, seed: int = 0) -> TunedLens:
    lens = TunedLens.identity(model)
    g = torch.Generator().manual_seed(seed)
    n, d = lens.n_layers, lens.hidden_size
    lens.weight += 0.3 * torch.randn(n, d, d, generator=g, dtype=torch.float64) / d**0.5
    lens.bias += 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return lens


# -- the lens with translators ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_identity_translators_are_the_logit_lens(family, tiny_models, few):
    model = tiny_models[family]
    plain = logit_lens(model, few, top_k=4, batch_size=4)
    tuned = logit_lens(model, few, top_k=4, batch_size=4, tuned=TunedLens.identity(model))
    _same(plain, tuned, TOL)
    assert plain.attrs["lens"] == "logit" and tuned.attrs["lens"] == "tuned"
    assert tuned.attrs["tuned_lens_sha256"] == TunedLens.identity(model).sha256


def test_translated_lens_equals_a_plain_computation(tiny_models, few):
    """With random translators the lens is softmax(head(norm(A_L h + b_L))) of the block outputs."""
    model = tiny_models["llama"]
    lens = _random_lens(model)
    ds = logit_lens(model, few, top_k=4, batch_size=4, tuned=lens)
    states, infos = collect_states(model, few, batch_size=4)  # (questions, steps, layers, d)
    norm = resolve(model.family.decoder(model.codi.lm), model.family.final_norm)
    head = model.codi.lm.lm_head
    with torch.no_grad():
        h = torch.as_tensor(states)
        x = torch.einsum("qslj,lij->qsli", h, lens.weight) + lens.bias
        probs = torch.softmax(head(norm(x)), -1).numpy()
        plain = torch.softmax(head(norm(h)), -1).numpy()
    for j, info in enumerate(infos):
        cell = ds.isel(pair=info.pair_index, variant=info.variant)
        assert np.abs(cell["answer_prob"].values - probs[j, ..., info.answer_token]).max() <= TOL
        assert np.abs(cell["answer_prob"].values - plain[j, ..., info.answer_token]).max() > 1e-6  # it does change
    untouched = logit_lens(model, few, top_k=4, batch_size=4)
    # prj(h) decoded as before: translators never touch the prj readout, so the same kernels run on the
    # same data in both traces and the ids are equal bit for bit.
    assert np.array_equal(ds["prj_top_ids"].values, untouched["prj_top_ids"].values)


def test_remote_local_equals_local(tiny_models, few):
    model = tiny_models["gpt2"]
    lens = _random_lens(model, seed=1)
    # remote="local" runs another trace, on translators that were serialized and rebuilt elsewhere in
    # memory: agreement to rounding, not bit for bit.
    remote = logit_lens(model, few, top_k=4, tuned=lens, remote="local")
    _same(remote, logit_lens(model, few, top_k=4, tuned=lens), KERNEL_TOL)
    pairs = make_toy_pairs(6, seed=2)
    a = train_tuned_lens(model, pairs, steps=20, seed=0, batch_size=4)
    b = train_tuned_lens(model, pairs, steps=20, seed=0, batch_size=4, remote="local")
    # The states come from two traces. Moving every state by one ulp moves these translators by
    # <= 6e-16 and the held-out KLs by <= 3e-15 relative (measured): 1e-12 / 1e-9 leave >= 10^3 headroom.
    assert torch.allclose(a.weight, b.weight, rtol=0, atol=1e-12) and torch.allclose(a.bias, b.bias, rtol=0, atol=1e-12)
    for name in ("tuned", "logit"):
        assert a.meta["heldout_kl"][name] == pytest.approx(b.meta["heldout_kl"][name], rel=1e-9, abs=1e-15)


# -- training ------------------------------------------------------------------------------------------
def test_training_beats_the_logit_lens_on_the_toy_model(toy):
    pairs = make_toy_pairs(150, seed=5)
    lens = train_tuned_lens(toy, pairs, steps=300, seed=0, batch_size=64)
    held, train = lens.meta["heldout_kl"], lens.meta["train_kl"]
    print(f"\nheld-out KL per layer (nats): logit {held['logit']}, tuned {held['tuned']}; train: {train['tuned']}")
    last = toy.n_layers - 1
    for L in range(last):  # measured ratios tuned / logit: 0.30, 0.37, 0.53, 0.50, 0.43, 0.38, 0.21
        assert held["tuned"][L] < 0.8 * held["logit"][L]
        assert train["tuned"][L] < train["logit"][L]
    # The last layer is the model's own distribution. Its translator is exactly the identity and
    # h @ I + 0 == h exactly on any kernel, so both KLs then run the same kernels on the same data
    # (equal bits); the target reads the final states through another memory layout: "0" to rounding.
    assert held["tuned"][last] == held["logit"][last] and abs(held["logit"][last]) <= 1e-12
    assert torch.equal(lens.weight[last], torch.eye(lens.hidden_size)) and not lens.bias[last].any()
    assert lens.meta["n_heldout_questions"] == 60 and lens.meta["n_train_questions"] == 240
    by_step = lens.meta["heldout_kl_by_step"]
    assert by_step["steps"][0] == "bot" and len(by_step["tuned"]) == toy.num_latent + 2


def test_training_is_seeded(tiny_models):
    model = tiny_models["qwen2"]
    pairs = make_toy_pairs(8, seed=3)
    a = train_tuned_lens(model, pairs, steps=30, seed=4, train_batch=16)
    b = train_tuned_lens(model, pairs, steps=30, seed=4, train_batch=16)
    c = train_tuned_lens(model, pairs, steps=30, seed=5, train_batch=16)
    # a and b: the same calls on the same data in one process and thread count, so the same kernels: equal bits.
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.meta == b.meta
    assert a.sha256 == b.sha256 != c.sha256
    assert a.weight.dtype == torch.float64  # a float64 model trains in float64
    with pytest.raises(UserError, match="at least 2"):
        train_tuned_lens(model, pairs.limit(1), steps=1)


# -- saving and loading ----------------------------------------------------------------------------------
def test_save_load_round_trip_and_refusals(tiny_models, few, tmp_path):
    gpt2, llama = tiny_models["gpt2"], tiny_models["llama"]
    lens = train_tuned_lens(gpt2, make_toy_pairs(6, seed=1), steps=10, seed=0)
    path = save_tuned_lens(lens, tmp_path / "tl")
    back = load_tuned_lens(path, gpt2)
    # Written and read back: the translators are the same bits.
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert back.weight.dtype == lens.weight.dtype and back.sha256 == lens.sha256
    assert {k: v for k, v in back.meta.items() if k in lens.meta} == lens.meta
    # The lens computed from them agrees to rounding only: safetensors hands back tensors at an 8-byte
    # aligned address (the file's header length), and MKL's float64 GEMM takes another path there.
    _same(logit_lens(gpt2, few, tuned=back), logit_lens(gpt2, few, tuned=lens), KERNEL_TOL)
    meta = json.loads((path / META_FILE).read_text())
    assert meta["layers"] == 2 and meta["hidden_size"] == model_identity(gpt2)["hidden_size"]
    assert meta["model"]["checkpoint_sha256"] == gpt2.checkpoint_sha256 and meta["seed"] == 0

    # Another checkpoint of the same architecture: refused with exactly this line.
    meta["model"]["checkpoint_sha256"] = "0" * 64
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError) as err:
        load_tuned_lens(path, gpt2)
    sha = gpt2.checkpoint_sha256[:12]
    assert str(err.value) == (
        f"{path}: tuned lens trained on {gpt2.name}, not on this {gpt2.name} "
        f"(checkpoint_sha256 000000000000 != {sha}); train one for it with `codi-nnsight tuned-lens train`"
    )
    # Another family: refused in one line by logit_lens too.
    with pytest.raises(UserError) as err:
        logit_lens(llama, few, tuned=lens)
    assert "family gpt2 != llama" in str(err.value) and "\n" not in str(err.value)
    hand = TunedLens(torch.eye(3, dtype=torch.float64).repeat(2, 1, 1), torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(UserError, match=r"translators 2x3 != 2x\d+"):
        logit_lens(gpt2, few, tuned=hand)
    with pytest.raises(UserError, match="not a tuned lens"):
        load_tuned_lens(tmp_path / "missing", gpt2)


# -- commands -----------------------------------------------------------------------------------------------
def _cli() -> click.Group:
    from codi_nnsight.cli import _Group
    from codi_nnsight.readouts.commands import READOUT_COMMANDS

    group = _Group("codi-nnsight")
    for cmd in READOUT_COMMANDS:
        group.add_command(cmd)
    return group


def test_commands(tiny_dirs, tmp_path):
    runner = CliRunner()
    model = ["--model", tiny_dirs["gpt2"], "--dtype", "float64", "--device", "cpu"]
    out = tmp_path / "tl"
    train = ["tuned-lens", "train", *model, "--synthetic", "6", "--steps", "5", "--out", str(out)]
    res = runner.invoke(_cli(), train)
    assert res.exit_code == 0, res.output
    assert "held-out KL" in res.output and "tuned lens KL" in res.output
    res = runner.invoke(_cli(), train)
    assert res.exit_code == 2 and "exists" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(_cli(), [*train[:-2], "--pairs", "x.json", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not both" in res.output
    nc = tmp_path / "lens.nc"
    res = runner.invoke(_cli(), ["lens", *model, "--limit", "2", "--tuned", str(out), "--out", str(nc)])
    assert res.exit_code == 0, res.output
    ds = xr.load_dataset(nc)
    assert ds.attrs["lens"] == "tuned" and ds.attrs["tuned_lens_source"] == str(out)
    other = ["--model", tiny_dirs["llama"], "--dtype", "float64", "--device", "cpu"]
    res = runner.invoke(_cli(), ["lens", *other, "--tuned", str(out), "--out", str(tmp_path / "x.nc")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert res.output.startswith(f"error: {out}: tuned lens trained on")
