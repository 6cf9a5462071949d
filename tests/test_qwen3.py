"""Qwen3 as one family row (q/k norms inside attention): CODI-Qwen3-style checkpoints load and run exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ReferenceCODI

from codi_nnsight.data.synthetic import make_synthetic_pairs
from codi_nnsight.model.wrapper import load_model
from codi_nnsight.patching.sweep import patch_sweep
from codi_nnsight.testing.tiny import write_tiny_codi

TOL = 1e-9


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = write_tiny_codi(
        tmp_path_factory.mktemp("tiny-qwen3"), family="qwen3", n_layers=2, kv_heads=2, num_latent=3, seed=1
    )
    return load_model(path, dtype="float64", device="cpu"), ReferenceCODI(path)


def test_qwen3_has_its_query_and_key_norms(qwen3):
    model, _ = qwen3
    assert model.family.name == "qwen3" and type(model.codi.lm).__name__ == "Qwen3ForCausalLM"
    names = dict(model.codi.layers[0].self_attn.named_children())
    assert {"q_norm", "k_norm"} <= set(names)
    # The query norm is on the path the package runs (its own attention kernel comes after it).
    inputs = model.prepare(["What is 12 + 30?"])
    before = model.codi(**inputs)["logits"]
    weight = names["q_norm"].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(3.0)
    try:
        assert (model.codi(**inputs)["logits"] - before).abs().max() > 1e-6
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_qwen3_loop_equals_the_independent_reference(qwen3):
    model, ref = qwen3
    for q in ("Tom has 3 cats and 2 dogs.", "What is 12 + 30?"):
        out = model.codi(**model.prepare([q], max_new_tokens=4))
        expected = ref.run(q, max_new_tokens=4)
        assert (out["latents"][0] - expected["latents"]).abs().max() < TOL
        assert (out["logits"][0] - expected["logits"]).abs().max() < TOL


def test_qwen3_sweep_batch_one_equals_batch_four(qwen3):
    model, _ = qwen3
    pairs = make_synthetic_pairs(4, seed=2)
    one = patch_sweep(model, pairs, positions="each", batch_size=1)
    four = patch_sweep(model, pairs, positions="each", batch_size=4)
    for name in ("kl", "logprob_diff", "flipped"):
        np.testing.assert_allclose(one[name].values, four[name].values, rtol=0, atol=1e-12, equal_nan=True)
    assert np.abs(one["kl"].values).max() > 1e-8
