"""Attribution with frozen parameters, as an NDIF server runs it, and what its results file records.

A real NDIF model actor calls `requires_grad_(False)` on every parameter after loading, so no
activation is part of an autograd graph unless the request makes it so. AtP must take its
gradients with respect to the activations themselves (they are the leaves) and give the numbers
of an unfrozen model.

Not bit for bit: torch picks the matmul kernel of a `Linear` on a non-contiguous 3-d input by
whether the weight requires grad (it folds the batch when a backward may need it), even under
inference mode, so `prj` on the last position of a batch of several rows rounds differently by
~1 ulp when the weights are frozen (measured: up to 4e-15 on float64 values of order 1). A frozen
local run and a frozen server run the same kernels: those agree bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from fake_ndif import FakeNDIF

from codi_nnsight.data.pairs import Pair, PairSet, Question
from codi_nnsight.model.wrapper import CODIModel, load_model
from codi_nnsight.patching.attribution import attribution_patching, attribution_sweeps

PAIRS = PairSet.from_pairs(
    [
        Pair(
            0,
            Question("A bag has 12 nuts; 5 are eaten. How many remain?", 7, {}),
            Question("A bag has 12 nuts; 6 are eaten. How many remain?", 6, {}),
        ),
        Pair(1, Question("What is 9 times 3?", 27, {}), Question("What is 9 times 4?", 36, {})),
    ]
)
COMPONENTS = ("resid", "attn", "mlp", "latent", "head")


@contextlib.contextmanager
def frozen(model: CODIModel, flag: bool = False) -> Iterator[None]:
    """Every parameter frozen inside the block, as NDIF's actor leaves them (the session's models are
    shared, so the flags are put back); `flag=True`: every parameter requiring grad instead."""
    params = list(model._module.parameters())
    flags = [p.requires_grad for p in params]
    model._module.requires_grad_(flag)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def assert_same(a, b, atol: float = 0.0) -> None:
    """Every data variable within `atol` (0: bit-identical; NaN where NaN), coordinates identical."""
    assert sorted(a.data_vars) == sorted(b.data_vars)
    for name in a.data_vars:
        if atol == 0.0:
            assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name
        else:
            assert np.allclose(a[name].values, b[name].values, rtol=0, atol=atol, equal_nan=True), name
    for name in a.coords:
        assert np.array_equal(a[name].values, b[name].values), name


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_a_frozen_model_gives_the_numbers_of_an_unfrozen_one(tiny_models, family):
    model = tiny_models[family]
    assert not any(p.requires_grad for p in model._module.parameters())  # models load frozen, as NDIF's
    # All sites at once, and each alone: alone, the first site read has nothing upstream that
    # requires grad, so every site must be a leaf of its own.
    groups = [COMPONENTS] + [(c,) for c in COMPONENTS]
    with frozen(model, flag=True):
        unfrozen = [attribution_sweeps(model, PAIRS, g, method="atp*", batch_size=2) for g in groups]
    with frozen(model):
        frozen_runs = [attribution_sweeps(model, PAIRS, g, method="atp*", batch_size=2) for g in groups]
    assert not any(p.requires_grad for p in model._module.parameters())  # put back
    assert not model.codi.keep_grad
    for group, want, got in zip(groups, unfrozen, frozen_runs):
        for c in group:
            assert np.abs(want[c]["atp_logprob_diff"].values).max() > 1e-6, (group, c)  # sites that matter
            assert_same(want[c], got[c], atol=1e-12)  # float64; the kernel choice moves ~1 ulp (docstring)
    # One pair per batch: no non-contiguous batch for the kernel choice to see, so bit for bit.
    with frozen(model, flag=True):
        one = attribution_sweeps(model, PAIRS, COMPONENTS, method="atp*", batch_size=1)
    with frozen(model):
        one_frozen = attribution_sweeps(model, PAIRS, COMPONENTS, method="atp*", batch_size=1)
    for c in COMPONENTS:
        assert_same(one[c], one_frozen[c])


def test_a_frozen_model_through_a_server_equals_local_and_records_the_server(tiny_models):
    model = tiny_models["llama"]
    with frozen(model):  # the server's state: then the same kernels run, and the numbers are the same bits
        local = attribution_patching(model, PAIRS, component=["resid", "latent"], method="atp*", batch_size=2)
    flags = [p.requires_grad for p in model._module.parameters()]
    with FakeNDIF(model=model) as server:  # frozen while it runs each request
        remote = attribution_patching(
            model, PAIRS, component=["resid", "latent"], method="atp*", batch_size=2, remote=server.url
        )
    assert not server.errors and len(server.requests) >= 3
    assert [p.requires_grad for p in model._module.parameters()] == flags
    assert_same(local, remote)
    assert local.attrs["computed_on"] == "local" and local.attrs["remote"] == ""
    assert remote.attrs["computed_on"] == "server" and remote.attrs["remote"] == server.url
    assert remote.attrs["dtype"] == "float64" and remote.attrs["checkpoint_sha256_source"] == "server"
    assert remote.attrs["checkpoint_sha256"] == model.checkpoint_sha256 != ""


def test_a_bfloat16_server_records_its_dtype_and_equals_a_local_bfloat16_run(tiny_dirs):
    # The client asks for float32 and holds no weights; the server deployed the checkpoint in bfloat16.
    client = load_model(tiny_dirs["gpt2"], dtype="float32", remote_only=True)
    with FakeNDIF(checkpoint=tiny_dirs["gpt2"], dtype="bfloat16") as server:
        assert not any(p.requires_grad for p in server.model._module.parameters())
        remote = attribution_patching(client, PAIRS, component="resid", batch_size=2, remote=server.url)
    assert not server.errors
    here = load_model(tiny_dirs["gpt2"], dtype="bfloat16", device="cpu")
    with frozen(here):
        local = attribution_patching(here, PAIRS, component="resid", batch_size=2)
    assert_same(local, remote)
    attrs = remote.attrs
    assert attrs["computed_on"] == "server" and attrs["dtype"] == "bfloat16" and attrs["dtype_source"] == "server"
    assert attrs["client_dtype"] == "float32" and attrs["device"] == "cpu"
    assert attrs["checkpoint_sha256"] == here.checkpoint_sha256 and attrs["checkpoint_sha256_source"] == "server"
    assert np.isfinite(remote["atp_logprob_diff"].values).all()
