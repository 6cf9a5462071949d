"""Attention readout: where each position of the CODI loop looks, per layer and head.

For every question, step (`bot`, latent token 0 … K-1, `answer`), layer and head, the attention
weights of that step's query position over every key position are read exactly as the model
computed them: the package's eager attention (`model.module.codi_attention`) returns
`(output, weights)` and the attention module passes the weights on as the second element of its
output tuple, with grouped key/value heads already repeated (Llama, Qwen2), so the weights are
per query head. The softmax runs in the activations' dtype (float32 for half types).

The weights are summed over regions of the key sequence — the tokenizer's specials (BOS), the
question text, the `[bot]` marker, earlier latent tokens, the query position itself and (answer
step) the suffix tokens before it — and kept per question text token, so the top question tokens
of each latent can be ranked per layer and head or averaged over both, as the CODI paper did.
One nnsight trace per batch, torch only inside it (runs remotely).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from ..errors import UserError
from ..run import Executor, Run
from .common import (
    QuestionInfo,
    ReadoutBatch,
    base_coords,
    batches,
    padded,
    provenance,
    question_infos,
    to_pair_variant,
)

SCHEMA = "codi-nnsight/attention/1"
#: Key regions, in the order of the `region` coordinate.
REGIONS = ("special", "question", "bot", "latents", "self", "suffix")
REGION_DOCS = {
    "special": "tokens the tokenizer adds before the question (BOS)",
    "question": "the question text tokens",
    "bot": "the [bot] marker (and the eos before it when remove_eos is false), except the query itself",
    "latents": "earlier latent tokens (all K latents for the answer step)",
    "self": "the query position itself",
    "suffix": "[eot] and answer-prompt tokens before the answer position (answer step only)",
}

__all__ = ["REGIONS", "SCHEMA", "attention_batch", "attention_readout", "region_masks", "top_question_tokens"]


def region_masks(infos: Sequence[QuestionInfo], width: int, num_latent: int, suffix_len: int) -> torch.Tensor:
    """(B, steps, regions, keys) 0/1 masks of every region for every step's query (keys up to the suffix end)."""
    K = num_latent
    keys = width + K + suffix_len
    masks = torch.zeros((len(infos), K + 2, len(REGIONS), keys), dtype=torch.float64)
    R = {name: i for i, name in enumerate(REGIONS)}
    for b, info in enumerate(infos):
        o = width - len(info.ids)
        q0, q1 = o + info.n_special, o + info.n_special + info.n_text
        for s in range(K + 2):
            m = masks[b, s]
            m[R["special"], o:q0] = 1
            m[R["question"], q0:q1] = 1
            m[R["bot"], q1:width] = 1
            if s == 0:  # the [bot] position of the prefill
                query = width - 1
            elif s <= K:  # latent token s-1
                query = width + s - 1
                m[R["latents"], width:query] = 1
            else:  # the answer position
                query = keys - 1
                m[R["latents"], width : width + K] = 1
                m[R["suffix"], width + K : query] = 1
            m[:, query] = 0
            m[R["self"], query] = 1
    return masks


def _run_attention(
    model: Any, batch: ReadoutBatch, masks: torch.Tensor, qidx: torch.Tensor, qvalid: torch.Tensor, remote: bool | str
) -> list[np.ndarray]:
    """One trace: region masses, total mass and question-token weights of every step, layer and head."""
    n_layers = model.n_layers
    attn = [model.block_part(L, "attention") for L in range(n_layers)]
    width = batch.width
    if not remote and model.device is not None:
        masks, qidx, qvalid = masks.to(model.device), qidx.to(model.device), qvalid.to(model.device)
    from ..model.remote import remote_errors, trace_kwargs

    calls = model.schedule().readout_calls  # the step iterator: [bot], each latent, the answer prompt
    step_of = {call: i for i, call in enumerate(calls)}
    with remote_errors(remote), model.trace(**batch.inputs, **trace_kwargs(remote)) as tracer:
        mass, total, per_token = [], [], []
        for call in tracer.iter[calls.start : calls.stop]:
            m_call, t_call, p_call = [], [], []
            for L in range(n_layers):
                out = attn[L].output
                w = out[1][:, :, -1, :].to(torch.float64)  # (B, heads, keys) of this call's last query
                # Keys past the masks' end (a cache allocated ahead) are future positions: weight exactly 0.
                n_keys = min(w.shape[-1], masks.shape[-1])
                m_call.append(torch.einsum("bhk,brk->bhr", w[..., :n_keys], masks[:, step_of[call], :, :n_keys]))
                t_call.append(w.sum(-1))
                idx = qidx[:, None, :].expand(-1, w.shape[1], -1)
                tok = w[:, :, :width].gather(-1, idx)
                p_call.append(torch.where(qvalid[:, None, :], tok, torch.full_like(tok, float("nan"))))
            mass.append(torch.stack(m_call, 1))
            total.append(torch.stack(t_call, 1))
            per_token.append(torch.stack(p_call, 1))
        saved = nnsight.save([torch.stack(mass, 1).cpu(), torch.stack(total, 1).cpu(), torch.stack(per_token, 1).cpu()])
    return [torch.as_tensor(x).numpy() for x in saved]


def attention_batch(model: Any, context: bool | str, job: tuple[ReadoutBatch, tuple[torch.Tensor, ...]]) -> list[Any]:
    """One batch of `attention_readout` (the executors' unit of work; module level, so a Ray worker can run it)."""
    batch, (masks, qidx, qvalid) = job
    return _run_attention(model, batch, masks, qidx, qvalid, context)


def attention_readout(
    model: Any,
    pairs: Sequence[Any],
    batch_size: int = 16,
    top: int = 5,
    remote: bool | str = False,
    workers: int | Executor | None = None,
    ray_address: str | None = None,
) -> xr.Dataset:
    """Attention masses and question-token weights at every step, layer and head (docs/readouts.md).

    Returns a Dataset with dims (pair, variant, step, layer, head[, region | token]) and attr
    `codi_nnsight_schema = "codi-nnsight/attention/1"`; `top` question tokens per step (averaged
    over layers and heads) are stored as `top_token_*`. `workers` / `ray_address` shard the
    batches over Ray workers (docs/sharding.md).
    """
    # A refused target, a weightless local run or workers that cannot run: one line, before any work.
    with Run(model, remote, workers=workers, ray_address=ray_address) as run:
        return _attention_readout(model, pairs, batch_size, top, run)


def _attention_readout(model: Any, pairs: Sequence[Any], batch_size: int, top: int, run: Run) -> xr.Dataset:
    if model.codi.lm.config._attn_implementation != "codi_eager":
        raise UserError(
            f"attention readout needs the package's codi_eager attention; model {model.name} uses "
            f"{model.codi.lm.config._attn_implementation!r}"
        )
    infos = question_infos(model, pairs)
    K, n_layers = model.num_latent, model.n_layers
    cfg = model.codi.lm.config
    n_heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    n_tok = max(i.n_text for i in infos)
    q = len(infos)
    mass = np.zeros((q, K + 2, n_layers, n_heads, len(REGIONS)))
    total = np.zeros((q, K + 2, n_layers, n_heads))
    per_token = np.full((q, K + 2, n_layers, n_heads, n_tok), np.nan)
    jobs = []
    for batch in batches(model, infos, batch_size):
        members = [infos[j] for j in batch.index]
        masks = region_masks(members, batch.width, K, len(members[0].suffix))
        pos = [[batch.width - len(i.ids) + p for p in i.text_positions] for i in members]
        qidx = torch.as_tensor(padded(pos, n_tok, fill=0, dtype=np.int64))
        qvalid = torch.as_tensor(padded([[1] * len(p) for p in pos], n_tok, fill=0, dtype=np.int64)) > 0
        jobs.append((batch, (masks, qidx, qvalid)))

    def keep(n: int, got: list[np.ndarray]) -> None:
        index = jobs[n][0].index
        mass[index], total[index], per_token[index] = got

    run.map(attention_batch, run.remote, jobs, keep)
    n = len(pairs)
    mass, total, per_token = (to_pair_variant(a, infos, n) for a in (mass, total, per_token))
    dims = ("pair", "variant", "step", "layer", "head")
    text = to_pair_variant(
        padded([i.text_tokens for i in infos], n_tok, fill="", dtype=object)
        if n_tok
        else np.empty((q, 0), dtype=object),
        infos,
        n,
    )
    seen = (~np.isnan(per_token)).sum(axis=(3, 4))
    mean = np.where(seen > 0, np.nansum(per_token, axis=(3, 4)) / np.maximum(seen, 1), np.nan)
    top = min(int(top), n_tok)
    order = np.argsort(-np.nan_to_num(mean, nan=-np.inf), axis=-1, kind="stable")[..., :top]
    top_weight = np.take_along_axis(mean, order, axis=-1)
    top_text = np.take_along_axis(np.broadcast_to(text[:, :, None, :], mean.shape), order, axis=-1)
    top_pos = np.where(np.isnan(top_weight), -1, order)
    top_text = np.where(np.isnan(top_weight), "", top_text).astype(object)
    data: dict[str, Any] = {
        "mass": (
            dims + ("region",),
            mass,
            {"long_name": "attention weight summed over the region's key positions", "units": "share of attention"},
        ),
        "total": (
            dims,
            total,
            {"long_name": "attention weight summed over all key positions (sanity: 1)", "units": "share of attention"},
        ),
        "question_attention": (
            dims + ("token",),
            per_token,
            {
                "long_name": "attention weight on each question text token (NaN past its end)",
                "units": "share of attention",
            },
        ),
        "question_attention_mean": (
            ("pair", "variant", "step", "token"),
            mean,
            {"long_name": "question_attention averaged over layers and heads", "units": "share of attention"},
        ),
        "top_token_position": (
            ("pair", "variant", "step", "rank"),
            top_pos,
            {
                "long_name": "question token positions with the largest question_attention_mean (-1: none)",
                "units": "token index",
            },
        ),
        "top_token_weight": (
            ("pair", "variant", "step", "rank"),
            top_weight,
            {"long_name": "their question_attention_mean", "units": "share of attention"},
        ),
        "top_token_text": (("pair", "variant", "step", "rank"), top_text, {"long_name": "their text"}),
    }
    coords = base_coords(model, pairs, infos, taken=set(data) | {"head", "region", "token", "token_text", "rank"})
    del coords["intermediate"]
    coords.update(
        {
            "head": ("head", np.arange(n_heads, dtype=np.int64), {"long_name": "query head"}),
            "region": (
                "region",
                np.array(REGIONS, dtype=object),
                {"long_name": "; ".join(f"{k}: {v}" for k, v in REGION_DOCS.items())},
            ),
            "token": ("token", np.arange(n_tok, dtype=np.int64), {"long_name": "question text token index"}),
            "token_text": (("pair", "variant", "token"), text, {"long_name": "question text token ('' past its end)"}),
            "rank": ("rank", np.arange(top, dtype=np.int64), {"long_name": "0 = most attended"}),
        }
    )
    attrs = provenance(
        model,
        pairs,
        SCHEMA,
        run=run,
        readout="attention weights of each step's query position, from the model's own eager "
        "attention (output[1] of the attention module)",
    )
    return xr.Dataset(data, coords=coords, attrs=attrs)


def top_question_tokens(
    ds: xr.Dataset,
    pair: int,
    variant: str = "clean",
    step: str = "0",
    layer: int | None = None,
    head: int | None = None,
    k: int = 5,
) -> list[tuple[str, float]]:
    """The `k` question tokens `step` attends to most: (text, weight), averaged over the layers
    and heads not given (both given: that head's own weights)."""
    w = ds["question_attention"].sel(pair=pair, variant=variant, step=str(step))
    if layer is not None:
        w = w.sel(layer=layer)
    if head is not None:
        w = w.sel(head=head)
    w = w.mean([d for d in ("layer", "head") if d in w.dims]) if set(w.dims) - {"token"} else w
    text = ds["token_text"].sel(pair=pair, variant=variant).values
    values = w.values
    order = [i for i in np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable") if not np.isnan(values[i])]
    return [(str(text[i]), float(values[i])) for i in order[:k]]
