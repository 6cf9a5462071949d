"""Logit lens over the CODI loop: what every layer at every step would say if it were the output.

For every question (clean and corrupted variant of each pair), every step — `bot` (the last
question position), latent token 0 … K-1 and `answer` (the last position of
`[eot] The answer is:`) — and every decoder block L, the block's output at that position is
decoded through the family's final norm and the LM head (`softmax(lm_head(norm(h)))` over the
whole output vocabulary). For `bot` and every latent step the projected continuous thought
`prj(norm(h_last))` — the input embedding of the *next* latent token — is decoded the same way.
From each distribution we keep the top-k tokens and the rank (1 = most likely) and probability of
the question's answer token and of each gold intermediate value's token (`readouts.gold`).

With `tuned=` (a `readouts.tuned.TunedLens`) each block output h of layer L is first translated
to `A_L h + b_L` (the tuned lens, Belrose et al. 2023); the projected thoughts are decoded as before.

Everything is computed inside one nnsight trace per batch, with torch only in the trace body,
so it runs unchanged on NDIF (`remote=`); only the small per-position results leave the trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from ..errors import UserError
from ..model.families import resolve
from ..model.remote import remote_errors, trace_kwargs
from ..run import Executor, Run
from .common import (
    ReadoutBatch,
    base_coords,
    batches,
    gold_variables,
    padded,
    provenance,
    question_infos,
    to_pair_variant,
)

SCHEMA = "codi-nnsight/lens/1"

__all__ = ["SCHEMA", "lens_batch", "lens_stats", "logit_lens"]


def lens_stats(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    """Top-k and target statistics of (B, n, V) logits; torch only (it runs inside the trace).

    `targets` (B, T) holds token ids, -1 where there is none. Returns [top ids (B, n, k),
    top probabilities (B, n, k), target ranks (B, n, T) (1 = most likely; NaN: no target),
    target probabilities (B, n, T)]. Softmax in float64 whatever the model dtype.
    """
    logits = logits.to(torch.float64)
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    idx = targets.clamp(min=0)[:, None, :].expand(-1, logits.shape[1], -1)
    t_logit = logits.gather(-1, idx)
    rank = (logits[:, :, None, :] > t_logit[..., None]).sum(-1).to(torch.float64) + 1
    valid = (targets >= 0)[:, None, :].expand_as(t_logit)
    nan = torch.full_like(t_logit, float("nan"))
    return [top_i, top_p, torch.where(valid, rank, nan), torch.where(valid, probs.gather(-1, idx), nan)]


def _run_lens(
    model: Any, batch: ReadoutBatch, targets: torch.Tensor, top_k: int, remote: bool | str, tuned: Any = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One trace: lens statistics of every block output (translated by `tuned` when given) and every prj output."""
    K, n_layers = model.num_latent, model.n_layers
    blocks = [model.layers[L] for L in range(n_layers)]
    norm = resolve(model.family.decoder(model.lm), model.family.final_norm)
    head = model.lm.lm_head
    prj = model.feedback  # the method's feedback module (CODI: prj)
    stats = lens_stats
    translators = None
    if tuned is not None:
        translators = (tuned.weight, tuned.bias)
    if not remote and model.device is not None:
        targets = targets.to(model.device)
    # The step iterator: the readout's calls ([bot], each latent, the answer prompt) and, for each,
    # the thought its last state becomes (K after the last latent: no thought follows).
    calls = model.schedule().readout_calls
    feeds = model.schedule().thought_fed_by()
    with remote_errors(remote), model.trace(**batch.inputs, **trace_kwargs(remote)) as tracer:
        block_parts: list[list[torch.Tensor]] = [[], [], [], []]
        prj_parts: list[list[torch.Tensor]] = [[], [], [], []]
        for call in tracer.iter[calls.start : calls.stop]:
            hs = []
            for L in range(n_layers):
                h = blocks[L].output
                h = h[0] if isinstance(h, tuple) else h
                hs.append(h[:, -1, :])
            x = torch.stack(hs, 1)
            if translators is not None:
                # Tuned lens: A_L h + b_L per layer in the translators' dtype, then back to the states' dtype.
                w = translators[0].to(x.device)
                b = translators[1].to(x.device)
                x = (torch.einsum("blj,lij->bli", x.to(w.dtype), w) + b).to(x.dtype)
            for part, value in zip(block_parts, stats(head(norm(x)), targets, top_k)):
                part.append(value)
            j = feeds.get(call, K + 1)
            if j < K:
                # prj call j turns this position's final state into thought j's input embedding.
                e = prj.output[:, -1, :]
            elif j == K:
                # After the last latent the model runs no prj; apply it ad hoc (nnsight spends no occurrence),
                # as the official loop does, to read the thought that would come next.
                e = prj(norm(hs[-1][:, None, :]))[:, -1, :]
            if j <= K:
                for part, value in zip(prj_parts, stats(head(norm(e[:, None, :])), targets, top_k)):
                    part.append(value)
        # One saved list: nnsight hands back saved *names*, so the results travel as one object.
        saved = nnsight.save(
            [torch.stack(p, 1).cpu() for p in block_parts] + [torch.stack(p, 1)[:, :, 0].cpu() for p in prj_parts]
        )
    arrays = [torch.as_tensor(x).numpy() for x in saved]
    return arrays[:4], arrays[4:]


def lens_batch(
    model: Any, context: tuple[int, bool | str, Any], job: tuple[ReadoutBatch, torch.Tensor]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One batch of `logit_lens` (the executors' unit of work; module level, so a Ray worker can run it)."""
    top_k, remote, tuned = context
    batch, targets = job
    return _run_lens(model, batch, targets, top_k, remote, tuned)


def logit_lens(
    model: Any,
    pairs: Sequence[Any],
    top_k: int = 5,
    batch_size: int = 16,
    remote: bool | str = False,
    tuned: Any = None,
    workers: int | Executor | None = None,
    ray_address: str | None = None,
) -> xr.Dataset:
    """Logit lens of every question of `pairs` at every step and layer (layout: docs/readouts.md).

    Returns a Dataset with dims `(pair, variant, step, layer[, k][, intermediate])` and attr
    `codi_nnsight_schema = "codi-nnsight/lens/1"`. `remote` is False, "local", True (NDIF) or a URL.
    `tuned`: a `readouts.tuned.TunedLens` for this model (refused otherwise): block outputs are
    translated before decoding (attr `lens = "tuned"`; `"logit"` without). `workers` /
    `ray_address` shard the batches over Ray workers (docs/sharding.md; the same numbers as one
    process on one thread).
    """
    # A refused target, a weightless local run or workers that cannot run: one line, before any work.
    with Run(model, remote, workers=workers, ray_address=ray_address) as run:
        return _logit_lens(model, pairs, top_k, batch_size, run, tuned)


def _logit_lens(model: Any, pairs: Sequence[Any], top_k: int, batch_size: int, run: Run, tuned: Any) -> xr.Dataset:
    if tuned is not None:
        tuned.check_model(model)
    infos = question_infos(model, pairs)
    n_gold = max((len(i.gold_tokens) for i in infos), default=0)
    K, n_layers = model.num_latent, model.n_layers
    if int(top_k) < 1:
        raise UserError(f"top-k {top_k}: expected at least 1")
    top_k = min(int(top_k), int(model.codi.lm.get_output_embeddings().weight.shape[0]))
    n_steps = K + 2
    q = len(infos)
    block = [
        np.zeros((q, n_steps, n_layers, top_k), np.int64),
        np.zeros((q, n_steps, n_layers, top_k)),
        np.zeros((q, n_steps, n_layers, 1 + n_gold)),
        np.zeros((q, n_steps, n_layers, 1 + n_gold)),
    ]
    proj = [
        np.full((q, n_steps, top_k), -1, np.int64),
        np.full((q, n_steps, top_k), np.nan),
        np.full((q, n_steps, 1 + n_gold), np.nan),
        np.full((q, n_steps, 1 + n_gold), np.nan),
    ]
    jobs = []
    for batch in batches(model, infos, batch_size):
        rows = [[infos[j].answer_token, *infos[j].gold_tokens] for j in batch.index]
        jobs.append((batch, torch.as_tensor(padded(rows, 1 + n_gold, fill=-1, dtype=np.int64))))

    def keep(n: int, got: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
        index = jobs[n][0].index
        for store, part in zip(block, got[0]):
            store[index] = part
        for store, part in zip(proj, got[1]):
            store[index, : K + 1] = part

    run.map(lens_batch, (top_k, run.remote, tuned), jobs, keep)
    n = len(pairs)
    pv = [to_pair_variant(a, infos, n) for a in block]
    pj = [to_pair_variant(a, infos, n) for a in proj]
    dims = ("pair", "variant", "step", "layer")
    pdims = ("pair", "variant", "step")
    rank_doc = "rank among all output tokens (1 = most likely)"
    data: dict[str, Any] = {
        "top_ids": (
            dims + ("k",),
            pv[0],
            {"long_name": "top-k tokens of the block output's lens distribution", "units": "token id"},
        ),
        "top_prob": (dims + ("k",), pv[1], {"long_name": "their probabilities", "units": "probability"}),
        "answer_rank": (dims, pv[2][..., 0], {"long_name": f"answer token: {rank_doc}", "units": "rank"}),
        "answer_prob": (dims, pv[3][..., 0], {"long_name": "answer token: probability", "units": "probability"}),
        "intermediate_rank": (
            dims + ("intermediate",),
            pv[2][..., 1:],
            {"long_name": f"gold intermediate value's token: {rank_doc} (NaN: unknown)", "units": "rank"},
        ),
        "intermediate_prob": (
            dims + ("intermediate",),
            pv[3][..., 1:],
            {"long_name": "gold intermediate value's token: probability", "units": "probability"},
        ),
        "prj_top_ids": (
            pdims + ("k",),
            pj[0],
            {
                "long_name": "top-k tokens of the projected thought prj(h) (next latent's input embedding; -1: none)",
                "units": "token id",
            },
        ),
        "prj_top_prob": (pdims + ("k",), pj[1], {"long_name": "their probabilities", "units": "probability"}),
        "prj_answer_rank": (
            pdims,
            pj[2][..., 0],
            {"long_name": f"answer token from prj(h): {rank_doc}", "units": "rank"},
        ),
        "prj_answer_prob": (
            pdims,
            pj[3][..., 0],
            {"long_name": "answer token from prj(h): probability", "units": "probability"},
        ),
        "prj_intermediate_rank": (
            pdims + ("intermediate",),
            pj[2][..., 1:],
            {"long_name": f"gold intermediate's token from prj(h): {rank_doc}", "units": "rank"},
        ),
        "prj_intermediate_prob": (
            pdims + ("intermediate",),
            pj[3][..., 1:],
            {"long_name": "gold intermediate's token from prj(h): probability", "units": "probability"},
        ),
        **gold_variables(infos, n),
    }
    coords = base_coords(model, pairs, infos, taken=set(data) | {"k"})
    coords["k"] = ("k", np.arange(top_k, dtype=np.int64), {"long_name": "0 = most likely"})
    if tuned is None:
        extra = {
            "lens": "logit",
            "readout": "logit lens: softmax(lm_head(final_norm(h))) over the whole output vocabulary",
        }
    else:
        extra = {
            "lens": "tuned",
            "readout": "tuned lens: softmax(lm_head(final_norm(A_L h + b_L))) over the whole output vocabulary",
            "tuned_lens_source": str(tuned.meta.get("source") or ""),
            "tuned_lens_sha256": tuned.sha256,
        }
    attrs = provenance(model, pairs, SCHEMA, run=run, top_k=top_k, **extra)
    return xr.Dataset(data, coords=coords, attrs=attrs)
