"""Planning one traced batch: answer tokens, shared prompts, the row layout and every patch.

Rows of a batch, per pair (denoise shown; noise swaps clean and corrupted):

* `source`   — the clean run: the activations to copy come from here;
* `baseline` — the corrupted run, unpatched;
* `self`     — the corrupted run patched with its *own* baseline activations at every patched
  site (sanity: must equal `baseline`);
* one row per variant (layer × [position]) — the corrupted run with the source's activation
  assigned in at that site;
* at most one `full-patch` row per sweep (`plan_batch(full_patch=...)`): the sanity check of
  `trace.full_patch_check` carried by the batch that holds its pair — a copy of the target
  question whose layer-0 block output takes the source's at every token (question, latents,
  suffix), so its answer-position logits must equal the source row's. Carried here it costs one
  prompt and one row, not a second trace with its own prefill.

Every row shares its question's prefill (one KV cache per question, `CODIModule(rows=...)`).
Because the source row runs in the same batch, "clean activation at layer L, latent token k" is
row `source` of that site's output at that call: the trace assigns `h[dst] = h[src]` while the
model runs, so no second clean pass is needed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError
from ..model.inference import format_answer
from ..model.schedule import CallSchedule
from ..model.wrapper import CODIModel, left_pad
from .config import SweepConfig

#: CODI's answer prompt (each method's own is `model.method.answer_prompt`).
ANSWER_PROMPT = "The answer is:"
#: Greedy tokens decoded after the prompt, beyond the longer of a pair's two answers.
DECODE_MARGIN = 3


@dataclass
class AnswerTokens:
    """Teacher-forcing layout of one pair: shared suffix, and each answer's tokens."""

    suffix: list[int]  # [eot] + "The answer is:" + whitespace tokens before the number
    clean: list[int]
    corrupted: list[int]


def answer_tokens(model: CODIModel, clean_answer: float, corrupted_answer: float) -> AnswerTokens:
    """Split `<answer prompt> X` (CODI: `The answer is: X`) into the prompt (+ whitespace-only tokens) and X's tokens.

    The answer position is the last suffix position: its next-token distribution predicts the
    first non-whitespace token of the answer ("-" for a negative number).
    """
    tok = model.tokenizer
    answer_prompt = model.method.answer_prompt  # the method's own ("The answer is:" for CODI)
    prompt = list(tok(answer_prompt, add_special_tokens=False).input_ids)
    parts = []
    for value in (clean_answer, corrupted_answer):
        full = list(tok(f"{answer_prompt} {format_answer(value)}", add_special_tokens=False).input_ids)
        n = 0
        while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
            n += 1
        if n < len(prompt) - 1:
            raise UserError(
                f"tokenizer merges the answer prompt {answer_prompt!r} with the answer "
                f"{format_answer(value)!r}; cannot find the answer position"
            )
        head, rest = full[:n], full[n:]
        while rest and tok.decode([rest[0]]).strip() == "":
            head.append(rest.pop(0))
        if not rest:
            raise UserError(f"answer {format_answer(value)!r} tokenizes to whitespace only")
        parts.append((head, rest))
    if parts[0][0] != parts[1][0]:
        raise UserError(
            f"answers {format_answer(clean_answer)!r} and {format_answer(corrupted_answer)!r} "
            "put different tokens before the number; the answer position is ambiguous"
        )
    return AnswerTokens(model.codi.eot_ids() + parts[0][0], parts[0][1], parts[1][1])


#: Share a pair's common question prefix when it saves at least this many tokens per pair.
MIN_SHARED_PREFIX = 4


def prompt_inputs(model: CODIModel, questions: list[str], share: bool = True) -> tuple[dict[str, Any], int]:
    """Model inputs for consecutive (source, target) question pairs, and the prefill call count.

    A clean question and its corrupted twin agree up to the changed number, so their common
    token prefix is prefilled once per pair (`prefix_ids`) and only the rests per question.
    `share=False` prefills every question whole, in one call (a sweep that patches question
    tokens needs each of them in that call).
    """
    seqs = [model.encode_question(q) for q in questions]
    if not share:
        return left_pad(seqs, model.codi.pad_id), 1
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
    rests = [s[shared[i // 2] :] for i, s in enumerate(seqs)]
    pre = left_pad(prefixes, model.codi.pad_id)
    return {
        **left_pad(rests, model.codi.pad_id),
        "prefix_ids": pre["input_ids"],
        "prefix_mask": pre["attention_mask"],
        "prompt_prefix": torch.arange(len(seqs)) // 2,
    }, 2


@dataclass
class BatchPlan:
    """Row layout and patch plan of one traced batch (see module docstring)."""

    inputs: dict[str, Any]
    schedule: CallSchedule
    source_rows: list[int]
    baseline_rows: list[int]
    self_rows: list[int]
    variant_rows: list[list[int]]  # per pair, in variant order
    variants: list[tuple[int, int, int]]  # (layer, position or -1, unit or -1)
    tokens: list[AnswerTokens]
    row_pair: list[int]  # the pair (index within the batch) of every row
    decode_limit: list[int]  # greedy tokens kept per row: depends on its own pair only, never the batch
    # {(layer, decoder call): (dst rows, src rows)} for layer sites, {prj call: (dst, src)} for prj outputs.
    layer_plan: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    prj_plan: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Every other patch, {(layer or "prj", call): [(kind, slice of the last dim, dst rows, payload), ...]}:
    # kind "copy" (payload: src rows; per-head slices), "set" (payload: values (n|1, 1, width)) or
    # "norm" (payload: unit directions (n, 1, width), scaled to the replaced activation's norm).
    extra_plan: dict[tuple[Any, int], list[tuple[str, slice, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    donor_rows: list[int] = field(default_factory=list)  # resample ablation: the donor question's run
    # block-thought-attention mode: per pair, per variant, the fully patched helper row whose
    # fed-back embedding the variant row takes (not part of the Dataset).
    helper_rows: list[list[int]] = field(default_factory=list)
    # The full-patch check (not part of the Dataset): its row, and per decoder call the layer-0
    # block output rows (dst, src) it copies — prompts at the question's call, rows after it.
    full_patch_row: int | None = None
    full_patch_plan: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # positions="sequence": per pair, the variant indices whose token the pair does not have (a
    # question or answer prompt shorter than the axis): their rows run unpatched, their values are NaN.
    absent: list[set[int]] = field(default_factory=list)
    # positions="sequence": per pair, the prompt each question-token variant row continues (its own
    # copy of the target question, patched in the question's call), by variant index.
    token_prompts: list[dict[int, int]] = field(default_factory=list)
    source_prompts: list[int] = field(default_factory=list)  # per pair: its source question's prompt
    # positions="sequence": per pair, the source offset each target question offset is patched from.
    source_offsets: list[dict[int, int | None]] = field(default_factory=list)
    prompt_width: int = 0  # the question call's padded width T (a prompt's last token is T - 1)

    @property
    def baseline_of(self) -> list[int]:
        """Every row's unpatched baseline row."""
        return [self.baseline_rows[i] for i in self.row_pair]

    @property
    def source_of(self) -> list[int]:
        """Every row's source row."""
        return [self.source_rows[i] for i in self.row_pair]


def plan_batch(
    model: CODIModel,
    pairs: Sequence[Any],
    cfg: SweepConfig,
    donors: Sequence[str] | None = None,
    ablation_values: AblationValues | None = None,
    full_patch: int | None = None,
) -> BatchPlan:
    """Lay out the rows of one batch and the (destination, source) rows of every patch.

    `donors` (resample ablation): the question each pair's activations are resampled from.
    `ablation_values`: reference means and noise seeds of the other ablations (see `ablation_values`).
    `full_patch`: index (in `pairs`) of an equal-length pair to carry the full-patch check
    (see `carries_full_patch` for the configurations that can).
    """
    variants = cfg.variants(model)
    questions: list[str] = []
    rows: list[int] = []  # prompt index of every row
    plan = BatchPlan({}, model.schedule(), [], [], [], [], variants, [], [], [])
    for i, pair in enumerate(pairs):
        src_q, tgt_q = (pair.clean, pair.corrupted) if cfg.direction == "denoise" else (pair.corrupted, pair.clean)
        p_src, p_tgt = len(questions), len(questions) + 1
        plan.source_prompts.append(p_src)
        questions += [src_q.question, tgt_q.question]
        for kind, prompt in (("source", p_src), ("baseline", p_tgt), ("self", p_tgt)):
            getattr(plan, f"{kind}_rows").append(len(rows))
            rows.append(prompt)
        if cfg.ablation == "resample":
            # The donor gets its own prompt (appended after the pair prompts below, so that
            # consecutive (source, target) prompts keep sharing their prefix).
            plan.donor_rows.append(len(rows))
            rows.append(-1 - i)
        plan.variant_rows.append(list(range(len(rows), len(rows) + len(variants))))
        if cfg.positions == "sequence":
            rows += _sequence_rows(plan, model, cfg, pair, tgt_q, p_tgt, questions)
        else:
            rows += [p_tgt] * len(variants)
        if cfg.mode == "block-thought-attention":
            plan.helper_rows.append(list(range(len(rows), len(rows) + len(variants))))
            rows += [p_tgt] * len(variants)
        plan.row_pair += [i] * (len(rows) - len(plan.row_pair))
        plan.tokens.append(answer_tokens(model, pair.clean.answer, pair.corrupted.answer))
    if len({tuple(t.suffix) for t in plan.tokens}) != 1:
        raise UserError("pairs in one batch need the same answer prompt tokens; use --batch-size 1")
    if cfg.ablation == "resample":
        if donors is None or len(donors) != len(pairs):
            raise ValueError("the resample ablation needs one donor question per pair")
        # Donor prompts go in pairs (donor, donor) so the shared-prefix layout of the prompts holds.
        first = len(questions)
        for d in donors:
            questions += [d, d]
        rows = [first + 2 * (-1 - r) if r < 0 else r for r in rows]
    enc, prefill_calls = prompt_inputs(model, questions, share=cfg.positions != "sequence")
    plan.prompt_width = int(enc["input_ids"].shape[1])
    plan.schedule = model.schedule(prefill_calls)
    if full_patch is not None:
        rows = _add_full_patch(plan, cfg, model, enc, rows, full_patch)
    _plan_patches(plan, cfg, model, ablation_values)
    limits = [cfg.max_new_tokens or (max(len(t.clean), len(t.corrupted)) + DECODE_MARGIN) for t in plan.tokens]
    plan.decode_limit = [limits[i] for i in plan.row_pair]
    plan.inputs = {
        **enc,
        "rows": torch.tensor(rows),
        "suffix_ids": torch.tensor(plan.tokens[0].suffix),
        "candidates": _candidates(plan),
        "max_new_tokens": max(plan.decode_limit),
    }
    return plan


def carries_full_patch(cfg: SweepConfig) -> bool:
    """Whether a batch of this configuration can carry the full-patch check.

    The check's row only needs layer-0 block outputs; configurations that also patch `prj`
    (the latent site, and every mode but `recurrent`) iterate `prj` calls in the trace,
    and run the check as its own trace instead.
    """
    return cfg.site.per_layer and cfg.mode == "recurrent"


def _add_full_patch(
    plan: BatchPlan, cfg: SweepConfig, model: CODIModel, enc: dict[str, Any], rows: list[int], i: int
) -> list[int]:
    """Append the full-patch prompt and row for pair `i` (see the module docstring); new `rows`."""
    if not carries_full_patch(cfg):
        raise ValueError(f"a {cfg.mode} sweep of {cfg.component!r} cannot carry the full-patch check")
    p_src = plan.source_prompts[i]
    p_tgt = p_src + 1
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if int(mask[p_src].sum()) != int(mask[p_tgt].sum()):
        raise ValueError(f"pair {i} of the batch has questions of different lengths: no full-patch check")
    # A copy of the target prompt: same tokens, same padding, same shared prefix (if any).
    p_copy = ids.shape[0]
    enc["input_ids"] = torch.cat([ids, ids[p_tgt : p_tgt + 1]])
    enc["attention_mask"] = torch.cat([mask, mask[p_tgt : p_tgt + 1]])
    if "prompt_prefix" in enc:
        enc["prompt_prefix"] = torch.cat([enc["prompt_prefix"], enc["prompt_prefix"][p_tgt : p_tgt + 1]])
    row = len(rows)
    plan.full_patch_row = row
    plan.row_pair.append(i)
    sched = plan.schedule
    # With a shared prefix (call 0) both questions already share those states, so patching from
    # the call that holds the rest of each question covers every token.
    question_call = sched.question_call
    plan.full_patch_plan[question_call] = (torch.tensor([p_copy]), torch.tensor([p_src]))
    for call in [*sched.latent_calls, sched.suffix_call]:
        plan.full_patch_plan[call] = (torch.tensor([row]), torch.tensor([plan.source_rows[i]]))
    return [*rows, p_copy]


def _plan_patches(plan: BatchPlan, cfg: SweepConfig, model: CODIModel, values: AblationValues | None) -> None:
    """Fill `layer_plan` / `prj_plan` / `extra_plan`: what each patched row takes, per site and call."""
    sched, K = plan.schedule, plan.schedule.num_latent
    copies: dict[Any, tuple[list[int], list[int]]] = {}  # (layer | "prj", call, unit) -> (dst, src)
    sets: dict[Any, list[int]] = {}  # (layer | "prj", call, unit, position) -> dst rows, for ablations

    def copy(key: Any, dst: int, src: int) -> None:
        d, s_ = copies.setdefault(key, ([], []))
        d.append(dst)
        s_.append(src)

    per_layer = cfg.site.per_layer
    tokens: dict[Any, tuple[list[int], ...]] = {}  # (layer, call, unit) -> (dst, src, src token, dst token)
    for i in range(len(plan.source_rows)):
        src = plan.donor_rows[i] if cfg.ablation == "resample" else plan.source_rows[i]
        base, selfr = plan.baseline_rows[i], plan.self_rows[i]
        if cfg.positions == "sequence":
            _plan_sequence(plan, copy, tokens, i)
        for j, ((L, p, u), row) in enumerate(zip(plan.variants, plan.variant_rows[i])):
            if cfg.positions == "sequence":
                break
            if cfg.mode == "block-thought-attention":
                # The helper row takes the patch; the variant row keeps its own states at position p
                # and takes only the helper's fed-back embedding of position p (the next prj call).
                helper, row = row, plan.helper_rows[i][j]
                if p + 1 < K:
                    copy(("prj", sched.prj_call(p + 1), -1), helper, row)
            elif cfg.mode == "block-thought-feedback" and p + 1 < K:
                # Only thought p's own fed-back embedding (latent p + 1's input) stays the baseline's;
                # later latents see p through attention and feed their own states back as usual.
                copy(("prj", sched.prj_call(p + 1), -1), row, base)
            for k in range(K):
                patched = p in (-1, k)
                key = (L, sched.latent_call(k)) if per_layer else ("prj", sched.prj_call(k))
                if patched and cfg.ablation in (None, "resample"):
                    copy((*key, u), row, src)
                elif patched:
                    sets.setdefault((*key, u, k), []).append(row)
                if _feedback_reset(cfg, patched, k):
                    copy(("prj", sched.prj_call(k), -1), row, base)
        for k in range(K):  # the self-patch control: every patched site, from its own baseline
            for L in cfg.layers if per_layer else ["prj"]:
                copy((L, sched.latent_call(k) if per_layer else sched.prj_call(k), -1), selfr, base)
    _store_patches(plan, cfg, model, values, copies, sets)
    _store_token_patches(plan, cfg, model, tokens)


def source_and_target(pair: Any, direction: str) -> tuple[Any, Any]:
    """(source question, target question) of a pair: denoise patches clean into corrupted."""
    return (pair.clean, pair.corrupted) if direction == "denoise" else (pair.corrupted, pair.clean)


def token_alignment(model: CODIModel, pair: Any, direction: str) -> tuple[list[int], dict[int, int | None], list[int]]:
    """Which source token each target question token is patched from (`positions="sequence"`).

    Returns the target's ids, {target offset: source offset or None} (offsets count from the
    first thought: -1 is the last prompt token) and the target offsets of the changed span. The
    two questions agree on a common prefix and a common suffix: a token there takes the source's
    counterpart at the same place (counted from the start before the change, from the end after
    it). Inside the changed span, tokens pair up one to one when the two spans have the same
    length; otherwise (9 → 10 in a tokenizer that splits 10) they have no counterpart (None).
    """
    src_q, tgt_q = source_and_target(pair, direction)
    t, s = model.encode_question(tgt_q.question), model.encode_question(src_q.question)
    n = min(len(t), len(s))
    a = next((i for i in range(n) if t[i] != s[i]), n)
    b = next((i for i in range(n - a) if t[-1 - i] != s[-1 - i]), n - a)
    align: dict[int, int | None] = {}
    for i in range(len(t)):
        if i < a:
            j: int | None = i
        elif i >= len(t) - b:
            j = i - len(t) + len(s)
        else:
            j = i if len(t) == len(s) else None
        align[i - len(t)] = None if j is None else j - len(s)
    return t, align, [i - len(t) for i in range(a, len(t) - b)]


def changed_positions(model: CODIModel, pair: Any, direction: str = "denoise") -> list[int]:
    """Offsets from the first thought of the target question's changed tokens (the changed number)."""
    return token_alignment(model, pair, direction)[2]


def sequence_window(model: CODIModel, pairs: Sequence[Any], direction: str = "denoise") -> tuple[int, int]:
    """`positions="sequence"`: (longest target prompt, longest answer prompt) of `pairs`, in tokens."""
    longest, suffix = 0, 0
    for p in pairs:
        longest = max(longest, len(model.encode_question(source_and_target(p, direction)[1].question)))
        suffix = max(suffix, len(answer_tokens(model, p.clean.answer, p.corrupted.answer).suffix))
    return longest, suffix


def _sequence_rows(
    plan: BatchPlan, model: CODIModel, cfg: SweepConfig, pair: Any, tgt_q: Any, p_tgt: int, questions: list[str]
) -> list[int]:
    """The prompt of every variant row of one pair (`positions="sequence"`), and its absent variants.

    A question-token variant continues its own copy of the target question (patched in the
    question's call, where the batch holds prompts, not rows); every other variant continues the
    target question's prompt, as in the other sweeps.
    """
    K = model.num_latent
    n_prompt = len(model.encode_question(tgt_q.question))
    n_suffix = len(answer_tokens(model, pair.clean.answer, pair.corrupted.answer).suffix)
    # `--tokens number`: a position chosen only as some pair's number is this pair's only if it is its own.
    fixed = cfg.fixed_tokens(model)
    _, align, changed = token_alignment(model, pair, cfg.direction)
    plan.source_offsets.append(align)
    own_number = set(changed) if cfg.tokens and "number" in cfg.tokens else set()
    absent: set[int] = set()
    own: dict[int, int] = {}
    prompts = []
    for j, (_, p, _) in enumerate(plan.variants):
        unmatched = p < 0 and align.get(p) is None  # in a changed span of another length
        if p < -n_prompt or p >= K + n_suffix or (p not in fixed and p not in own_number) or unmatched:
            absent.add(j)
            prompts.append(p_tgt)
        elif p < 0:
            own[j] = len(questions)
            questions.append(tgt_q.question)
            prompts.append(own[j])
        else:
            prompts.append(p_tgt)
    plan.absent.append(absent)
    plan.token_prompts.append(own)
    return prompts


def _plan_sequence(plan: BatchPlan, copy: Any, tokens: dict[Any, Any], i: int) -> None:
    """Every variant of pair `i` of a `positions="sequence"` sweep (absent tokens: no patch)."""
    for j, (variant, row) in enumerate(zip(plan.variants, plan.variant_rows[i])):
        if j not in plan.absent[i]:
            _plan_token_patch(plan, copy, tokens, i, j, variant, row)


def _store_token_patches(plan: BatchPlan, cfg: SweepConfig, model: CODIModel, tokens: dict[Any, Any]) -> None:
    """One `token` patch per (layer, call, unit): every pair's and position's at once."""
    for (L, call, u), (d, s_, t, dt) in sorted(tokens.items(), key=lambda kv: str(kv[0])):
        sl = cfg.site.unit_slice(model, u) if u >= 0 else slice(None)
        payload = torch.tensor([s_, t, dt])  # (3, n): source row (or prompt), its token, the target's token
        plan.extra_plan.setdefault((L, call), []).append(("token", sl, torch.tensor(d), payload))


def _plan_token_patch(
    plan: BatchPlan,
    copy: Any,
    tokens: dict[Any, tuple[list[int], list[int], list[int], list[int]]],
    i: int,
    j: int,
    variant: tuple,
    row: int,
) -> None:
    """One `positions="sequence"` variant: the source's state at one token, into one row (or prompt).

    Thoughts are latent calls (one token each: the plain row copy); a question token is token
    T + p of the question's call, T the batch's padded prompt width, in the variant's own prompt
    (left padding puts the last prompt token at T - 1), taken from the source prompt's aligned
    token T + q (`token_alignment`); an answer-prompt token is token p - K of the suffix call.
    """
    L, p, u = variant
    sched, K = plan.schedule, plan.schedule.num_latent
    if 0 <= p < K:
        copy((L, sched.latent_call(p), u), row, plan.source_rows[i])
        return
    if p < 0:
        q = plan.source_offsets[i][p]
        call, dst, src = sched.question_call, plan.token_prompts[i][j], plan.source_prompts[i]
        src_token, dst_token = plan.prompt_width + q, plan.prompt_width + p
    else:
        call, dst, src = sched.suffix_call, row, plan.source_rows[i]
        src_token = dst_token = p - K
    d, s_, t, dt = tokens.setdefault((L, call, u), ([], [], [], []))
    d.append(dst)
    s_.append(src)
    t.append(src_token)
    dt.append(dst_token)


def _feedback_reset(cfg: SweepConfig, patched: bool, k: int) -> bool:
    """block-all-feedback: whether the fed-back embedding of latent k stays the baseline's in a patched row.

    Everywhere but the site itself; prj call 0 reads only the unpatched question, so layer sites
    need no reset there.
    """
    if cfg.mode != "block-all-feedback":
        return False
    return not patched if not cfg.site.per_layer else k > 0


def _store_patches(
    plan: BatchPlan,
    cfg: SweepConfig,
    model: CODIModel,
    values: AblationValues | None,
    copies: dict[Any, tuple[list[int], list[int]]],
    sets: dict[Any, list[int]],
) -> None:
    """Turn the collected row lists into the plan's index tensors and ablation payloads."""
    for (site, call, u), (d, s_) in sorted(copies.items(), key=lambda kv: str(kv[0])):
        dst, src = torch.tensor(d), torch.tensor(s_)
        if u >= 0:
            plan.extra_plan.setdefault((site, call), []).append(("copy", cfg.site.unit_slice(model, u), dst, src))
        elif site == "prj":
            plan.prj_plan[call] = (dst, src)
        else:
            plan.layer_plan[(site, call)] = (dst, src)
    for (site, call, u, k), d in sorted(sets.items(), key=lambda kv: str(kv[0])):
        sl = cfg.site.unit_slice(model, u)
        kind, payload = _ablation_payload(cfg, values, site, k, u, sl, [plan.row_pair[r] for r in d])
        plan.extra_plan.setdefault((site, call), []).append((kind, sl, torch.tensor(d), payload))


@dataclass
class AblationValues:
    """What zero, mean and noise ablations write: reference means per site, and noise seeds per pair."""

    width: int  # the site's last dimension
    dtype: torch.dtype
    means: dict[tuple[Any, int], torch.Tensor] = field(default_factory=dict)  # (layer | "prj", position) -> (width,)
    pair_seeds: list[int] = field(default_factory=list)  # per pair of the batch (from its pair_id)
    seed: int = 0


def _ablation_payload(
    cfg: SweepConfig, values: AblationValues | None, site: Any, k: int, u: int, sl: slice, pairs_of_rows: list[int]
) -> tuple[str, torch.Tensor]:
    """(kind, payload) replacing the site's activation at latent position k in the given rows."""
    if values is None:
        raise ValueError(f"the {cfg.ablation} ablation needs AblationValues")
    width = values.width if u < 0 else sl.stop - sl.start
    if cfg.ablation == "zero":
        return "set", torch.zeros(1, 1, width, dtype=values.dtype)
    if cfg.ablation == "mean":
        return "set", values.means[(site, k)][sl].to(values.dtype).reshape(1, 1, width)
    # noise: a direction per row that depends only on (seed, pair, site, position, unit): batch-independent
    dirs = []
    for i in pairs_of_rows:
        key = f"{values.seed}:{values.pair_seeds[i]}:{site}:{k}:{u}".encode()
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        v = torch.randn(width, generator=g, dtype=torch.float64)
        dirs.append(v / v.norm())
    return "norm", torch.stack(dirs).to(values.dtype).unsqueeze(1)


def _candidates(plan: BatchPlan) -> torch.Tensor:
    """(rows, 2, A) clean and corrupted answer tokens of every row's pair, right-padded with -1."""
    n = max(max(len(t.clean), len(t.corrupted)) for t in plan.tokens)
    cands = torch.full((len(plan.row_pair), 2, n), -1, dtype=torch.long)
    for r, i in enumerate(plan.row_pair):
        cands[r, 0, : len(plan.tokens[i].clean)] = torch.tensor(plan.tokens[i].clean)
        cands[r, 1, : len(plan.tokens[i].corrupted)] = torch.tensor(plan.tokens[i].corrupted)
    return cands


def value_first_token(model: CODIModel, value: float) -> int:
    """First non-whitespace token of " <value>" after the answer prompt (-1 if it has none).

    `answer_tokens`' rule for answers, so a gold value's token is read as the answer's is; the
    same rule as `readouts.common.value_first_token` (kept here: patching must not import readouts).
    """
    if value is None or not math.isfinite(float(value)):
        return -1
    try:
        return int(answer_tokens(model, value, value).clean[0])
    except UserError:
        return -1


def row_gold_tokens(
    model: CODIModel, pairs: Sequence[Any], plan: BatchPlan, cfg: SweepConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, G) first tokens of the gold intermediate values of each row's own question and of its
    pair's source question (-1: none); G is the batch's longest gold chain.

    A row runs its pair's source question (source rows), a resample donor (unknown: -1) or the
    target question (every other row). What metric functions that need `gold` see (`metrics.NEEDS`).
    """
    from ..readouts.gold import gold_intermediates

    first: dict[float, int] = {}

    def tokens(question: Any) -> list[int]:
        out = []
        for g in gold_intermediates(question):
            key = float(g)
            if key not in first:  # NaN keys never match: their token is -1 anyway
                first[key] = value_first_token(model, key)
            out.append(first[key])
        return out

    src, tgt = [], []
    for pair in pairs:
        s, t = (pair.clean, pair.corrupted) if cfg.direction == "denoise" else (pair.corrupted, pair.clean)
        src.append(tokens(s))
        tgt.append(tokens(t))
    width = max((len(x) for x in src + tgt), default=0)
    sources, donors = set(plan.source_rows), set(plan.donor_rows)
    own = torch.full((len(plan.row_pair), width), -1, dtype=torch.long)
    source = torch.full((len(plan.row_pair), width), -1, dtype=torch.long)
    for r, i in enumerate(plan.row_pair):
        source[r, : len(src[i])] = torch.tensor(src[i], dtype=torch.long)
        if r in donors:
            continue
        mine = src[i] if r in sources else tgt[i]
        own[r, : len(mine)] = torch.tensor(mine, dtype=torch.long)
    return own, source
