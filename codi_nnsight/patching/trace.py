"""Running a planned batch in one nnsight trace, and the full-patch sanity trace.

The trace body uses only torch and nnsight (and the metric functions, shipped by value), so it
runs unchanged on an NDIF server; only per-row metric scalars and the few decoded answer tokens
leave it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..model.families import resolve
from ..model.remote import remote_errors, trace_kwargs
from ..model.wrapper import CODIModel
from . import metrics as metric_table
from .config import SweepConfig
from .plan import BatchPlan, answer_tokens, prompt_inputs
from .sites import output_tensor

#: Decoded ids kept past a row's own limit are replaced by this (as after eos).
NO_TOKEN = -1


def _on_device(plan: BatchPlan, model: CODIModel, remote: bool | str) -> tuple[dict, dict, dict, torch.Tensor]:
    """Every patch as one table per envoy kind, indices on the model's device.

    Returns ({(layer, call): patches}, {prj call: patches}, {call: full-patch patches}, baseline
    rows), patches being [(kind, slice, dst, payload)] as in `BatchPlan.extra_plan`. CPU indices
    into CUDA tensors cost a copy per patch, so they move once here.
    """
    layer_plan: dict[Any, list] = {k: [("copy", slice(None), d, s)] for k, (d, s) in plan.layer_plan.items()}
    prj_plan: dict[Any, list] = {k: [("copy", slice(None), d, s)] for k, (d, s) in plan.prj_plan.items()}
    full_plan: dict[Any, list] = {k: [("copy", slice(None), d, s)] for k, (d, s) in plan.full_patch_plan.items()}
    for (site, call), patches in plan.extra_plan.items():
        table, key = (prj_plan, call) if site == "prj" else (layer_plan, (site, call))
        table.setdefault(key, []).extend(patches)
    baseline_of = torch.tensor(plan.baseline_of)
    if not remote and model.device is not None and model.device.type != "cpu":
        dev = model.device

        def move(table: dict[Any, list]) -> dict[Any, list]:
            return {k: [(kd, sl, d.to(dev), x.to(dev)) for kd, sl, d, x in v] for k, v in table.items()}

        layer_plan, prj_plan, full_plan = move(layer_plan), move(prj_plan), move(full_plan)
        baseline_of = baseline_of.to(dev)
    return layer_plan, prj_plan, full_plan, baseline_of


def apply_patches(h: torch.Tensor, patches: list[tuple[str, slice, torch.Tensor, torch.Tensor]]) -> None:
    """Write every patch into `h` (rows, tokens, width) in place: copy rows, set values, or rescale
    directions to the norm of what they replace. Torch only: it runs inside traces, remotely too."""
    for kind, sl, dst, x in patches:
        if kind == "copy":
            h[dst, ..., sl] = h[x, ..., sl]
        elif kind == "token":  # one token per patch: x = (source rows, their tokens, the targets' tokens)
            h[dst, x[2], sl] = h[x[0], x[1], sl]
        elif kind == "set":
            h[dst, ..., sl] = x.to(h.dtype)
        else:  # "norm"
            h[dst, ..., sl] = x.to(h.dtype) * h[dst, ..., sl].norm(dim=-1, keepdim=True)


class BatchOutput(NamedTuple):
    """What one traced batch returns."""

    columns: np.ndarray  # (rows, trace metrics) float64, in the order of the sweep's trace metrics
    generated: np.ndarray  # (rows, N) greedy ids, each row cut to its own decode limit
    #: The full-patch check the batch carried: max |logit difference| of its row against the
    #: source row (as `full_patch_check`'s `max_abs`), or None when it carried none.
    full_patch_max_abs: float | None = None


def run_batch(
    model: CODIModel,
    plan: BatchPlan,
    cfg: SweepConfig,
    remote: bool | str = False,
    metrics: tuple[metric_table.Metric, ...] | None = None,
    gold: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BatchOutput:
    """Run one planned batch in a single nnsight trace (and its full-patch check, if it carries one).

    `metrics`: the sweep's metric table (default `metrics.METRICS`; with metric functions, they
    follow the built-ins). Their trace metrics make the columns, in table order. When one of them
    needs `thoughts`, the fed-back thought of every row is kept at each feedback call (after its
    patch); `gold` (`plan.row_gold_tokens`) is what those needing `gold` see.
    """
    sched = plan.schedule
    K = sched.num_latent
    envoys = {L: cfg.site.envoy(model, L) for L in cfg.layers} if cfg.site.per_layer else {}
    layer_plan, prj_plan, full_plan, baseline_of = _on_device(plan, model, remote)
    layers = sorted(envoys)
    latent = sched.latent_calls
    # The full-patch row patches layer 0's block output from the question's call to the suffix's.
    # The calls the trace walks: the latent calls, widened to the question's and the suffix's when
    # a patch is there (the full-patch row, question and answer-prompt tokens of a sequence sweep).
    touched = {call for _, call in layer_plan} | set(full_plan)
    calls = range(min(touched | {latent.start}), max(touched | {latent.stop - 1}) + 1)
    order = sorted({*layers, 0}) if full_plan else layers
    block0 = model.layers[0]
    reads_input = cfg.site.reads == "input"
    prj = model.feedback  # the method's feedback module (CODI: prj)
    feeds = sched.thought_fed_by()  # decoder call -> the thought its last state becomes (the step iterator)
    columns_of = metric_table.trace_columns
    trace_metrics, want, extra = _metric_inputs(model, metrics, gold, remote)
    # With the full-patch row the loop starts at the question's call, which precedes prj call 0:
    # thought 0 is then read inside the loop, after that call's requests (execution order).
    prj0_in_loop = want and bool(layers) and sched.question_call in calls
    patch = apply_patches
    n_decodable = model.codi.eot_id
    with remote_errors(remote), model.trace(**plan.inputs, **trace_kwargs(remote)) as tracer:
        thoughts = []
        if not prj0_in_loop and (0 in prj_plan or want):  # prj call 0 happens before the first latent call
            e = prj.output
            patch(e, prj_plan.get(0, ()))
            if want:
                thoughts.append(e[:, -1, :].clone())
        if layers:
            # Every (layer, latent call) has at least the self row's patch, so each latent call's
            # first request is a layer output pinned to that decoder call; the prj request after
            # it is relaxed and binds to the next prj call, which makes the next latent token's
            # input. Requests follow execution order: a layer's site, then (layer 0) its block output.
            for call in tracer.iter[calls.start : calls.stop]:
                for L in order:
                    if (L, call) in layer_plan:
                        h = envoys[L].input if reads_input else output_tensor(envoys[L].output)
                        patch(h, layer_plan[(L, call)])
                    if L == 0 and call in full_plan:
                        patch(output_tensor(block0.output), full_plan[call])
                k = feeds.get(call, K)
                if k < K and (call in latent or prj0_in_loop) and (k in prj_plan or want):
                    e = prj.output
                    patch(e, prj_plan.get(k, ()))
                    if want:
                        thoughts.append(e[:, -1, :].clone())
        else:  # the latent site: only prj calls 1 .. K-1 (call 0 was handled above)
            for k in tracer.iter[1:K]:
                if k in prj_plan or want:
                    e = prj.output
                    patch(e, prj_plan.get(k, ()))
                    if want:
                        thoughts.append(e[:, -1, :].clone())
        result = model.output
        logits = result["logits"].to(torch.float64)
        logp = torch.log_softmax(logits, dim=-1)
        base = baseline_of.to(logits.device)
        values = {
            "logits": logits,
            "logp": logp,
            "base_logits": logits[base],
            "base_logp": logp[base],
            "first": result["candidate_first"],
            "cand": result["candidate_logprobs"].to(torch.float64),
            "n_decodable": n_decodable,
        }
        if want:
            values["thoughts"] = torch.stack(thoughts, dim=1)  # (rows, K, width)
        values.update(extra)
        columns = columns_of(values, trace_metrics).cpu().save()
        generated = result["generated"].cpu().save()
        if plan.full_patch_row is not None:
            check, src = plan.full_patch_row, plan.source_of[plan.full_patch_row]
            full_max = (logits[check] - logits[src]).abs().max().cpu().save()
    full = float(torch.as_tensor(full_max)) if plan.full_patch_row is not None else None
    generated = cut_to_limits(torch.as_tensor(generated).numpy(), plan.decode_limit)
    return BatchOutput(torch.as_tensor(columns).numpy(), generated, full)


def _metric_inputs(
    model: CODIModel,
    metrics: tuple[metric_table.Metric, ...] | None,
    gold: tuple[torch.Tensor, torch.Tensor] | None,
    remote: bool | str,
) -> tuple[tuple[metric_table.Metric, ...], bool, dict[str, Any]]:
    """(the trace metrics in column order, whether thoughts are kept, the gold inputs for `v`)."""
    table = metric_table.METRICS if metrics is None else metrics
    needed = metric_table.needed_inputs(table)
    extra: dict[str, Any] = {}
    if "thoughts" in needed:
        norm = resolve(model.family.decoder(model.lm), model.family.final_norm)
        head = model.lm.lm_head
        # Called inside the trace by the metrics that read thoughts: the logit lens, in float64.
        extra["lens"] = lambda x: head(norm(x)).to(torch.float64)
    if "gold" in needed:
        if gold is None:
            raise ValueError("a metric needs gold tokens: pass gold=plan.row_gold_tokens(...)")
        own, src = gold
        if not remote and model.device is not None:
            own, src = own.to(model.device), src.to(model.device)
        extra.update(gold=own, source_gold=src)
    return tuple(m for m in table if m.trace is not None), "thoughts" in needed, extra


def cut_to_limits(generated: np.ndarray, limits: Sequence[int]) -> np.ndarray:
    """Each row's greedy ids cut to its own limit, so an answer never depends on its batch."""
    out = generated.copy()
    for r, n in enumerate(limits):
        out[r, n:] = NO_TOKEN
    return out


def full_patch_pair(model: CODIModel, pairs: Sequence[Any]) -> int | None:
    """Index of the pair the full-patch check runs on: the shortest with equal-length questions.

    Chosen from the whole sweep, so the check (and what it records) never depends on the batch size.
    """
    equal = [
        (len(model.encode_question(p.clean.question)), i)
        for i, p in enumerate(pairs)
        if len(model.encode_question(p.clean.question)) == len(model.encode_question(p.corrupted.question))
    ]
    return min(equal)[1] if equal else None


def full_patch_check(
    model: CODIModel, pairs: Sequence[Any], remote: bool | str = False, skip_question: bool = False
) -> dict[str, Any]:
    """Patch `resid` at every position of every token (layer 0) on an equal-length pair.

    The corrupted run must then reproduce the clean run's answer-position logits. Returns
    {"max_abs": float (NaN if no equal-length pair), "pair_id": id or None}. `skip_question`
    leaves the question tokens unpatched — a deliberately incomplete patch that must fail.

    A sweep usually runs this check inside the batch that holds the pair (`plan_batch(full_patch=
    ...)`, the same patch on a copy of the target question); this separate trace is for the
    configurations and resumed runs where that batch cannot carry it.
    """
    i = full_patch_pair(model, pairs)
    if i is None:
        return {"max_abs": float("nan"), "pair_id": None}
    pair = pairs[i]
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    inputs, prefill_calls = prompt_inputs(model, [pair.clean.question, pair.corrupted.question])
    sched = model.schedule(prefill_calls)
    inputs = {**inputs, "suffix_ids": torch.tensor(toks.suffix)}
    # With a shared prefix (call 0), both questions already share those positions' states, so
    # patching from the first call that differs — the rest of the question — covers every token.
    # Layer 0 is the strictest case: every later layer is recomputed from the patched state.
    start = sched.question_call + (1 if skip_question else 0)
    block = model.layers[0]
    with remote_errors(remote), model.trace(**inputs, **trace_kwargs(remote)) as tracer:
        for _call in tracer.iter[start : sched.suffix_call + 1]:  # question, latents, suffix
            h = output_tensor(block.output)
            h[1] = h[0]
        logits = model.output["logits"].to(torch.float64).cpu().save()
    logits = torch.as_tensor(logits)
    return {"max_abs": float((logits[1] - logits[0]).abs().max()), "pair_id": int(pair.pair_id)}
