"""The benchmark's FLOP counter, its three implementations' agreement, and the GPU check's CPU smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import flops  # noqa: E402


def _tiny_module(family: str, **shape: int) -> torch.nn.Module:
    """A random CODIModule of a tiny config (no tokenizer, no checkpoint)."""
    from transformers import AutoModelForCausalLM

    from codi_nnsight.model.module import CODIModule, make_prj, register_attention
    from codi_nnsight.testing.tiny import tiny_hf_config

    cfg = tiny_hf_config(family, vocab=20, **shape)
    big = type(cfg).from_dict(cfg.to_dict())
    big.vocab_size = cfg.vocab_size + 3
    lm = AutoModelForCausalLM.from_config(big, attn_implementation=register_attention())
    prj = make_prj(cfg.hidden_size, 6, True, False)
    return CODIModule(lm, prj, num_latent=2, vocab_size=cfg.vocab_size, eos_token_id=1).eval()


def test_model_dims_by_hand():
    """Linear weights per block: GPT-2 is 12 d^2; Llama is q,o (d*A) + k,v (d*A_kv) + gate,up,down (d*I)."""
    d, heads, kv, inter = 8, 2, 1, 16
    llama = flops.model_dims(_tiny_module("llama", n_layers=2, hidden=d, heads=heads, kv_heads=kv, intermediate=inter))
    head_dim = d // heads
    assert llama.block_weights == (2 * d * d + 2 * d * kv * head_dim + 3 * d * inter,) * 2
    assert llama.attn_width == d
    assert llama.lm_head_weights == d * 23
    assert llama.prj_weights == d * 6 + 6 * d
    gpt2 = flops.model_dims(_tiny_module("gpt2", n_layers=1, hidden=d, heads=heads))
    assert gpt2.block_weights == (12 * d * d,)


def test_forward_flops_by_hand():
    """A forward of 2 prompts (one left-padded, shared prefixes) and 3 rows, counted token by token."""
    d, heads, inter = 8, 2, 16
    dims = flops.model_dims(
        _tiny_module("llama", n_layers=1, hidden=d, heads=heads, kv_heads=heads, intermediate=inter)
    )
    W = 4 * d * d + 3 * d * inter
    V = d * 23
    P = dims.prj_weights

    def tok(n_keys: int) -> int:  # one token through the (one-block) decoder
        return 2 * W + 4 * d * n_keys

    inputs = {
        "prefix_ids": torch.zeros(1, 3, dtype=torch.long),
        "prefix_mask": torch.tensor([[0, 1, 1]]),
        "prompt_prefix": torch.tensor([0, 0]),
        "input_ids": torch.zeros(2, 3, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
        "rows": torch.tensor([0, 1, 1]),
        "suffix_ids": torch.tensor([5, 6]),
        # row 0: candidates of 3 and 1 valid tokens; rows 1-2: 2 and 2.
        "candidates": torch.tensor([[[1, 2, 3], [4, -1, -1]], [[1, 2, -1], [3, 4, -1]], [[1, 2, -1], [3, 4, -1]]]),
        "max_new_tokens": 3,
    }
    got = flops.forward_flops(dims, inputs, num_latent=2, decode_tokens=[3, 1, 2])
    prefill = tok(1) + tok(2)  # the 2-token prefix
    prefill += tok(3) + tok(4) + tok(5)  # prompt 0: 3 tokens after it
    prefill += tok(3) + tok(4)  # prompt 1: 2 tokens after it
    n = [5, 4, 4]  # question length of each row
    latent = sum(2 * (2 * P) + tok(m + 1) + tok(m + 2) for m in n)  # prj twice, 2 latent tokens
    suffix = sum(tok(m + 3) + tok(m + 4) + 2 * V for m in n)
    cands = (2 * (2 * V) + tok(n[0] + 5) + tok(n[0] + 6)) + 2 * (2 * (2 * V + tok(n[1] + 5)))
    decode = (2 * (2 * V) + tok(n[0] + 5) + tok(n[0] + 6)) + 0 + (2 * V + tok(n[2] + 5))
    assert got == {
        "prefill": prefill,
        "latent": latent,
        "suffix": suffix,
        "candidates": cands,
        "decode": decode,
        "total": prefill + latent + suffix + cands + decode,
    }


def test_three_implementations_agree(tmp_path):
    """naive, ours (nnsight) and raw (torch hooks) give the same metrics on the toy shape, 2 pairs."""
    import sweep

    out = tmp_path / "bench.json"
    res = sweep.main(
        ["--shape", "toy", "--pairs", "2", "--repeats", "1", "--threads", "1", "--rss-pairs", "--json", str(out)],
        emit=False,
    )
    assert res["metrics_agree"] and res["sanity_passed"] == 1
    assert set(res["max_abs_diff"]) == {"ours_vs_raw", "ours_vs_naive"}
    assert res["flops"]["total"] == sum(res["flops"][k] for k in flops.PARTS) > 0
    assert res["gemm"]["gflop_per_s"] > 0 and 0 < res["efficiency"]["ours"]
    assert json.loads(out.read_text())["efficiency"] == res["efficiency"]


@pytest.mark.parametrize("positions", ["all", "each"])
def test_sweep_flops_grow_with_rows(positions):
    """`each` only adds variant rows: same prefill, more of everything else."""
    import sweep

    from codi_nnsight.testing.tiny import random_codi

    model = random_codi("toy", tokenizer="bpe")
    pairs = list(sweep.realistic_pairs(2, model))
    layers = list(range(model.n_layers))
    base = flops.sweep_flops(model, pairs, layers, 2, 4)
    got = flops.sweep_flops(model, pairs, layers, 2, 4, positions=positions)
    assert got["prefill"] == base["prefill"]
    # Latent work is per row (questions are all ~100 tokens): batch rows + the full-patch check's one.
    from codi_nnsight.patching.trace import full_patch_pair

    assert full_patch_pair(model, pairs) is not None
    rows = [sweep.rows_per_batch(2, len(layers), model.num_latent, p) + 1 for p in (positions, "all")]
    assert got["latent"] / base["latent"] == pytest.approx(rows[0] / rows[1], rel=0.02)


def test_gpu_check_smoke(capsys):
    """`gpu_check.py --device cpu --shape toy` runs end to end and prints one strict JSON object."""
    import gpu_check

    gpu_check.main(["--device", "cpu", "--shape", "toy", "--pairs", "2", "--agree-pairs", "2", "--threads", "1"])
    res = json.loads(capsys.readouterr().out)
    assert res["benchmark"]["metrics_agree"]
    assert "ours_each_position" in res["benchmark"]["seconds"]
    assert res["agreement"]["agree"] and res["agreement"]["logits_rel_err"] < 0.1
    assert res["ok"]


def _forward_inputs(vocab: int) -> dict:
    """Two prompts behind one shared, left-padded prefix; 5 rows; a 2-token suffix; 2 candidates."""
    g = torch.Generator().manual_seed(0)
    return {
        "prefix_ids": torch.randint(0, vocab, (1, 4), generator=g),
        "prefix_mask": torch.tensor([[0, 1, 1, 1]]),
        "prompt_prefix": torch.tensor([0, 0]),
        "input_ids": torch.randint(0, vocab, (2, 3), generator=g),
        "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
        "rows": torch.tensor([1, 0, 1, 1, 0]),
        "suffix_ids": torch.tensor([3, 4]),
        "candidates": torch.tensor([[[1, 2, 3], [4, -1, -1]]] * 5),
        "max_new_tokens": 5,
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_preallocated_shared_cache_matches_dynamic_cache(family, monkeypatch):
    """The preallocated, prompt-shared cache gives what transformers' DynamicCache gives (float64)."""
    from transformers import DynamicCache

    from codi_nnsight.model.module import CODIModule

    torch.manual_seed(0)
    kw = {"kv_heads": 1} if family == "llama" else {}
    module = _tiny_module(family, n_layers=2, hidden=8, heads=2, **kw).double()
    inputs = _forward_inputs(20)
    fast = module(**inputs)
    monkeypatch.setattr(CODIModule, "new_cache", lambda self, capacity=None: DynamicCache())
    slow = module(**inputs)
    assert fast.keys() == slow.keys()
    for k in fast:
        assert fast[k].shape == slow[k].shape, k
        assert torch.allclose(fast[k].double(), slow[k].double(), rtol=0, atol=1e-12), k


def test_greedy_width_is_that_of_a_per_token_eos_check():
    """Decoding runs on past all-rows-done between host checks, but `generated` stops where it did."""
    torch.manual_seed(0)
    module = _tiny_module("llama", n_layers=1, hidden=8, heads=2).double()
    inputs = {**_forward_inputs(20), "rows": torch.tensor([0, 0, 0]), "candidates": None}
    first = module(**inputs)["generated"]
    assert first.shape == (3, 5)
    eos = int(first[0, 1])  # every row (same prompt) emits eos at the same token
    stop = first[0].tolist().index(eos)
    module.eos_token_id = eos
    got = module(**inputs)["generated"]
    assert stop < 4 and torch.equal(got, first[:, : stop + 1])
