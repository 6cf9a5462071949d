"""A local run computes the same bits as NDIF's model actor, whose parameters are frozen.

NDIF's actor calls `requires_grad_(False)` on a model after loading it (scripts/ndif_cpu_actor.py
does the same). Whether the parameters require grad changes which kernels torch picks for part of
CODI's latent loop (the base model's own prefill and decode agree either way), so the last bits of
float32 results differ between a model whose parameters require grad and a frozen one. Against
the real server (tests/test_ndif.py) this made lens, attention, probe, early-exit, attribute and
mean-ablation results of the toy model differ from a local run in the last bits, while a local run
with frozen parameters matched the server exactly.
Checked here without a server (early-exit, on the tiny Llama and Qwen2): a model as `load_model`
returns it must compute what a frozen one does.
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loaded_model_computes_the_bits_of_a_frozen_one(tiny_dirs, family):
    import codi_nnsight as cn

    torch.set_num_threads(1)
    model = cn.load_model(tiny_dirs[family], dtype="float32", device="cpu")
    frozen = cn.load_model(tiny_dirs[family], dtype="float32", device="cpu")
    frozen._module.requires_grad_(False)  # what NDIF's actor does after loading
    pairs = cn.demo_pairs()[:4]  # a padded batch through the latent loop
    here, there = cn.early_exit(model, pairs), cn.early_exit(frozen, pairs)
    for name in [*here.coords, *here.data_vars]:
        a, b = here[name].values, there[name].values
        assert a.tobytes() == b.tobytes(), f"{name}: not bit-identical to a frozen model's"
