"""Activation patching at CODI's continuous-thought (CoT) positions, layer by layer.

One nnsight trace handles a batch of pairs. Its rows, per pair (denoise direction shown):

* `source`   — the clean run: the activations to copy come from here;
* `baseline` — the corrupted run, unpatched;
* `self`     — the corrupted run patched with its *own* baseline activations at every layer
  (sanity: must equal `baseline`);
* one row per variant (layer × [latent position]) — the corrupted run with the source's activation
  assigned in at that site.

Every row shares its question's prefill (one KV cache per question, `CODIModule(rows=...)`).
Because the source row runs in the same batch, "clean activation at layer L, latent step k" is
simply row `source` of that layer's output at that step: the trace assigns
`h[variant_rows] = h[source_rows]` while the model runs, so no second clean pass is needed and
later latents see the patched state (`recurrent` mode). In `frozen` mode the variant rows'
latent input embeddings are reset to the baseline's at every step, so only the patched
activation itself differs (its direct effect through attention).

Metrics are computed inside the trace on the device and only scalars leave it: this is what
lets the same code run remotely on NDIF.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..model.inference import decode, extract_answer_number, format_answer
from ..model.remote import remote_errors, trace_kwargs
from ..model.wrapper import CODIModel

log = logging.getLogger(__name__)

COMPONENTS = ("resid", "attn", "mlp", "latent")
POSITIONS = ("all", "each")
MODES = ("recurrent", "frozen")
DIRECTIONS = ("denoise", "noise")
ANSWER_PROMPT = "The answer is:"

#: Metric variables: name -> (long_name, units). Order = the order computed in the trace.
METRICS: dict[str, tuple[str, str]] = {
    "kl": ("KL(patched || baseline) at the answer position", "nats"),
    "l2": ("root-mean-square logit difference, patched vs baseline", "logits"),
    "top1_changed": ("top-1 prediction differs from baseline", "1"),
    "logit_diff": ("logit(clean answer first token) - logit(corrupted answer first token)", "logits"),
    "recovery": ("(patched - baseline) / (source - baseline) of logit_diff", "1"),
    "p_clean": ("probability of the clean answer's first token", "1"),
    "p_corrupted": ("probability of the corrupted answer's first token", "1"),
    "logp_clean_answer": ("teacher-forced log-probability of the clean answer", "nats"),
    "logp_corrupted_answer": ("teacher-forced log-probability of the corrupted answer", "nats"),
    "answer": ("greedy-decoded answer after patching", "1"),
    "flipped": ("patched answer equals the source run's true answer", "1"),
}
#: Columns computed inside the trace, per row.
TRACE_COLUMNS = ("kl", "l2", "top1_changed", "logit_diff", "p_clean", "p_corrupted",
                 "logp_clean_answer", "logp_corrupted_answer")
#: Answer metrics also stored per pair for the unpatched baseline and source runs.
ANSWER_COLUMNS = ("p_clean", "p_corrupted", "logp_clean_answer", "logp_corrupted_answer")


@dataclass
class SweepConfig:
    """What a sweep patches; everything that must match for `--resume` to mix results."""

    layers: list[int]
    component: str = "resid"
    positions: str = "all"
    mode: str = "recurrent"
    direction: str = "denoise"
    max_new_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, model: CODIModel) -> None:
        """Clear one-line errors for values the model cannot take."""
        for name, value, allowed in (("component", self.component, COMPONENTS),
                                     ("positions", self.positions, POSITIONS),
                                     ("mode", self.mode, MODES), ("direction", self.direction, DIRECTIONS)):
            if value not in allowed:
                raise UserError(f"--{name} {value!r}: expected one of {', '.join(allowed)}")
        if self.component == "latent":
            self.layers = [0]
        if not self.layers:
            raise UserError("--layers: empty layer list")
        bad = [L for L in self.layers if not 0 <= L < model.n_layers]
        if bad:
            raise UserError(f"--layers: layer {bad[0]} out of range (model has {model.n_layers} layers, "
                            f"0-{model.n_layers - 1})")
        if model.num_latent == 0:
            raise UserError("model has num_latent = 0: there are no CoT positions to patch")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the partial store and the results attrs)."""
        return asdict(self)


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """`"0-3,7"` → [0, 1, 2, 3, 7]; None/"all" → every layer. Errors name the bad piece."""
    if text is None or text.strip() in ("", "all"):
        if text is not None and text.strip() == "":
            raise UserError("--layers: empty layer list")
        return list(range(n_layers))
    out: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if "-" in piece[1:]:
                a, b = piece.split("-", 1) if not piece.startswith("-") else ("-" + piece[1:].split("-")[0], "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(piece))
        except ValueError:
            raise UserError(f"--layers: cannot read {piece!r} (expected e.g. 0-3,7)") from None
    return sorted(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------
# Answer tokens
# ---------------------------------------------------------------------------------------------
@dataclass
class AnswerTokens:
    """Teacher-forcing layout of one pair: shared suffix, and each answer's tokens."""

    suffix: list[int]  # [eot] + "The answer is:" + whitespace tokens before the number
    clean: list[int]
    corrupted: list[int]


def answer_tokens(model: CODIModel, clean_answer: float, corrupted_answer: float) -> AnswerTokens:
    """Split `The answer is: X` into the prompt (+ whitespace-only tokens) and X's tokens.

    The answer position is the last suffix position: its next-token distribution predicts the
    first digit-bearing token of the answer.
    """
    tok = model.tokenizer
    prompt = list(tok(ANSWER_PROMPT, add_special_tokens=False).input_ids)
    parts = []
    for value in (clean_answer, corrupted_answer):
        full = list(tok(f"{ANSWER_PROMPT} {format_answer(value)}", add_special_tokens=False).input_ids)
        n = 0
        while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
            n += 1
        if n < len(prompt) - 1:
            raise UserError(f"tokenizer merges the answer prompt {ANSWER_PROMPT!r} with the answer "
                            f"{format_answer(value)!r}; cannot find the answer position")
        head, rest = full[:n], full[n:]
        while rest and tok.decode([rest[0]]).strip() == "":
            head.append(rest.pop(0))
        if not rest:
            raise UserError(f"answer {format_answer(value)!r} tokenizes to whitespace only")
        parts.append((head, rest))
    if parts[0][0] != parts[1][0]:
        raise UserError(f"answers {format_answer(clean_answer)!r} and {format_answer(corrupted_answer)!r} "
                        "put different tokens before the number; the answer position is ambiguous")
    return AnswerTokens(model.codi.eot_ids() + parts[0][0], parts[0][1], parts[1][1])


# ---------------------------------------------------------------------------------------------
# The batched trace
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """Row layout and patch plan of one traced batch (see module docstring)."""

    inputs: dict[str, Any]
    source_rows: list[int]
    baseline_rows: list[int]
    self_rows: list[int]
    variant_rows: list[list[int]]  # per pair, in variant order
    variants: list[tuple[int, int]]  # (layer, position or -1)
    # Per call-step plan: {(layer, step): (dst, src)} for layer sites, {step: (dst, src)} for prj.
    layer_plan: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    prj_plan: dict[int, tuple[torch.Tensor, torch.Tensor]]
    tokens: list[AnswerTokens]
    prefill_calls: int = 1  # 2 when the pairs' shared question prefixes are prefilled first
    baseline_of: list[int] = field(default_factory=list)  # every row's unpatched baseline row


#: Share a pair's common question prefix when it saves at least this many tokens per pair.
MIN_SHARED_PREFIX = 4


def prompt_inputs(model: CODIModel, questions: list[str]) -> tuple[dict[str, Any], int]:
    """Model inputs for consecutive (source, target) question pairs, and the prefill call count.

    A clean question and its corrupted twin agree up to the changed number, so their common
    token prefix is prefilled once per pair (`prefix_ids`) and only the rests per question.
    """
    from ..model.wrapper import left_pad

    seqs = [model.encode_question(q) for q in questions]
    shared = []
    for a, b in zip(seqs[0::2], seqs[1::2]):
        n = 0
        limit = min(len(a), len(b)) - 1  # keep at least [bot] in each rest
        while n < limit and a[n] == b[n]:
            n += 1
        shared.append(n)
    if not shared or sum(shared) < MIN_SHARED_PREFIX * len(shared):
        return left_pad(seqs, model.codi.pad_id), 1
    prefixes = [seqs[2 * i][:n] for i, n in enumerate(shared)]
    rests = [s[shared[i // 2]:] for i, s in enumerate(seqs)]
    pre = left_pad(prefixes, model.codi.pad_id)
    return {**left_pad(rests, model.codi.pad_id), "prefix_ids": pre["input_ids"],
            "prefix_mask": pre["attention_mask"],
            "prompt_prefix": torch.arange(len(seqs)) // 2}, 2


def variants_of(cfg: SweepConfig, num_latent: int) -> list[tuple[int, int]]:
    """(layer, position) of every patched variant; position -1 = all CoT positions."""
    positions = [-1] if cfg.positions == "all" else list(range(num_latent))
    return [(L, p) for L in cfg.layers for p in positions]


def plan_batch(model: CODIModel, pairs: Sequence[Any], cfg: SweepConfig) -> BatchPlan:
    """Lay out the rows of one batch and the (destination, source) index of every patch."""
    K = model.num_latent
    variants = variants_of(cfg, K)
    questions: list[str] = []
    rows: list[int] = []  # prompt index of every row
    row_pair: list[int] = []  # pair (within the batch) of every row
    src_rows, base_rows, self_rows, var_rows = [], [], [], []
    tokens = []
    for pair in pairs:
        src_q, tgt_q = (pair.clean, pair.corrupted) if cfg.direction == "denoise" else (pair.corrupted, pair.clean)
        p_src, p_tgt = len(questions), len(questions) + 1
        questions += [src_q.question, tgt_q.question]
        src_rows.append(len(rows))
        rows.append(p_src)
        base_rows.append(len(rows))
        rows.append(p_tgt)
        self_rows.append(len(rows))
        rows.append(p_tgt)
        var_rows.append(list(range(len(rows), len(rows) + len(variants))))
        rows += [p_tgt] * len(variants)
        row_pair += [len(tokens)] * (len(rows) - len(row_pair))
        tokens.append(answer_tokens(model, pair.clean.answer, pair.corrupted.answer))
    if len({tuple(t.suffix) for t in tokens}) != 1:
        raise UserError("pairs in one batch need the same answer prompt tokens; use --batch-size 1")

    enc, prefill_calls = prompt_inputs(model, questions)
    # Patch plan: which rows take which source row, per site and call.
    layer_dst: dict[tuple[int, int], list[int]] = {}
    layer_src: dict[tuple[int, int], list[int]] = {}
    prj_dst: dict[int, list[int]] = {}
    prj_src: dict[int, list[int]] = {}

    def add(dst_map, src_map, key, dst, src):
        dst_map.setdefault(key, []).append(dst)
        src_map.setdefault(key, []).append(src)

    for i in range(len(pairs)):
        for (L, p), row in zip(variants, var_rows[i]):
            for k in range(K):  # latent position k is layer call k+1 and prj call k
                patched = p in (-1, k)
                if cfg.component == "latent":
                    if patched:
                        add(prj_dst, prj_src, k, row, src_rows[i])
                    elif cfg.mode == "frozen":
                        add(prj_dst, prj_src, k, row, base_rows[i])
                    continue
                if patched:
                    add(layer_dst, layer_src, (L, k + prefill_calls), row, src_rows[i])
                if cfg.mode == "frozen" and k > 0:
                    add(prj_dst, prj_src, k, row, base_rows[i])
        for L in (cfg.layers if cfg.component != "latent" else []):
            for k in range(K):
                add(layer_dst, layer_src, (L, k + prefill_calls), self_rows[i], base_rows[i])
        if cfg.component == "latent":
            for k in range(K):
                add(prj_dst, prj_src, k, self_rows[i], base_rows[i])

    def tensors(dst_map, src_map):
        return {key: (torch.tensor(dst_map[key]), torch.tensor(src_map[key])) for key in dst_map}

    n_cand = max(max(len(t.clean), len(t.corrupted)) for t in tokens)
    cands = torch.full((len(rows), 2, n_cand), -1, dtype=torch.long)
    for r, i in enumerate(row_pair):
        cands[r, 0, : len(tokens[i].clean)] = torch.tensor(tokens[i].clean)
        cands[r, 1, : len(tokens[i].corrupted)] = torch.tensor(tokens[i].corrupted)
    max_new = cfg.max_new_tokens or (n_cand + 3)
    inputs = {**enc, "rows": torch.tensor(rows), "suffix_ids": torch.tensor(tokens[0].suffix),
              "candidates": cands, "max_new_tokens": max_new}
    return BatchPlan(inputs, src_rows, base_rows, self_rows, var_rows, variants,
                     tensors(layer_dst, layer_src), tensors(prj_dst, prj_src), tokens, prefill_calls,
                     [base_rows[i] for i in row_pair])


def run_batch(model: CODIModel, plan: BatchPlan, cfg: SweepConfig, remote: bool | str = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """Run one planned batch in a single nnsight trace.

    Returns (metrics (rows, len(TRACE_COLUMNS)) float64, generated ids (rows, N)). The trace body
    uses only torch and nnsight, so it runs unchanged on an NDIF server.
    """
    K = model.num_latent
    first = plan.prefill_calls  # decoder call of latent position 0
    sites = {L: model.sublayer(L, cfg.component) for L in cfg.layers} if cfg.component != "latent" else {}
    layer_plan, prj_plan = plan.layer_plan, plan.prj_plan
    baseline_of = torch.tensor(plan.baseline_of)
    if not remote and model.device is not None and model.device.type != "cpu":
        # Index tensors on the device up front: CPU indices into CUDA tensors cost a copy per patch.
        dev = model.device
        layer_plan = {k: (d.to(dev), s.to(dev)) for k, (d, s) in layer_plan.items()}
        prj_plan = {k: (d.to(dev), s.to(dev)) for k, (d, s) in prj_plan.items()}
        baseline_of = baseline_of.to(dev)
    layers = sorted(sites)
    prj = model.prj
    with remote_errors(remote), model.trace(**plan.inputs, **trace_kwargs(remote)) as tracer:
        if 0 in prj_plan:  # prj call 0 happens before the first latent layer call
            e = prj.output
            e[prj_plan[0][0]] = e[prj_plan[0][1]]
        if layers:
            # Every (layer, step) has at least the self row's patch, so each step's first request
            # is a layer output pinned to decoder call `step`; the prj request after it is
            # relaxed and binds to the next prj call, which makes latent position k's input.
            for step in tracer.iter[first:first + K]:
                for L in layers:
                    if (L, step) in layer_plan:
                        out = sites[L].output
                        h = out[0] if isinstance(out, tuple) else out
                        dst, src = layer_plan[(L, step)]
                        h[dst] = h[src]
                k = step - first + 1
                if k < K and k in prj_plan:
                    e = prj.output
                    e[prj_plan[k][0]] = e[prj_plan[k][1]]
        else:  # the latent component: only prj calls 1 .. K-1 (call 0 was handled above)
            for k in tracer.iter[1:K]:
                if k in prj_plan:
                    e = prj.output
                    e[prj_plan[k][0]] = e[prj_plan[k][1]]
        result = model.output
        logits = result["logits"].to(torch.float64)
        logp = torch.log_softmax(logits, dim=-1)
        base = baseline_of.to(logits.device)
        base_logp = logp[base]
        kl = (logp.exp() * (logp - base_logp)).sum(-1)
        l2 = (logits - logits[base]).pow(2).mean(-1).sqrt()
        top1 = (logits.argmax(-1) != logits[base].argmax(-1)).to(torch.float64)
        first = result["candidate_first"]
        lc = logits.gather(1, first[:, :1]).squeeze(1)
        lx = logits.gather(1, first[:, 1:2]).squeeze(1)
        same = first[:, 0] == first[:, 1]
        ld = torch.where(same, torch.full_like(lc, float("nan")), lc - lx)
        pc = logp.gather(1, first[:, :1]).squeeze(1).exp()
        px = logp.gather(1, first[:, 1:2]).squeeze(1).exp()
        cand = result["candidate_logprobs"].to(torch.float64)
        metrics = torch.stack([kl, l2, top1, ld, pc, px, cand[:, 0], cand[:, 1]], dim=1).cpu().save()
        generated = result["generated"].cpu().save()
    return torch.as_tensor(metrics).numpy(), torch.as_tensor(generated).numpy()


# ---------------------------------------------------------------------------------------------
# From rows to the Dataset
# ---------------------------------------------------------------------------------------------
def batch_dataset(model: CODIModel, pairs: Sequence[Any], cfg: SweepConfig, plan: BatchPlan,
                  metrics: np.ndarray, generated: np.ndarray) -> Any:
    """Assemble the per-batch `xarray.Dataset` (schema in docs/results-schema.md)."""
    import xarray as xr

    col = {name: i for i, name in enumerate(TRACE_COLUMNS)}
    K = model.num_latent
    layers = cfg.layers
    each = cfg.positions == "each"
    shape = (len(pairs), len(layers)) + ((K,) if each else ())
    data = {name: np.full(shape, np.nan) for name in METRICS}
    per_pair: dict[str, list[float]] = {k: [] for k in (
        "clean_predicted", "corrupted_predicted", "clean_correct", "corrupted_correct",
        "baseline_logit_diff", "target_logit_diff", "self_patch_kl", "self_patch_l2",
        *(f"{run}_{name}" for run in ("baseline", "source") for name in ANSWER_COLUMNS))}
    answers = [[extract_answer_number(decode(model, g)) for g in generated]]
    parsed = answers[0]
    min_kl = math.inf
    for i, pair in enumerate(pairs):
        src, base, selfr = plan.source_rows[i], plan.baseline_rows[i], plan.self_rows[i]
        src_answer = (pair.clean if cfg.direction == "denoise" else pair.corrupted).answer
        b_ld, s_ld = metrics[base, col["logit_diff"]], metrics[src, col["logit_diff"]]
        for (L, p), row in zip(plan.variants, plan.variant_rows[i]):
            idx = (i, layers.index(L)) + ((p,) if each else ())
            for name in TRACE_COLUMNS:
                data[name][idx] = metrics[row, col[name]]
            ld = metrics[row, col["logit_diff"]]
            denom = s_ld - b_ld
            data["recovery"][idx] = (ld - b_ld) / denom if denom != 0 and np.isfinite(denom) else np.nan
            value = parsed[row]
            data["answer"][idx] = np.nan if value is None else value
            data["flipped"][idx] = float(value is not None and value == src_answer)
            min_kl = min(min_kl, float(metrics[row, col["kl"]]))
        clean_row, corrupted_row = (src, base) if cfg.direction == "denoise" else (base, src)
        for name, row, truth in (("clean", clean_row, pair.clean.answer),
                                 ("corrupted", corrupted_row, pair.corrupted.answer)):
            value = parsed[row]
            per_pair[f"{name}_predicted"].append(np.nan if value is None else value)
            per_pair[f"{name}_correct"].append(float(value is not None and value == truth))
        per_pair["baseline_logit_diff"].append(float(b_ld))
        per_pair["target_logit_diff"].append(float(s_ld))
        for name in ANSWER_COLUMNS:  # the unpatched runs' own values, for reference
            per_pair[f"baseline_{name}"].append(float(metrics[base, col[name]]))
            per_pair[f"source_{name}"].append(float(metrics[src, col[name]]))
        per_pair["self_patch_kl"].append(float(metrics[selfr, col["kl"]]))
        per_pair["self_patch_l2"].append(float(metrics[selfr, col["l2"]]))
    dims = ("pair", "layer") + (("position",) if each else ())
    coords: dict[str, Any] = {"pair": np.array([p.pair_id for p in pairs], dtype=np.int64),
                              "layer": np.array(layers, dtype=np.int64)}
    if each:
        coords["position"] = np.arange(K, dtype=np.int64)
    ds = xr.Dataset({name: (dims, arr, {"long_name": METRICS[name][0], "units": METRICS[name][1]})
                     for name, arr in data.items()}, coords=coords)
    pair_units = {"clean_predicted": "1", "corrupted_predicted": "1", "clean_correct": "1",
                  "corrupted_correct": "1", "baseline_logit_diff": "logits", "target_logit_diff": "logits",
                  "self_patch_kl": "nats", "self_patch_l2": "logits"}
    for name, values in per_pair.items():
        run, _, metric = name.partition("_")
        units = pair_units.get(name) or METRICS[metric][1]
        long_name = (f"{METRICS[metric][0]} — unpatched {run} run" if metric in ANSWER_COLUMNS
                     and run in ("baseline", "source") else name.replace("_", " "))
        ds[name] = ("pair", np.array(values, dtype=np.float64), {"long_name": long_name, "units": units})
    ds = ds.assign_coords(pair_coords(pairs))
    ds.attrs["min_kl"] = min_kl
    return ds


def pair_coords(pairs: Sequence[Any]) -> dict[str, Any]:
    """Per-pair metadata coordinates (questions, answers, reasoning steps, numeric metadata)."""
    coords: dict[str, Any] = {
        "question_clean": ("pair", np.array([p.clean.question for p in pairs], dtype=object)),
        "question_corrupted": ("pair", np.array([p.corrupted.question for p in pairs], dtype=object)),
        "answer_clean": ("pair", np.array([float(p.clean.answer) for p in pairs])),
        "answer_corrupted": ("pair", np.array([float(p.corrupted.answer) for p in pairs])),
    }
    steps = []
    for p in pairs:
        s = p.clean.meta.get("reasoning_steps", p.corrupted.meta.get("reasoning_steps"))
        steps.append(int(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else -1)
    coords["reasoning_steps"] = ("pair", np.array(steps, dtype=np.int64))
    return coords


# ---------------------------------------------------------------------------------------------
# Sanity checks
# ---------------------------------------------------------------------------------------------
FULL_PATCH_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def full_patch_check(model: CODIModel, pairs: Sequence[Any], remote: bool | str = False,
                     skip_question: bool = False) -> dict[str, Any]:
    """Patch `resid` at every position of every token (layer 0) on an equal-length pair.

    The corrupted run must then reproduce the clean run's answer-position logits. Returns
    {"max_abs": float (NaN if no equal-length pair), "pair_id": id or None}. `skip_question`
    leaves the question tokens unpatched — a deliberately incomplete patch that must fail.
    """
    # The shortest equal-length pair: the check costs one more (small) trace per sweep.
    equal = [(len(model.encode_question(p.clean.question)), i) for i, p in enumerate(pairs)
             if len(model.encode_question(p.clean.question)) == len(model.encode_question(p.corrupted.question))]
    pair = pairs[min(equal)[1]] if equal else None
    if pair is None:
        return {"max_abs": float("nan"), "pair_id": None}
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    K = model.num_latent
    inputs, first = prompt_inputs(model, [pair.clean.question, pair.corrupted.question])
    inputs = {**inputs, "suffix_ids": torch.tensor(toks.suffix)}
    # With a shared prefix (call 0), both questions already share those positions' states, so
    # patching from the first call that differs — the rest of the question — covers every token.
    # Layer 0 is the strictest case: every later layer is recomputed from the patched state.
    block = model.layers[0]
    with remote_errors(remote), model.trace(**inputs, **trace_kwargs(remote)) as tracer:
        for _step in tracer.iter[first - (0 if skip_question else 1):first + K + 1]:  # question, latents, suffix
            out = block.output
            h = out[0] if isinstance(out, tuple) else out
            h[1] = h[0]
        logits = model.output["logits"].to(torch.float64).cpu().save()
    logits = torch.as_tensor(logits)
    return {"max_abs": float((logits[1] - logits[0]).abs().max()), "pair_id": int(pair.pair_id)}


def sanity_attrs(ds: Any, full: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Sanity-check results for the Dataset attrs (netCDF-safe types)."""
    self_kl = float(np.nanmax(np.abs(ds["self_patch_kl"].values))) if ds.sizes["pair"] else 0.0
    min_kl = float(np.nanmin(ds["kl"].values)) if np.isfinite(ds["kl"].values).any() else 0.0
    tol = FULL_PATCH_TOL.get(dtype, 1e-4)
    checks = {
        "self_patch": {"value": self_kl, "threshold": 1e-6, "passed": self_kl <= 1e-6},
        "kl_nonnegative": {"value": min_kl, "threshold": -1e-7, "passed": min_kl >= -1e-7},
        "full_patch": {"value": full["max_abs"], "threshold": tol, "pair_id": full["pair_id"],
                       "passed": bool(math.isnan(full["max_abs"]) or full["max_abs"] <= tol)},
    }
    return {
        "sanity_self_patch_max_kl": self_kl,
        "sanity_min_kl": min_kl,
        "sanity_full_patch_max_abs": float(full["max_abs"]),
        "sanity_passed": int(all(c["passed"] for c in checks.values())),
        "sanity_details": json.dumps(checks),
    }
