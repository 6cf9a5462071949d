"""Metrics as data: one entry per metric drives the trace, the Dataset, its docs and the tests.

Every metric is a value per *row* of a traced batch (a source run, an unpatched baseline, a
self-patch control or a patched variant). Trace metrics are computed on the device inside the
trace from the answer-position logits and the teacher-forced answer log-probabilities, so only
scalars leave it (this is what lets a sweep run remotely); derived metrics are computed after
the trace from trace columns, the row layout and the decoded answers. The Dataset builder
scatters rows into `(pair, layer[, position])` by name — never by column position — and adds
`baseline_<m>` / `source_<m>` per-pair variables for metrics marked `per_run`.

Adding a metric is one `Metric(...)` entry in `METRICS`; `docs/results-schema.md` lists the same
names (a test checks that they agree).

The answer position is the last token of the teacher-forced prompt `[eot] The answer is:` plus
any whitespace-only tokens before the number; it predicts the first non-whitespace token of the
answer, which is "-" for negative answers (then `logit_diff` is NaN and `logprob_diff`, over the
whole answer, is the metric that stays defined).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: Per-pair recovery is NaN where |source − baseline| is below this (logits for `recovery`, nats
#: for `logprob_recovery`): tiny denominators give ratios of 30 or 60 that mean nothing.
RECOVERY_MIN_DENOMINATOR = 0.5


@dataclass(frozen=True)
class Metric:
    """One metric: its name, description and units, and how it is computed."""

    name: str
    long_name: str
    units: str
    #: In the trace, per row: a function of the tensors in `trace_inputs` (torch only: runs on the server).
    trace: Callable[[dict[str, Any]], torch.Tensor] | None = None
    #: After the trace, per row: a function of a `RowFrame` returning a float64 array.
    derive: Callable[[RowFrame], np.ndarray] | None = None
    #: Also stored per pair for the unpatched baseline and source runs (`baseline_<name>`, `source_<name>`).
    per_run: bool = False
    #: Only defined when a pair's clean and corrupted answers differ (NaN otherwise).
    needs_distinct_answers: bool = False


@dataclass
class RowFrame:
    """What derived metrics see: trace columns and the layout of every row of one batch."""

    columns: dict[str, np.ndarray]  # trace metric name -> (rows,)
    baseline_row: np.ndarray  # (rows,) index of each row's unpatched baseline row
    source_row: np.ndarray  # (rows,) index of each row's source row
    source_answer: np.ndarray  # (rows,) true answer of the source question
    target_answer: np.ndarray  # (rows,) true answer of the patched (target) question
    answer: np.ndarray  # (rows,) number decoded greedily after the prompt (NaN: none)


# -- trace metrics (torch, on the device) -------------------------------------------------------
def _kl(v: dict[str, Any]) -> torch.Tensor:
    return (v["logp"].exp() * (v["logp"] - v["base_logp"])).sum(-1)


def _l2(v: dict[str, Any]) -> torch.Tensor:
    return (v["logits"] - v["base_logits"]).pow(2).mean(-1).sqrt()


def _top1_changed(v: dict[str, Any]) -> torch.Tensor:
    # The ids greedy decoding can emit (all but [eot]), so top-1 means what decoding would pick.
    n = v["n_decodable"]
    return (v["logits"][:, :n].argmax(-1) != v["base_logits"][:, :n].argmax(-1)).to(torch.float64)


def _logit_diff(v: dict[str, Any]) -> torch.Tensor:
    first = v["first"]
    diff = v["logits"].gather(1, first[:, :1]).squeeze(1) - v["logits"].gather(1, first[:, 1:2]).squeeze(1)
    return torch.where(first[:, 0] == first[:, 1], torch.full_like(diff, float("nan")), diff)


def _p_first(which: int) -> Callable[[dict[str, Any]], torch.Tensor]:
    return lambda v: v["logp"].gather(1, v["first"][:, which : which + 1]).squeeze(1).exp()


def _logp_answer(which: int) -> Callable[[dict[str, Any]], torch.Tensor]:
    return lambda v: v["cand"][:, which]


def _logprob_diff(v: dict[str, Any]) -> torch.Tensor:
    return v["cand"][:, 0] - v["cand"][:, 1]


# -- derived metrics (numpy, after the trace) ---------------------------------------------------
def _recovery_of(column: str) -> Callable[[RowFrame], np.ndarray]:
    def recovery(f: RowFrame) -> np.ndarray:
        x = f.columns[column]
        base, src = x[f.baseline_row], x[f.source_row]
        denom = src - base
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (x - base) / denom
        return np.where(np.abs(denom) >= RECOVERY_MIN_DENOMINATOR, out, np.nan)

    return recovery


def _answer(f: RowFrame) -> np.ndarray:
    return f.answer.astype(np.float64)


def _kept(f: RowFrame) -> np.ndarray:
    return (f.answer == f.target_answer).astype(np.float64)


def _flipped(f: RowFrame) -> np.ndarray:
    return (f.answer == f.source_answer).astype(np.float64)  # NaN answer (no number) is not a flip


METRICS: tuple[Metric, ...] = (
    Metric("kl", "KL(patched || baseline) of the next-token distribution at the answer position", "nats", _kl),
    Metric("l2", "root-mean-square logit difference, patched vs baseline, at the answer position", "logits", _l2),
    Metric(
        "top1_changed",
        "the most likely decodable token (all ids but [eot]) differs from the baseline's",
        "share",
        _top1_changed,
    ),
    Metric(
        "logit_diff",
        "logit(clean answer's first token) - logit(corrupted answer's first token); NaN when "
        "both answers start with the same token",
        "logits",
        _logit_diff,
        per_run=True,
        needs_distinct_answers=True,
    ),
    Metric("p_clean", "probability of the clean answer's first token", "probability", _p_first(0), per_run=True),
    Metric(
        "p_corrupted", "probability of the corrupted answer's first token", "probability", _p_first(1), per_run=True
    ),
    Metric(
        "logp_clean_answer",
        "teacher-forced log-probability of the whole clean answer",
        "nats",
        _logp_answer(0),
        per_run=True,
    ),
    Metric(
        "logp_corrupted_answer",
        "teacher-forced log-probability of the whole corrupted answer",
        "nats",
        _logp_answer(1),
        per_run=True,
    ),
    Metric(
        "logprob_diff",
        "logp_clean_answer - logp_corrupted_answer (defined whenever the answers differ)",
        "nats",
        _logprob_diff,
        per_run=True,
        needs_distinct_answers=True,
    ),
    Metric(
        "recovery",
        "(patched - baseline) / (source - baseline) of logit_diff; NaN where |source - baseline| "
        f"< {RECOVERY_MIN_DENOMINATOR}",
        "fraction",
        derive=_recovery_of("logit_diff"),
        needs_distinct_answers=True,
    ),
    Metric(
        "logprob_recovery",
        "(patched - baseline) / (source - baseline) of logprob_diff; NaN where "
        f"|source - baseline| < {RECOVERY_MIN_DENOMINATOR}",
        "fraction",
        derive=_recovery_of("logprob_diff"),
        needs_distinct_answers=True,
    ),
    Metric(
        "answer",
        "number decoded greedily after the teacher-forced answer prompt in the patched run (NaN: none)",
        "answer value",
        derive=_answer,
    ),
    Metric(
        "kept",
        "the patched run's decoded answer is still the target question's own true answer (for "
        "ablations: the answer survived)",
        "share",
        derive=_kept,
    ),
    Metric(
        "flipped",
        "the patched run's decoded answer equals the source question's true answer; NaN when the "
        "clean and corrupted answers are equal",
        "share",
        derive=_flipped,
        needs_distinct_answers=True,
    ),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
TRACE_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m.trace is not None)
DERIVED_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m.derive is not None)


def trace_columns(v: dict[str, Any]) -> torch.Tensor:
    """(rows, len(TRACE_METRICS)) float64: every trace metric, in `TRACE_METRICS` order.

    `v` holds `logits`, `logp`, `base_logits`, `base_logp` (rows, V) float64, `first` (rows, 2)
    first-token ids of the clean and corrupted answers, `cand` (rows, 2) their teacher-forced
    log-probabilities, and `n_decodable` (the ids greedy decoding may emit).
    """
    return torch.stack([m.trace(v).to(torch.float64) for m in TRACE_METRICS], dim=1)


def row_metrics(columns: np.ndarray, frame: RowFrame) -> dict[str, np.ndarray]:
    """Every metric per row, by name: trace columns plus derived metrics."""
    out = {m.name: columns[:, i] for i, m in enumerate(TRACE_METRICS)}
    frame.columns = out
    for m in DERIVED_METRICS:
        out[m.name] = m.derive(frame)
    return out
