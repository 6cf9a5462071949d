"""Attribution patching (AtP): a first-order estimate of every patch of a sweep, from one backward pass.

For a corrupted (target) run and its clean (source) run, AtP estimates the effect of patching one
site — layer × latent position × component (× head) — on a metric of the target run as

    AtP(site) = (a_clean(site) − a_corrupted(site)) · ∂metric/∂a(site)   (gradient in the corrupted run)

(Nanda 2023, "Attribution patching"; Kramár et al. 2024, "AtP*"). The gradient is taken through the
whole latent loop: through `prj` and the recurrence (latent k's states reach every later latent
through the fed-back embedding and through attention) and through the teacher-forced answer. So
AtP is the derivative, at ε = 0, of metric(corrupted run with the site set to a + ε·Δ): the
linearisation of the exact `patch_sweep(..., positions="each", mode="recurrent")` of the same
site. It approximates the *change* of the metric, `exact[m] − exact["baseline_" + m]`, not the
metric itself; large patches through the nonlinear loop can differ from it (measure with
`compare_with_exact` and `verify_top`).

Metrics: `logprob_diff` (teacher-forced log p(clean answer) − log p(corrupted answer)) and
`logit_diff` (first tokens at the answer position), as in `metrics.py`; each is one more
backward pass over the same graph.

Cost per batch of pairs: one forward of the clean questions without autograd (the activations),
one forward of the corrupted questions with autograd and one backward per metric — for every
component at once, where the exact sweep runs one patched forward per site.

How: an nnsight trace reads every site's tensor at every latent decoder call (`tracer.iter`, as
`trace.run_batch` does), and, after `model.output`, `torch.autograd.grad` takes the metric's
gradient with respect to all of them at once (nnsight's `with metric.backward(): t.grad` gives the
same numbers across `tracer.iter` iterations when asked in reverse order, but hangs on a tensor
that gets no gradient — the last layer at the last latent). Only the products leave the trace.

AtP* (`method="atp*"`, Kramár et al. 2024, "AtP*: An efficient and scalable method for
localizing LLM behaviour to components"), restricted to the corrections that apply here:

* GradDrop. For each decoder block l = 0 … L−1, one more target forward and backward in which
  block l's output y is replaced by y.detach() + (x − x.detach()) (x the block's input) at every
  latent call, the suffix call and the answer-candidate calls: the forward is numerically the
  same, the backward reaches earlier sites only along the residual stream past block l, not
  through its attention and MLP. That gives AtP_drop_l(n) for every site n, and

      atpstar(n) = sign(AtP(n)) · (1/(L−1)) · Σ_{l=0}^{L−1} |AtP_drop_l(n)|     (L = 1: divide by 1)

  (the paper's GradDrop score is the unsigned (1/(L−1)) Σ_l |AtP_drop_l(n)| over all L layers;
  the sign of plain AtP is added here so it can be compared with signed effects; |atpstar| is
  the paper's score). It is a ranking score, not an effect size: a site's score is large when
  some path that does not cancel carries a large effect. In a plain transformer the terms with l
  before the node's layer equal AtP(n); here they do not, because a site of latent k reaches
  later latents through every block. Attention/MLP/head outputs of block l get no gradient when
  block l is cut (their term is 0); a `resid` site at block l is the replaced tensor, so its
  term is the full downstream gradient with block l's own path removed from later calls.
  Variables `atpstar_<metric>` (beside `atp_<metric>`), same dims.
* The QK fix (recomputing the attention softmax exactly when patching a node's queries or keys
  — the per-key attention logits for the query/key nodes of a head) is not implemented and does
  not apply to these sites: it corrects the AtP estimate of *query and key* nodes, whose effect
  passes through a saturating softmax of the node's own head. This package's sites are the
  outputs of blocks, attention sub-layers, MLPs and heads, and `prj` — value-side / output
  nodes; a patch of them changes queries and keys of *later* heads, but the paper's fix treats
  those downstream softmaxes linearly too (it only fixes the patched node's own attention).
  Applying it would mean adding q/k sites (per head, per key position), which this package
  does not patch, so the exact sweep offers nothing to compare them with.

Remote-capable: the request itself asks the forward to keep autograd (`keep_grad=True`, a forward
argument, so a server's module does it too); the clean activations travel with the second request.
The graph starts at the site activations themselves (each is made to require grad as it is read,
`_leaf`), not at the parameters: an NDIF server freezes every parameter after loading, and a
frozen model gives the same numbers (see tests/test_attribution_frozen.py for the ~1 ulp kernel
difference of batches of several rows). The results record what computed them
(`CODIModel.provenance`: `computed_on`, the server's dtype and checkpoint).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from ..errors import UserError
from ..model.remote import remote_errors, trace_kwargs
from ..model.wrapper import CODIModel
from ..run import Run, now, recorded_command
from ..run.executors import Executor
from .plan import answer_tokens
from .sites import SITES, head_dim, n_heads, output_tensor

SCHEMA = "codi-nnsight/attribution/1"

#: Metrics AtP can differentiate: name -> (long_name, units).
ATP_METRICS: dict[str, tuple[str, str]] = {
    "logprob_diff": (
        "AtP estimate of the change of logprob_diff (log p(clean answer) - log p(corrupted answer), "
        "teacher-forced) when the site is patched",
        "nats",
    ),
    "logit_diff": (
        "AtP estimate of the change of logit_diff (clean - corrupted first-token logit at the answer "
        "position) when the site is patched; NaN when both answers start with the same token",
        "logits",
    ),
}

#: `method` values: plain AtP, or AtP with the AtP* GradDrop correction.
METHODS = ("atp", "atp*")
#: Prefix of the GradDrop variables (`atpstar_<metric>`).
STAR = "atpstar_"

#: Within one decoder block, the order its parts run in (reads must follow the forward).
_PART_ORDER = {"attention_out": 0, "attention": 1, "mlp": 2, None: 3}


@contextlib.contextmanager
def keeping_grad(model: CODIModel) -> Iterator[None]:
    """Run the model's forward with autograd on (`CODIModule.keep_grad`) inside the block."""
    codi = model.codi
    before = getattr(codi, "keep_grad", False)
    codi.keep_grad = True
    try:
        yield
    finally:
        codi.keep_grad = before


def _batches(model: CODIModel, pairs: list[Any], batch_size: int) -> list[list[Any]]:
    """Consecutive pairs in batches of at most `batch_size` that share one answer-prompt suffix."""
    out: list[list[Any]] = []
    suffix = None
    for p in pairs:
        s = tuple(answer_tokens(model, p.clean.answer, p.corrupted.answer).suffix)
        if not out or len(out[-1]) >= batch_size or s != suffix:
            out.append([])
        out[-1].append(p)
        suffix = s
    return out


def _candidates(tokens: list[Any]) -> torch.Tensor:
    """(rows, 2, A) clean and corrupted answer tokens, right-padded with -1."""
    n = max(max(len(t.clean), len(t.corrupted)) for t in tokens)
    cands = torch.full((len(tokens), 2, n), -1, dtype=torch.long)
    for r, t in enumerate(tokens):
        cands[r, 0, : len(t.clean)] = torch.tensor(t.clean)
        cands[r, 1, : len(t.corrupted)] = torch.tensor(t.corrupted)
    return cands


def _read_sites(
    tracer: Any,
    model: CODIModel,
    components: list[str],
    layers: list[int],
    n_latent: int,
    sched: Any,
    drop: int | None = None,
    calls_after: int = 0,
    leaves: bool = False,
):
    """Every site's tensor at every latent position, in forward order: {component: [[(R, 1, w)] per k] per layer}.

    Runs inside a trace. Layer sites are read at latent decoder calls; `latent` is prj call k.

    With `leaves` (the target run, under autograd), every site tensor is made to require grad
    (`_leaf`), so the graph the gradients are taken on starts at the sites themselves and does
    not depend on the parameters requiring grad (an NDIF server freezes them).

    With `drop = l` (GradDrop), block l's output y is replaced by y.detach() + (x − x.detach()) at
    every latent call and at the `calls_after` decoder calls after them (suffix, answer
    candidates), x being the block's input: the same numbers forward, and the backward passes
    only along the residual stream past block l, not through its attention and MLP. A `resid`
    site at layer l is then that replaced tensor.
    """
    layer_comps = sorted((c for c in components if SITES[c].per_layer), key=lambda c: _PART_ORDER[SITES[c].part])
    acts: dict[str, list[list[Any]]] = {c: [[] for _ in layers] for c in layer_comps}
    if "latent" in components:
        acts["latent"] = [[]]
    prj = model.feedback  # the method's feedback module (CODI: prj)
    keep = _leaf if leaves else _same
    if "latent" in components:
        acts["latent"][0].append(keep(prj.output))  # prj call 0, before the first latent decoder call
    if drop is not None:
        _read_dropped(tracer, model, acts, layer_comps, layers, n_latent, sched, drop, calls_after, keep)
    elif layer_comps:
        envoys = {(c, L): SITES[c].envoy(model, L) for c in layer_comps for L in layers}
        feeds = sched.thought_fed_by()  # the step iterator: decoder call -> the thought it becomes
        for call in tracer.iter[sched.latent_calls.start : sched.latent_calls.stop]:
            for li, L in enumerate(layers):
                for c in layer_comps:
                    e = envoys[(c, L)]
                    acts[c][li].append(keep(e.input if SITES[c].reads == "input" else output_tensor(e.output)))
            k = feeds[call]
            if "latent" in components and k < n_latent:
                acts["latent"][0].append(keep(prj.output))
    elif "latent" in components:
        for _k in tracer.iter[1:n_latent]:
            acts["latent"][0].append(keep(prj.output))
    return acts


def _same(a: Any) -> Any:
    """`a` itself (the source run reads activations without autograd)."""
    return a


def _leaf(a: Any) -> Any:
    """`a`, set to require grad in place when nothing upstream of it does; runs in a trace, in the forward.

    With frozen parameters (NDIF's model actor calls `requires_grad_(False)` after loading) no
    activation is part of a graph, and `torch.autograd.grad` fails ("element 0 of tensors does not
    require grad"). Marking the very tensor the forward goes on with makes it a leaf, and every
    later computation, later sites and the metric included, is recorded from it. A tensor that
    already requires grad is left alone. The gradient with respect to a tensor does not depend
    on what is upstream of it, so the numbers are those of a model whose parameters require grad.
    """
    if not a.requires_grad:
        a.requires_grad_(True)
    return a


def _read_dropped(
    tracer: Any,
    model: CODIModel,
    acts: dict[str, list[list[Any]]],
    layer_comps: list[str],
    layers: list[int],
    n_latent: int,
    sched: Any,
    drop: int,
    calls_after: int,
    keep: Any = _same,
) -> None:
    """`_read_sites`' loop with block `drop` cut from the backward (fills `acts`; in a trace).

    `keep` is applied to every site tensor as it is read (`_leaf` in the target run).
    """
    components = list(acts)
    prj = model.feedback  # the method's feedback module (CODI: prj)
    start, stop = sched.latent_calls.start, sched.latent_calls.stop
    visit = sorted(set(layers) | {drop} if layer_comps else {drop})
    blocks = {L: model.layers[L] for L in visit}
    envoys = {(c, L): SITES[c].envoy(model, L) for c in layer_comps for L in layers}
    feeds = sched.thought_fed_by()  # the step iterator: decoder call -> the thought it becomes
    for call in tracer.iter[start : stop + calls_after]:
        latent = call < stop
        for L in visit:
            if L == drop:
                x = blocks[L].input
            if latent and L in layers:
                li = layers.index(L)
                for c in layer_comps:
                    if SITES[c].reads == "input":
                        acts[c][li].append(keep(envoys[(c, L)].input))
                    elif c != "resid" or L != drop:
                        acts[c][li].append(keep(output_tensor(envoys[(c, L)].output)))
            if L == drop:
                out = blocks[L].output
                y = output_tensor(out)
                cut = y.detach() + (x - x.detach())
                blocks[L].output = (cut, *out[1:]) if isinstance(out, tuple) else cut
                if latent and L in layers and "resid" in layer_comps:
                    acts["resid"][layers.index(L)].append(keep(cut))
        k = feeds.get(call, n_latent)
        if latent and "latent" in components and k < n_latent:
            acts["latent"][0].append(keep(prj.output))


def _metric_values(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """logprob_diff and logit_diff per row (float64; NaN where undefined), as in `metrics.py`."""
    logits = out["logits"].to(torch.float64)
    cand = out["candidate_logprobs"].to(torch.float64)
    first = out["candidate_first"]
    logit = logits.gather(1, first[:, :1]).squeeze(1) - logits.gather(1, first[:, 1:2]).squeeze(1)
    return {
        "logprob_diff": cand[:, 0] - cand[:, 1],
        "logit_diff": torch.where(first[:, 0] == first[:, 1], torch.full_like(logit, float("nan")), logit),
    }


def _run_pair_batch(
    model: CODIModel,
    chunk: list[Any],
    components: list[str],
    layers: list[int],
    metrics: list[str],
    direction: str,
    remote: bool | str = False,
    drops: Sequence[int | None] = (None,),
) -> dict[str, Any]:
    """One batch: the source forward (activations), the target forward with autograd, one backward per metric.

    One target forward per entry of `drops`: None is plain AtP, a layer l is AtP with block l's
    residual contribution cut from the backward (GradDrop, see `_read_sites`).

    Returns {"atp": {metric: {component: (R, n_layers, K, units) float64}}, "base": {metric: (R,)},
    "source": {metric: (R,)}, "drops": [that "atp" per entry of `drops`]}; `units` is 1 except for
    per-head sites; "atp" is the first entry's.
    """
    tokens = [answer_tokens(model, p.clean.answer, p.corrupted.answer) for p in chunk]
    src_q = [(p.clean if direction == "denoise" else p.corrupted).question for p in chunk]
    tgt_q = [(p.corrupted if direction == "denoise" else p.clean).question for p in chunk]
    extra = {"suffix_ids": torch.tensor(tokens[0].suffix), "candidates": _candidates(tokens), "max_new_tokens": 0}
    sched, K = model.schedule(), model.num_latent
    read = _read_sites
    values_of = _metric_values
    # The source run: activations only, no autograd (the fast, preallocated path).
    with remote_errors(remote), model.trace(**model.prepare(src_q, **extra), **trace_kwargs(remote)) as tracer:
        acts = read(tracer, model, components, layers, K, sched)
        source_acts = nnsight.save(
            {
                c: torch.stack([torch.stack([a[:, -1, :] for a in per_k], 1) for per_k in per_layer], 1).to(
                    torch.float64
                )
                for c, per_layer in acts.items()
            }
        )
        source_vals = nnsight.save({m: v.cpu() for m, v in values_of(model.output).items()})
    # The target run with autograd, and the gradient of each metric w.r.t. every site at once.
    calls_after = 1 + (extra["candidates"].shape[1] if extra["candidates"].shape[-1] > 1 else 0)
    out: dict[str, Any] = {"drops": []}
    for drop in drops:
        atp, base_vals = _target_pass(
            model, tgt_q, extra, components, layers, metrics, source_acts, remote, drop, calls_after
        )
        out["drops"].append(atp)
        if drop is None or "base" not in out:
            out["base"] = dict(base_vals)
    out["atp"] = out["drops"][0]
    out["source"] = dict(source_vals)
    return out


def _target_pass(
    model: CODIModel,
    tgt_q: list[str],
    extra: dict[str, Any],
    components: list[str],
    layers: list[int],
    metrics: list[str],
    source_acts: dict[str, torch.Tensor],
    remote: bool | str,
    drop: int | None,
    calls_after: int,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The target forward with autograd (block `drop` cut from the backward, if any) and the AtP products."""
    sched, K = model.schedule(), model.num_latent
    H = n_heads(model)
    read = _read_sites
    values_of = _metric_values
    target_inputs = model.prepare(tgt_q, **extra, keep_grad=True)
    with remote_errors(remote), model.trace(**target_inputs, **trace_kwargs(remote)) as tracer:
        acts = read(tracer, model, components, layers, K, sched, drop, calls_after, leaves=True)
        vals = values_of(model.output)
        names = list(acts)
        flat = [a for c in names for per_k in acts[c] for a in per_k]
        result: dict[str, Any] = {}
        for i, m in enumerate(metrics):
            v = vals[m]
            target = torch.where(torch.isfinite(v), v, torch.zeros_like(v)).sum()
            grads = torch.autograd.grad(target, flat, allow_unused=True, retain_graph=i < len(metrics) - 1)
            per_comp: dict[str, Any] = {}
            j = 0
            for c in names:
                rows = []
                for per_k in acts[c]:
                    cols = []
                    for a in per_k:
                        g = grads[j]
                        j += 1
                        cols.append(
                            torch.zeros_like(a[:, -1, :], dtype=torch.float64)
                            if g is None
                            else g[:, -1, :].to(torch.float64)
                        )
                    rows.append(torch.stack(cols, 1))
                grad = torch.stack(rows, 1)  # (R, n_layers, K, width)
                corrupted = torch.stack(
                    [torch.stack([a[:, -1, :].detach() for a in per_k], 1) for per_k in acts[c]], 1
                ).to(torch.float64)
                prod = (source_acts[c].to(grad.device) - corrupted) * grad
                if SITES[c].axis == "head":
                    prod = prod.reshape(*prod.shape[:-1], H, prod.shape[-1] // H)
                else:
                    prod = prod.unsqueeze(-2)
                per_comp[c] = prod.sum(-1).cpu()
            result[m] = per_comp
        atp = nnsight.save(result)
        base_vals = nnsight.save({m: v.detach().cpu() for m, v in vals.items()})
    return atp, base_vals


@dataclass(frozen=True)
class _AttributionContext:
    """What every batch of one attribution run shares (sent once to each worker)."""

    components: list[str]
    layers: list[int]
    metrics: list[str]
    direction: str
    remote: bool | str
    drops: list[int | None]


def attribution_batch(model: CODIModel, ctx: _AttributionContext, chunk: list[Any]) -> dict[str, Any]:
    """One batch of `attribution_sweeps` (the executors' unit of work; module level, so a Ray
    worker imports it by name)."""
    return _run_pair_batch(model, chunk, ctx.components, ctx.layers, ctx.metrics, ctx.direction, ctx.remote, ctx.drops)


def attribution_sweeps(
    model: CODIModel,
    pairs: Any,
    components: Sequence[str] = ("resid", "attn", "mlp", "latent", "head"),
    layers: Sequence[int] | None = None,
    positions: str = "each",
    direction: str = "denoise",
    metrics: Sequence[str] = ("logprob_diff", "logit_diff"),
    batch_size: int = 16,
    command: str | None = None,
    remote: bool | str = False,
    method: str = "atp",
    workers: int | Executor | None = None,
    ray_address: str | None = None,
) -> dict[str, xr.Dataset]:
    """AtP for several components from the same forward and backward passes: {component: Dataset}.

    Each Dataset has the layout `attribution_patching` returns for that component alone.
    `method="atp*"` adds one target forward and backward per decoder layer (GradDrop).
    `workers` / `ray_address` shard the batches over Ray workers, as `patch_sweep`'s do.
    """
    components = list(dict.fromkeys(components))
    bad = [c for c in components if c not in SITES]
    if bad:
        raise UserError(f"--component {bad[0]!r}: expected one of {', '.join(SITES)}")
    bad_m = [m for m in metrics if m not in ATP_METRICS]
    if bad_m or not metrics:
        raise UserError(f"metric {bad_m[0] if bad_m else ''!r}: expected some of {', '.join(ATP_METRICS)}")
    if positions not in ("each", "all"):
        raise UserError(f"--positions {positions!r}: expected one of all, each")
    if direction not in ("denoise", "noise"):
        raise UserError(f"--direction {direction!r}: expected one of denoise, noise")
    if method not in METHODS:
        raise UserError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if model.num_latent == 0:
        raise UserError("model has num_latent = 0: there are no CoT positions to patch")
    layers = list(range(model.n_layers)) if layers is None else [int(L) for L in layers]
    bad_l = [L for L in layers if not 0 <= L < model.n_layers]
    if bad_l or not layers:
        raise UserError(f"--layers: {bad_l[0] if bad_l else 'empty'} out of range 0-{model.n_layers - 1}")
    if int(batch_size) < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    pairs = list(pairs)
    if not pairs:
        raise UserError("no pairs to attribute")
    model.check_fits(pairs, extra=model.num_latent + 48)
    model.check_text(pairs)
    # The run layer: what computes the numbers (one small request when remote; refuses a server
    # with other weights), the recorded command (credentials scrubbed) and the start time.
    # Also the executor: Ray installed, a local backend, checked before any work.
    run_ = Run(model, remote, command, workers=workers, ray_address=ray_address)
    provenance = run_.provenance()
    start, command, remote = run_.start_time, run_.command, run_.remote
    drops: list[int | None] = [None] + (list(range(model.n_layers)) if method == "atp*" else [])
    chunks = _batches(model, pairs, int(batch_size))
    ctx = _AttributionContext(components, layers, list(metrics), direction, remote, drops)
    results: dict[int, dict[str, Any]] = {}
    with run_:
        run_.map(attribution_batch, ctx, chunks, results.__setitem__)
    parts = [results[i] for i in range(len(chunks))]  # batch order, wherever each batch ran
    atp = {m: {c: torch.cat([p["atp"][m][c] for p in parts]).numpy() for c in components} for m in metrics}
    if method == "atp*":
        denom = max(model.n_layers - 1, 1)
        for m in metrics:
            for c in components:
                dropped = [torch.cat([p["drops"][i][m][c] for p in parts]).numpy() for i in range(1, len(drops))]
                gd = np.sum([np.abs(d) for d in dropped], axis=0) / denom
                atp[f"{STAR}{m}"] = atp.get(f"{STAR}{m}", {})
                atp[f"{STAR}{m}"][c] = np.sign(atp[m][c]) * gd
    base = {m: torch.cat([p["base"][m] for p in parts]).numpy() for m in ATP_METRICS}
    source = {m: torch.cat([p["source"][m] for p in parts]).numpy() for m in ATP_METRICS}
    run = (start, command, method, provenance)
    return {
        c: _dataset(model, pairs, c, layers, positions, direction, metrics, atp, base, source, *run) for c in components
    }


def attribution_patching(
    model: CODIModel,
    pairs: Any,
    component: str | Sequence[str] = "resid",
    layers: Sequence[int] | None = None,
    positions: str = "each",
    direction: str = "denoise",
    metrics: Sequence[str] = ("logprob_diff", "logit_diff"),
    batch_size: int = 16,
    command: str | None = None,
    remote: bool | str = False,
    method: str = "atp",
    workers: int | Executor | None = None,
    ray_address: str | None = None,
) -> xr.Dataset:
    """Attribution patching: the first-order estimate of `patch_sweep` for every site.

    Args:
        model: a loaded `CODIModel`.
        pairs: a `PairSet` or sequence of pairs.
        component: a site of `sites.SITES`, or a list of them (adds a `component` dim, as the
            sweep does; `head` adds a `head` dim and goes on its own).
        layers: decoder blocks (default all; `latent` has the one layer 0).
        positions: `each` latent position (the `position` dim), or `all`: the sum over positions
            (the first-order estimate of patching every position at once).
        direction: `denoise` (gradient in the corrupted run, Δ = clean − corrupted) or `noise`
            (gradient in the clean run, Δ = corrupted − clean).
        metrics: which of `logprob_diff`, `logit_diff` to differentiate (one backward each).
        batch_size: pairs per forward/backward.
        command: recorded in the attrs.
        remote: nnsight's `remote=` (False, True for NDIF, a host URL, or "local").
        method: `atp` (plain AtP, the default) or `atp*`: AtP with the AtP* GradDrop correction
            (Kramár et al. 2024), which adds `atpstar_<metric>` (see the module docstring for the
            formula; the QK fix does not apply to these sites) at the cost of one more target
            forward and backward per decoder layer.
        workers: shard the batches over this many Ray workers (None or 1: this process); the
            result equals a one-process run on one torch thread bit for bit (docs/sharding.md).
        ray_address: run the workers on this existing Ray cluster.

    Returns:
        Dataset with dims `(pair, layer[, head][, position][, component])`, variables
        `atp_<metric>` (the estimated change of the target run's metric), per-pair
        `baseline_<metric>` / `source_<metric>` (the unpatched runs) and `comparable`; with
        `method="atp*"` also `atpstar_<metric>` (same dims).
    """
    comps = [component] if isinstance(component, str) else list(component)
    axis = next((c for c in comps if c in SITES and SITES[c].axis), None)
    if axis is not None and len(comps) > 1:
        raise UserError(f"--component {axis} adds a {SITES[axis].axis} dimension: attribute it on its own")
    parts = attribution_sweeps(
        model,
        pairs,
        comps,
        layers=layers,
        positions=positions,
        direction=direction,
        metrics=metrics,
        batch_size=batch_size,
        command=command,
        remote=remote,
        method=method,
        workers=workers,
        ray_address=ray_address,
    )
    if len(comps) == 1:
        return parts[comps[0]]
    site_vars = [n for n in parts[comps[0]].data_vars if n.startswith(("atp_", STAR))]
    per_pair = [n for n in parts[comps[0]].data_vars if n not in site_vars]
    ds = xr.concat(
        [parts[c] for c in comps],
        dim=xr.DataArray(comps, dims="component", name="component"),
        data_vars=site_vars,
        coords="minimal",
        compat="override",
        join="outer",
        combine_attrs="override",
    )
    ds = ds.transpose("pair", "layer", ..., "component")  # the sweep's order: component last
    for n in per_pair:
        ds[n] = parts[comps[0]][n]
    ds.attrs["component"] = ",".join(comps)
    return ds


def _dataset(
    model: CODIModel,
    pairs: list[Any],
    component: str,
    layers: list[int],
    positions: str,
    direction: str,
    metrics: Sequence[str],
    atp: dict[str, dict[str, np.ndarray]],
    base: dict[str, np.ndarray],
    source: dict[str, np.ndarray],
    start: str,
    command: str | None,
    method: str,
    provenance: dict[str, Any],
) -> xr.Dataset:
    """The labeled Dataset of one component (same dims and coordinates as the exact sweep's).

    `provenance`: `model.provenance(remote)` plus `remote`: what computed the numbers.
    """
    from .dataset import with_pair_coordinates

    site = SITES[component]
    layer_ids = layers if site.per_layer else [0]
    K = model.num_latent
    comparable = np.array([float(p.clean.answer != p.corrupted.answer) for p in pairs])
    keep = comparable > 0
    dims = ("pair", "layer") + (("head",) if site.axis else ()) + (("position",) if positions == "each" else ())
    data: dict[str, Any] = {}
    names = [(m, f"atp_{m}", m) for m in metrics]
    if method == "atp*":
        names += [(f"{STAR}{m}", f"{STAR}{m}", m) for m in metrics]
    for key, var, m in names:
        a = atp[key][component]  # (pair, layer, K, units)
        a = np.moveaxis(a, 2, 3)  # (pair, layer, units, K)
        if not site.axis:
            a = a[:, :, 0]
        if positions == "all":
            a = a.sum(-1)
        defined = keep & np.isfinite(base[m])
        a = np.where(defined.reshape((-1,) + (1,) * (a.ndim - 1)), a, np.nan)
        long_name, units = ATP_METRICS[m]
        if var != f"atp_{m}":
            long_name = (
                f"AtP* (GradDrop) score of {m}: sign(AtP) * sum over dropped layers l of |AtP with block l's "
                "residual contribution cut from the backward| / (n_layers - 1); ranks sites, not an effect size"
            )
        data[var] = (dims, a, {"long_name": long_name, "units": units})
    for m, (_, units) in ATP_METRICS.items():
        for run, vals in (("baseline", base[m]), ("source", source[m])):
            data[f"{run}_{m}"] = (
                "pair",
                np.where(keep, vals, np.nan),
                {"long_name": f"{m} of the unpatched {run} run", "units": units},
            )
    data["comparable"] = (
        "pair",
        comparable,
        {"long_name": "the clean and corrupted answers differ, so the metrics are defined", "units": "share"},
    )
    coords: dict[str, Any] = {
        "pair": np.array([p.pair_id for p in pairs], dtype=np.int64),
        "layer": np.array(layer_ids, dtype=np.int64),
    }
    if positions == "each":
        coords["position"] = ("position", np.arange(K, dtype=np.int64), {"long_name": "latent token index"})
    if site.axis:
        coords["head"] = ("head", np.arange(n_heads(model), dtype=np.int64), {"long_name": "attention head index"})
    ds = with_pair_coordinates(xr.Dataset(data, coords=coords), pairs)
    ds.attrs = {
        "codi_nnsight_schema": SCHEMA,
        "method": "attribution patching (AtP): (source - target activation) . d metric / d activation, "
        "gradient in the target run through prj and the latent loop"
        + (
            "; atpstar_*: AtP* GradDrop (Kramar et al. 2024), sign(AtP) * sum_l |AtP_drop l| / (L - 1)"
            if method == "atp*"
            else ""
        ),
        "atp_method": method,
        "model_name": model.name,
        "component": component,
        "positions": positions,
        "mode": "recurrent",
        "direction": direction,
        "metrics": ",".join(metrics),
        "layers": ",".join(map(str, layer_ids)),
        **provenance,
        "num_latent": K,
        "n_layers_model": model.n_layers,
        "head_dim": head_dim(model) if site.axis else 0,
        "command": command if command is not None else recorded_command(),
        "start_time": start,
        "end_time": now(),
    }
    return ds


# ---------------------------------------------------------------------------------------------
# Against the exact sweep
# ---------------------------------------------------------------------------------------------
def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-d arrays (NaN with fewer than 3 points or a constant one)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _top_recall(a: np.ndarray, e: np.ndarray, k: int) -> float:
    """Share of the k sites of largest |exact| effect that are among the k of largest |AtP|."""
    k = min(k, len(e))
    if k == 0:
        return float("nan")
    top_e = set(np.argsort(-np.abs(e), kind="stable")[:k].tolist())
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    return len(top_e & top_a) / k


def compare_with_exact(
    atp_ds: xr.Dataset, exact_ds: xr.Dataset, metric: str = "logprob_diff", k: int = 10, estimate: str = "atp"
) -> dict[str, dict[str, float]]:
    """How well AtP ranks the sites of an exact sweep, per component.

    `estimate`: `atp` compares `atp_<metric>`, `atpstar` the GradDrop score `atpstar_<metric>`
    (of `method="atp*"`).

    The exact effect of a site is `exact[metric] − exact["baseline_" + metric]` (what AtP
    estimates). Per component, over the sites (layer × position × head) both datasets hold:

    * `spearman` — rank correlation of the pair-mean AtP and the pair-mean exact effect;
    * `spearman_pairs` — rank correlation over every (pair, site) value;
    * `top_k_recall` — share of the k sites with the largest |pair-mean exact effect| that are
      among the k with the largest |pair-mean AtP|; `k` — that k (≤ the number of sites);
    * `n_sites`, `n_pairs`; `pearson` of the pair means, for scale.
    """
    effect = exact_ds[metric] - exact_ds[f"baseline_{metric}"]
    if estimate not in ("atp", "atpstar"):
        raise UserError(f"estimate {estimate!r}: expected atp or atpstar")
    atp = atp_ds[f"{estimate}_{metric}"]
    atp, effect = xr.align(atp, effect, join="inner")
    comps = list(atp["component"].values) if "component" in atp.dims else [str(atp_ds.attrs.get("component", ""))]
    out: dict[str, dict[str, float]] = {}
    for c in comps:
        a = atp.sel(component=c) if "component" in atp.dims else atp
        e = effect.sel(component=c) if "component" in effect.dims else effect
        site_dims = [d for d in a.dims if d != "pair"]
        am = a.mean("pair", skipna=True).transpose(*site_dims).values.ravel()
        em = e.mean("pair", skipna=True).transpose(*site_dims).values.ravel()
        ok = np.isfinite(am) & np.isfinite(em)
        ap = a.transpose("pair", *site_dims).values.ravel()
        ep = e.transpose("pair", *site_dims).values.ravel()
        okp = np.isfinite(ap) & np.isfinite(ep)
        kk = min(k, int(ok.sum()))
        pearson = float(np.corrcoef(am[ok], em[ok])[0, 1]) if ok.sum() >= 3 and np.ptp(am[ok]) > 0 else float("nan")
        out[str(c)] = {
            "spearman": _spearman(am[ok], em[ok]),
            "spearman_pairs": _spearman(ap[okp], ep[okp]),
            "top_k_recall": _top_recall(am[ok], em[ok], k),
            "k": kk,
            "pearson": pearson,
            "n_sites": int(ok.sum()),
            "n_pairs": int(np.isfinite(a.values).reshape(a.sizes["pair"], -1).any(1).sum()),
        }
    return out


@dataclass
class Verified:
    """`verify_top`'s answer: the layers checked, AtP and the exact sweep on them, and their comparison."""

    layers: list[int]
    atp: xr.Dataset
    exact: xr.Dataset
    comparison: dict[str, dict[str, float]]


def top_layers(atp_ds: xr.Dataset, n: int, metric: str = "logprob_diff") -> list[int]:
    """The n layers with the largest pair-mean |AtP| at any position (and head), in layer order."""
    a = np.abs(atp_ds[f"atp_{metric}"]).mean("pair", skipna=True)
    score = a.max([d for d in a.dims if d != "layer"]) if a.ndim > 1 else a
    order = np.argsort(-np.nan_to_num(score.values, nan=-1.0), kind="stable")[: max(1, int(n))]
    return sorted(int(atp_ds["layer"].values[i]) for i in order)


def verification_attrs(checked: Verified) -> dict[str, Any]:
    """`verify_top`'s result as netCDF attrs of the AtP Dataset (`verify_layers`, `verify_comparison` JSON)."""
    return {
        "verify_layers": ",".join(map(str, checked.layers)),
        "verify_comparison": json.dumps(checked.comparison, sort_keys=True),
    }


def verify_top(
    model: CODIModel, pairs: Any, atp_ds: xr.Dataset, n: int, metric: str = "logprob_diff", **sweep_kwargs: Any
) -> Verified:
    """Run the exact `patch_sweep` only on the n layers AtP ranks highest, and compare the two there.

    The sweep uses the AtP Dataset's component, positions and direction (one component;
    `sweep_kwargs` go to `patch_sweep`, e.g. `batch_size`).
    """
    from .sweep import patch_sweep

    comp = str(atp_ds.attrs["component"])
    if "," in comp:
        raise UserError("verify_top checks one component at a time: select one from the AtP Dataset")
    layers = top_layers(atp_ds, n, metric)
    exact = patch_sweep(
        model,
        pairs,
        layers=layers,
        component=comp,
        positions=str(atp_ds.attrs["positions"]),
        direction=str(atp_ds.attrs["direction"]),
        **sweep_kwargs,
    )
    atp = atp_ds.sel(layer=layers)
    return Verified(layers, atp, exact, compare_with_exact(atp, exact, metric))
