"""The output contract: every result kind and every metric, declared once, written into each file.

Each command's Dataset is one `ResultKind` (schema, the dims every file of it has, its metrics and
the metric analysis leads with). Each metric has one `MetricInfo`: units in words, which direction
means "more effect", when it is NaN and why, the size below which an effect is negligible (and why
that size), and whether its per-pair values are 0/1 outcomes (exact binomial intervals) or only
defined when the two answers differ. The one writer (`codi_nnsight.run.write_results`) stamps a
file's kind and the info of the metrics it holds into its attrs (`result_kind`, `metric_info`),
and analysis reads them from there — so a file says what its numbers are, and analysis keeps no
tables of its own. Pure Python: analysis imports this without torch.

Adding a result kind or a metric is one entry here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class MetricInfo:
    """What one metric's numbers mean (stored per file in the `metric_info` attr as JSON)."""

    units: str = ""
    #: "effect" (larger |value| = more effect), "higher-better" (accuracy-like) or "score" (ranks only).
    direction: str = "effect"
    #: The size below which a mean effect is negligible (0: none known), and why that size.
    negligible: float = 0.0
    negligible_why: str = ""
    #: When the metric is NaN, in words.
    nan_rule: str = "no pair produced a value"
    #: Per-pair 0/1 outcomes: their mean is a proportion with an exact binomial interval.
    proportion: bool = False
    #: Defined only when the clean and corrupted answers differ (pairs with equal answers count out).
    needs_distinct_answers: bool = False
    #: Not an effect size at all (a decoded number): never summarised over pairs; why.
    not_summarizable: str = ""


_PINSKER = "by Pinsker's inequality, KL below 0.001 nats moves no probability by more than about 2.2 percentage points"
_SAME_TOKEN = "undefined when the clean and corrupted answers start with the same token, e.g. -5 and -7, or are equal"

#: Every metric by name (the sweep's, attribution's and early exit's).
METRICS: dict[str, MetricInfo] = {
    "kl": MetricInfo("nats", negligible=1e-3, negligible_why=_PINSKER),
    "l2": MetricInfo(
        "logits", negligible=1e-2, negligible_why="an RMS logit change below 0.01 is below bfloat16 rounding"
    ),
    "top1_changed": MetricInfo(
        "share of pairs",
        negligible=0.01,
        negligible_why="fewer than 1 in 100 pairs change their top token",
        proportion=True,
    ),
    "logit_diff": MetricInfo(
        "logits",
        negligible=0.1,
        negligible_why="0.1 logits changes the odds between the two answers' first tokens by about 10%",
        nan_rule=f"{_SAME_TOKEN}; try --metric logprob_diff",
        needs_distinct_answers=True,
    ),
    "logprob_diff": MetricInfo(
        "nats",
        negligible=0.1,
        negligible_why="0.1 nats changes the odds between the two full answers by about 10%",
        nan_rule="undefined when the clean and corrupted answers are equal",
        needs_distinct_answers=True,
    ),
    "recovery": MetricInfo(
        "share of the gap",
        negligible=0.05,
        negligible_why="less than 5% of the gap between baseline and source",
        nan_rule="undefined when the answers start with the same token or are equal, or when the source and "
        "baseline logit differences are too close; try --metric logprob_recovery",
        needs_distinct_answers=True,
    ),
    "logprob_recovery": MetricInfo(
        "share of the gap",
        negligible=0.05,
        negligible_why="less than 5% of the gap between baseline and source",
        nan_rule="undefined when the answers are equal or the source and baseline differ too little",
        needs_distinct_answers=True,
    ),
    "flipped": MetricInfo(
        "share of pairs",
        negligible=0.05,
        negligible_why="fewer than 1 in 20 pairs flip",
        nan_rule="undefined when the clean and corrupted answers are equal: no flip to measure",
        proportion=True,
        needs_distinct_answers=True,
    ),
    "p_clean": MetricInfo(
        "probability", negligible=0.01, negligible_why="a probability change below 1 percentage point"
    ),
    "p_corrupted": MetricInfo(
        "probability", negligible=0.01, negligible_why="a probability change below 1 percentage point"
    ),
    "logp_clean_answer": MetricInfo(
        "nats", negligible=0.1, negligible_why="0.1 nats is about a 10% change in the answer's probability"
    ),
    "logp_corrupted_answer": MetricInfo(
        "nats", negligible=0.1, negligible_why="0.1 nats is about a 10% change in the answer's probability"
    ),
    "answer": MetricInfo(
        "answer value",
        direction="value",
        not_summarizable="it is the decoded answer (a number per pair), not an effect size; its mean over pairs "
        "means nothing — use flipped",
    ),
    # attribution patching: first-order estimates of the patch effect on a metric
    "atp_logprob_diff": MetricInfo(
        "nats",
        negligible=0.1,
        negligible_why="0.1 nats changes the odds between the two full answers by about 10%",
        nan_rule="undefined when the clean and corrupted answers are equal",
        needs_distinct_answers=True,
    ),
    "atp_logit_diff": MetricInfo(
        "logits",
        negligible=0.1,
        negligible_why="0.1 logits changes the odds between the two answers' first tokens by about 10%",
        nan_rule=_SAME_TOKEN,
        needs_distinct_answers=True,
    ),
    "atpstar_logprob_diff": MetricInfo("nats", direction="score", nan_rule=_SAME_TOKEN),
    "atpstar_logit_diff": MetricInfo("logits", direction="score", nan_rule=_SAME_TOKEN),
    # early exit: the answer after k thoughts
    "correct": MetricInfo("share of questions", direction="higher-better", proportion=True),
    "logp_answer": MetricInfo("nats", direction="higher-better"),
}


@dataclass(frozen=True)
class ResultKind:
    """One kind of results file: what every file of it has, and the metric analysis leads with."""

    name: str
    schema_prefix: str
    dims: tuple[str, ...]
    default_metric: str
    metrics: tuple[str, ...] = field(default=())
    description: str = ""


#: Every result kind, by name (the schema prefix identifies a file's kind).
RESULT_KINDS: dict[str, ResultKind] = {
    k.name: k
    for k in (
        ResultKind(
            "sweep",
            "codi-nnsight/results/",
            ("pair", "layer"),
            "kl",
            tuple(m for m in METRICS if not m.startswith(("atp", "correct", "logp_answer"))),
            "activation patching (or ablation) at the continuous thoughts, layer by layer",
        ),
        ResultKind(
            "attribution",
            "codi-nnsight/attribution/",
            ("pair", "layer"),
            "atp_logprob_diff",
            ("atp_logprob_diff", "atp_logit_diff", "atpstar_logprob_diff", "atpstar_logit_diff"),
            "attribution patching: each site's first-order patch effect from one backward pass",
        ),
        ResultKind(
            "early-exit",
            "codi-nnsight/early-exit/",
            ("pair", "variant", "n_latent"),
            "correct",
            ("correct", "logp_answer"),
            "the answer after 0 … K thoughts",
        ),
        ResultKind("lens", "codi-nnsight/lens/", ("pair", "variant", "step", "layer"), "", (), "logit / tuned lens"),
        ResultKind(
            "attention", "codi-nnsight/attention/", ("pair", "variant", "step", "layer", "head"), "", (), "attention"
        ),
        ResultKind("probe", "codi-nnsight/probe/", ("step", "layer", "target"), "", (), "linear probes"),
        ResultKind(
            "transplant",
            "codi-nnsight/transplant/",
            ("pair", "donor", "thought"),
            "follows_donor",
            (
                "answer_changed",
                "follows_recipient",
                "follows_donor",
                "follows_carried",
                "kl",
                "logp_recipient_answer",
                "logp_donor_answer",
                "answer",
            ),
            "thought transplant: thought k (or block L's output at latent k) taken from another problem",
        ),
        ResultKind(
            "steer",
            "codi-nnsight/steer/",
            ("pair", "direction", "scale"),
            "answer_changed",
            ("answer_changed", "follows_predicted", "kl", "logp_answer", "logp_predicted_answer", "answer"),
            "steering a thought along probe, mean-difference and random directions",
        ),
        ResultKind(
            "thought-graph",
            "codi-nnsight/thought-graph/",
            ("pair", "intervention", "source", "target"),
            "lens_kl",
            ("state_l2", "state_cos", "lens_kl", "lens_top_changed", "kl", "answer_changed", "answer"),
            "thought-to-thought graph: how intervening on thought i moves every later thought and the answer",
        ),
    )
}


#: The metrics of the interventions on thoughts (transplant, steer, thought-graph); merged into
#: `METRICS` after `RESULT_KINDS`, so the sweep's metric list (every other metric) stays as it was.
INTERVENTION_METRICS: dict[str, MetricInfo] = {
    "answer_changed": MetricInfo(
        "share of pairs",
        negligible=0.05,
        negligible_why="fewer than 1 in 20 interventions change the answer",
        nan_rule="never NaN: it compares the decoded answer texts",
        proportion=True,
    ),
    "follows_recipient": MetricInfo("share of transplants", direction="score", proportion=True),
    "follows_donor": MetricInfo("share of transplants", direction="score", proportion=True),
    "follows_carried": MetricInfo(
        "share of transplants",
        direction="score",
        nan_rule="the recipient has no readable chain (a `steps` field of 'expr=result' strings), or no value at "
        "this step",
        proportion=True,
    ),
    "follows_predicted": MetricInfo(
        "share of steered runs",
        direction="score",
        nan_rule="the steered state reads as the question's own value (nothing to follow), or the question has "
        "no readable chain",
        proportion=True,
    ),
    "logp_recipient_answer": MetricInfo("nats", direction="score"),
    "logp_donor_answer": MetricInfo("nats", direction="score"),
    "logp_predicted_answer": MetricInfo(
        "nats", direction="score", nan_rule="no predicted answer (see follows_predicted)"
    ),
    "state_l2": MetricInfo("state units", nan_rule="the target thought is not after the source (j <= i)"),
    "state_cos": MetricInfo(
        "cosine", direction="score", nan_rule="the target thought is not after the source (j <= i)"
    ),
    "lens_kl": MetricInfo(
        "nats",
        negligible=1e-3,
        negligible_why=_PINSKER,
        nan_rule="the target thought is not after the source (j <= i)",
    ),
    "lens_top_changed": MetricInfo(
        "share of pairs",
        negligible=0.01,
        negligible_why="fewer than 1 in 100 pairs change the thought's top lens token",
        nan_rule="the target thought is not after the source (j <= i)",
        proportion=True,
    ),
}
METRICS.update(INTERVENTION_METRICS)


def kind_of_schema(schema: str) -> ResultKind | None:
    """The result kind a `codi_nnsight_schema` value belongs to (None: not a results file of ours)."""
    return next((k for k in RESULT_KINDS.values() if str(schema).startswith(k.schema_prefix)), None)


def declare(attrs: dict[str, Any], variables: Any) -> dict[str, Any]:
    """`attrs` with the file's `result_kind` and the `metric_info` (JSON) of the metrics in `variables`.

    Called by the one writer on every results file; a Dataset of no known kind is left as it is.
    """
    kind = kind_of_schema(attrs.get("codi_nnsight_schema", ""))
    if kind is None:
        return attrs
    held = [m for m in METRICS if m in set(variables)]
    return {
        **attrs,
        "result_kind": kind.name,
        "result_dims": ",".join(kind.dims),
        "default_metric": kind.default_metric,
        "metric_info": json.dumps({m: asdict(METRICS[m]) for m in held}, sort_keys=True),
    }


def metric_info(attrs: dict[str, Any], metric: str) -> MetricInfo:
    """What `metric` means in a file with these attrs: its own declaration, else this table's (older files)."""
    stored = attrs.get("metric_info")
    if stored:
        try:
            info = json.loads(stored).get(metric)
        except (TypeError, ValueError):
            info = None
        if isinstance(info, dict):
            known = {k: v for k, v in info.items() if k in MetricInfo.__dataclass_fields__}
            return MetricInfo(**known)
    return METRICS.get(metric, MetricInfo())
