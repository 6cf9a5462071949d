"""Useful FLOPs of a CODI forward and of a patching sweep, counted from shapes and token counts.

Only matrix products are counted (2 FLOPs per multiply-add); norms, activations, softmax and
embedding look-ups are left out. "Useful" means the work the answer needs, not what a kernel ran:
padding tokens, the last token of a scored candidate and tokens decoded past a row's own limit
count for nothing, while every row the sweep reports (source, baseline, self-patch control and
each variant) counts in full.

Per token that goes through the decoder stack, with `n_keys` the real (unpadded) tokens it
attends to, itself included:

    decoder(n_keys) = sum over blocks of [ 2 * W_block + 4 * A * n_keys ]

where `W_block` is the number of weights of the block's linear layers (q, k, v, o projections and
the MLP: `4 d^2 + 8 d^2` for GPT-2, `2 d A + 2 d A_kv + 3 d I` for Llama/Qwen2; read from the
modules, so any family is right) and `A = heads * head_dim` (QK^T and attention-weights x V, each
`2 A n_keys`; grouped-query attention shares keys, not products). Each logit row costs
`2 d V'` (the LM head, `V'` = vocabulary + CODI's 3 tokens) and each latent step `2 W_prj`.

For one forward (`CODIModule.forward`'s inputs) with question lengths `n` (shared prefix + rest,
real tokens), K latents, S suffix tokens, candidates of `v` valid tokens and `L_r` decoded
tokens per row:

    prefill    = each shared prefix once + each prompt's rest once (causal n_keys)
    latent     = per row: K * 2 W_prj + sum_{k<K} decoder(n + k + 1)
    suffix     = per row: sum_{j<S} decoder(n + K + j + 1) + 2 d V'
    candidates = per row and candidate: (v - 1) * 2 d V' + sum_{i<v-1} decoder(n + K + S + i + 1)
    decode     = per row: (L_r - 1) * 2 d V' + sum_{t<L_r-1} decoder(n + K + S + t + 1)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PARTS = ("prefill", "latent", "suffix", "candidates", "decode")


@dataclass(frozen=True)
class ModelDims:
    """What the FLOP count needs to know about a model."""

    block_weights: tuple[int, ...]  # weights of each decoder block's linear layers
    attn_width: int  # heads * head_dim
    hidden: int
    lm_head_weights: int  # d * V'
    prj_weights: int  # weights of the projection's linear layers

    def decoder(self, n_tokens: int, key_sum: int) -> int:
        """FLOPs of `n_tokens` tokens through the decoder stack, attending to `key_sum` keys in all."""
        return sum(2 * w * n_tokens + 4 * self.attn_width * key_sum for w in self.block_weights)


def _linear_weights(module: nn.Module) -> int:
    """Weights of the 2-D projection matrices in `module` (nn.Linear and GPT-2's Conv1D)."""
    total = 0
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, nn.Embedding):
            total += w.numel()
    return total


def model_dims(codi: Any) -> ModelDims:
    """`ModelDims` of a `CODIModule` (read from its modules and config)."""
    cfg = codi.lm.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelDims(
        block_weights=tuple(_linear_weights(block) for block in codi.layers),
        attn_width=heads * head_dim,
        hidden=cfg.hidden_size,
        lm_head_weights=codi.lm.lm_head.weight.numel(),
        prj_weights=_linear_weights(codi.prj),
    )


def _run_keys(start: int, n: int) -> int:
    """Sum of n_keys over `n` consecutive tokens whose first one sees `start + 1` keys."""
    return n * start + n * (n + 1) // 2


def forward_flops(
    dims: ModelDims,
    inputs: dict[str, Any],
    num_latent: int,
    decode_tokens: Sequence[int] | None = None,
    eot_len: int = 1,
) -> dict[str, int]:
    """Useful FLOPs of one `CODIModule.forward(**inputs)`, per part (`PARTS`) and `total`.

    `decode_tokens` gives each row's greedy tokens (default `max_new_tokens` for every row);
    `eot_len` is the suffix length when `suffix_ids` is not given.
    """
    mask = torch.as_tensor(inputs["attention_mask"]).long()
    n_rest = mask.sum(1).tolist()
    out = dict.fromkeys(PARTS, 0)
    if inputs.get("prefix_ids") is not None:
        n_pre = torch.as_tensor(inputs["prefix_mask"]).long().sum(1).tolist()
        seen = [n_pre[int(i)] for i in torch.as_tensor(inputs["prompt_prefix"]).tolist()]
        out["prefill"] += sum(dims.decoder(n, _run_keys(0, n)) for n in n_pre)
    else:
        seen = [0] * len(n_rest)
    out["prefill"] += sum(dims.decoder(m, _run_keys(s, m)) for m, s in zip(n_rest, seen))
    n_question = [s + m for s, m in zip(seen, n_rest)]
    rows = inputs.get("rows")
    rows = list(range(len(n_question))) if rows is None else torch.as_tensor(rows).tolist()
    suffix = inputs.get("suffix_ids")
    S = eot_len if suffix is None else int(torch.as_tensor(suffix).shape[-1])
    K = num_latent
    head = 2 * dims.lm_head_weights
    cands = inputs.get("candidates")
    valid = (torch.as_tensor(cands) >= 0).sum(-1).tolist() if cands is not None else [[] for _ in rows]
    max_new = int(inputs.get("max_new_tokens", 0) or 0)
    decode = list(decode_tokens) if decode_tokens is not None else [max_new] * len(rows)
    for r, p in enumerate(rows):
        n = n_question[p]
        out["latent"] += K * 2 * dims.prj_weights + dims.decoder(K, _run_keys(n, K))
        out["suffix"] += dims.decoder(S, _run_keys(n + K, S)) + head
        for v in valid[r]:
            fed = max(v - 1, 0)
            out["candidates"] += fed * head + dims.decoder(fed, _run_keys(n + K + S, fed))
        fed = max(min(decode[r], max_new) - 1, 0)
        out["decode"] += fed * head + dims.decoder(fed, _run_keys(n + K + S, fed))
    out["total"] = sum(out[k] for k in PARTS)
    return out


def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Part-wise sum of two FLOP counts."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


def sweep_plans(model: Any, pairs: Sequence[Any], cfg: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """(first pair index, `plan_batch` plan) of each batch `patch_sweep` runs for `cfg`.

    As in the sweep, the batch that holds `full_patch_pair` carries the full-patch check.
    """
    from codi_nnsight.patching import plan_batch
    from codi_nnsight.patching.trace import full_patch_pair

    check = full_patch_pair(model, pairs)
    for start in range(0, len(pairs), batch_size):
        carried = check - start if check is not None and start <= check < start + batch_size else None
        yield start, plan_batch(model, pairs[start : start + batch_size], cfg, full_patch=carried)


def sweep_flops(
    model: Any,
    pairs: Sequence[Any],
    layers: Sequence[int],
    batch_size: int,
    max_new_tokens: int | None,
    positions: str = "all",
) -> dict[str, int]:
    """Useful FLOPs of `patch_sweep(model, pairs, layers=..., positions=...)` with its sanity check.

    Counts the same forwards the sweep runs: one per batch (`sweep_plans`, so the rows, shared
    prefixes and decode limits are the sweep's own), the batch holding the full-patch check's pair
    with its extra prompt and row.
    """
    from codi_nnsight.patching import SweepConfig

    dims = model_dims(model.codi)
    cfg = SweepConfig(layers=list(layers), positions=positions, max_new_tokens=max_new_tokens)
    total: dict[str, int] = {}
    for _, plan in sweep_plans(model, pairs, cfg, batch_size):
        total = add(total, forward_flops(dims, plan.inputs, model.num_latent, plan.decode_limit))
    return total


def gemm_flops_per_s(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an (m, k) @ (k, n) matmul in this process's dtype and threads."""
    import time

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    inner = 1
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = (time.perf_counter() - t) / inner
        if i == 0:  # warm-up; on fast devices repeat the product enough to time it reliably
            inner = max(1, int(0.05 / max(dt, 1e-9)))
            continue
        best = min(best, dt)
    return 2.0 * m * k * n / best
