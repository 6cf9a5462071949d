"""From the rows of one traced batch to the labeled results Dataset (docs/results-schema.md).

Everything is driven by the metric table: every metric is scattered from its variant rows into
`(pair, layer[, position])`; metrics marked `per_run` are also stored per pair for the unpatched
baseline and source runs. Pairs whose clean and corrupted answers are equal have no flip to
measure: metrics that need two different answers are NaN for them, and `comparable` says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..data.pairs import pair_coordinates
from ..errors import UserError
from ..model.inference import decode
from ..model.wrapper import CODIModel
from .config import SweepConfig
from .metrics import BY_NAME, METRICS, Metric, RowFrame, row_metrics
from .plan import BatchPlan

SCHEMA = "codi-nnsight/results/2"

#: Per-pair variables that are not `baseline_<m>` / `source_<m>`: name -> (long_name, units).
PAIR_VARIABLES: dict[str, tuple[str, str]] = {
    "clean_prompted_answer": (
        "number decoded greedily after the teacher-forced prompt, unpatched clean run",
        "answer value",
    ),
    "corrupted_prompted_answer": (
        "number decoded greedily after the teacher-forced prompt, unpatched corrupted run",
        "answer value",
    ),
    "clean_prompted_correct": ("clean_prompted_answer equals the clean question's true answer", "share"),
    "corrupted_prompted_correct": ("corrupted_prompted_answer equals the corrupted question's true answer", "share"),
    "comparable": ("the clean and corrupted answers differ, so flips and recoveries are defined", "share"),
    "self_patch_kl": ("KL of the self-patched control row against the baseline (sanity: 0)", "nats"),
    "self_patch_l2": (
        "RMS logit difference of the self-patched control row against the baseline (sanity: 0)",
        "logits",
    ),
}


#: The unpatched runs whose per-pair values `per_run` metrics also get.
RUNS = ("baseline", "source")
#: Dimension and coordinate names of results files (`component` and `route` from stacked sweeps).
DIMENSIONS = ("pair", "layer", "position", "head", "component", "route")


def per_pair_names(metrics: tuple[Metric, ...] | None = None) -> list[str]:
    """Every per-pair variable name a sweep writes, in order (`metrics`: the sweep's table, default `METRICS`)."""
    runs = [f"{run}_{m.name}" for m in (METRICS if metrics is None else metrics) if m.per_run for run in RUNS]
    return runs + list(PAIR_VARIABLES)


def check_metric_names(user: tuple[Metric, ...]) -> None:
    """Refuse, in one line and before any work, a metric function whose variables would clash
    with the Dataset's own (metrics, per-pair variables, dims, the route split's `delta_<m>`) or
    with another metric function's."""
    from .routes import DELTA_METRICS

    taken = {m.name: "a built-in metric" for m in METRICS}
    taken.update({n: "a per-pair variable of every sweep" for n in per_pair_names()})
    taken.update({d: "a dimension of the results" for d in DIMENSIONS})
    taken.update({f"delta_{m}": "a variable of the route split" for m in DELTA_METRICS})
    for m in user:
        names = [m.name] + ([f"{run}_{m.name}" for run in RUNS] if m.per_run else [])
        for n in names:
            if n in taken:
                its = "its variable " if n != m.name else ""
                raise UserError(f"metrics[{m.name!r}]: {its}{n!r} is already {taken[n]}; choose another name")
        taken.update({n: f"a variable of metric {m.name!r}" for n in names})


def row_frame(
    model: CODIModel, pairs: Sequence[Any], cfg: SweepConfig, plan: BatchPlan, generated: np.ndarray
) -> RowFrame:
    """The row layout derived metrics need: baseline/source rows, source answers, decoded answers."""
    answers = [model.method.parse_answer(decode(model, g)) for g in generated]
    src_answer = [float((p.clean if cfg.direction == "denoise" else p.corrupted).answer) for p in pairs]
    tgt_answer = [float((p.corrupted if cfg.direction == "denoise" else p.clean).answer) for p in pairs]
    return RowFrame(
        columns={},
        baseline_row=np.array(plan.baseline_of),
        source_row=np.array(plan.source_of),
        source_answer=np.array([src_answer[i] for i in plan.row_pair], dtype=np.float64),
        target_answer=np.array([tgt_answer[i] for i in plan.row_pair], dtype=np.float64),
        answer=np.array([np.nan if a is None else a for a in answers], dtype=np.float64),
    )


def batch_dataset(
    model: CODIModel,
    pairs: Sequence[Any],
    cfg: SweepConfig,
    plan: BatchPlan,
    columns: np.ndarray,
    generated: np.ndarray,
    metrics: tuple[Metric, ...] | None = None,
) -> xr.Dataset:
    """Assemble the per-batch `xarray.Dataset` (schema in docs/results-schema.md).

    `metrics`: the sweep's metric table (default `METRICS`), whose trace metrics made `columns`
    in that order; a metric function's variables also carry its `FunctionOrigin` attrs.
    """
    metrics = METRICS if metrics is None else metrics
    rows = row_metrics(columns, row_frame(model, pairs, cfg, plan, generated), metrics)
    comparable = np.array([float(p.clean.answer != p.corrupted.answer) for p in pairs])
    each = cfg.positions in ("each", "sequence")
    K = model.num_latent
    positions = cfg.sequence_positions(model) if cfg.positions == "sequence" else list(range(K))
    at = {p: n for n, p in enumerate(positions)}  # index of position p on the axis
    axis = cfg.site.axis
    unit_ids = cfg.site.units(model)
    shape = (len(pairs), len(cfg.layers)) + ((len(unit_ids),) if axis else ()) + ((len(positions),) if each else ())
    index = [
        (cfg.layers.index(L),) + ((unit_ids.index(u),) if axis else ()) + ((at[p],) if each else ())
        for L, p, u in plan.variants
    ]
    absent = plan.absent or [set()] * len(pairs)  # sequence sweeps: tokens a pair does not have
    dims = ("pair", "layer") + ((axis,) if axis else ()) + (("position",) if each else ())
    data: dict[str, Any] = {}
    for m in metrics:
        arr = np.full(shape, np.nan)
        for i in range(len(pairs)):
            for j, (idx, row) in enumerate(zip(index, plan.variant_rows[i])):
                arr[(i, *idx)] = np.nan if j in absent[i] else rows[m.name][row]
        data[m.name] = (
            dims,
            _mask(arr, comparable, m.needs_distinct_answers),
            {"long_name": m.long_name, "units": m.units, **_origin_attrs(m)},
        )
    for m in (m for m in metrics if m.per_run):
        for run, run_rows in (("baseline", plan.baseline_rows), ("source", plan.source_rows)):
            values = _mask(rows[m.name][run_rows], comparable, m.needs_distinct_answers)
            data[f"{run}_{m.name}"] = (
                "pair",
                values,
                {"long_name": f"{m.long_name} — unpatched {run} run", "units": m.units, **_origin_attrs(m)},
            )
    for name, values in _pair_values(pairs, cfg, plan, rows, comparable).items():
        long_name, units = PAIR_VARIABLES[name]
        data[name] = ("pair", values, {"long_name": long_name, "units": units})
    coords: dict[str, Any] = {
        "pair": np.array([p.pair_id for p in pairs], dtype=np.int64),
        "layer": np.array(cfg.layers, dtype=np.int64),
    }
    if cfg.positions == "sequence":
        coords.update(sequence_coordinates(model, pairs, positions, cfg.direction))
        patched = np.ones((len(pairs), len(positions)), dtype=np.int8)
        for i in range(len(pairs)):
            for j in absent[i]:
                patched[i, at[plan.variants[j][1]]] = 0
        coords["patched"] = (
            ("pair", "position"),
            patched,
            {"long_name": "1 where the pair's token was patched; 0: it has none there, or --tokens left it out"},
        )
    elif each:
        coords["position"] = (
            "position",
            np.arange(K, dtype=np.int64),
            {"long_name": "latent token (continuous thought) index"},
        )
    if axis:
        coords[axis] = (axis, np.array(unit_ids, dtype=np.int64), {"long_name": f"attention {axis} index"})
    # Pair metadata coordinates are added once for the whole run (`with_pair_coordinates`): their
    # names and dtypes depend on all the pairs, and batches must concatenate cleanly.
    return xr.Dataset(data, coords=coords)


def _origin_attrs(m: Metric) -> dict[str, str]:
    """A metric function's name, source hash and bound values (nothing for built-in metrics)."""
    return {} if m.origin is None else m.origin.attrs()


#: `position_kind` of a sequence sweep's positions, in sequence order.
POSITION_KINDS = ("question", "bot", "thought", "answer prompt")


def sequence_coordinates(
    model: CODIModel, pairs: Sequence[Any], positions: Sequence[int], direction: str = "denoise"
) -> dict[str, Any]:
    """The `position` axis of a `positions="sequence"` sweep and what sits at each position.

    `position` counts from the first thought (question tokens negative, `[bot]` at -1, thoughts
    0 … K-1, the answer prompt from K); `position_kind` names the region; per pair, `token` is the
    target question's token there — the patched run's ("" where the pair has none) — and
    `changed` is 1 on the target's changed span (the changed number), 0 elsewhere.
    """
    from .plan import answer_tokens, token_alignment

    K = model.num_latent
    n_bot = len(model.codi.bot_ids())
    kinds = [
        "question" if p < -n_bot else "bot" if p < 0 else "thought" if p < K else "answer prompt" for p in positions
    ]
    # The method's added marker tokens have no text in the tokenizer.
    specials = {model.codi.bot_ids()[-1]: "[bot]", model.codi.eot_ids()[0]: "[eot]"}

    def text_of(i: int) -> str:
        """A token as text; never "" (which marks a position the pair does not have)."""
        if i in specials:
            return specials[i]
        return model.tokenizer.decode([i]) or f"<token {i}>"

    text = np.full((len(pairs), len(positions)), "", dtype=object)
    changed = np.zeros((len(pairs), len(positions)), dtype=np.int8)
    for i, pair in enumerate(pairs):
        a, _, span = token_alignment(model, pair, direction)
        suffix = answer_tokens(model, pair.clean.answer, pair.corrupted.answer).suffix
        for n, p in enumerate(positions):
            if -len(a) <= p < 0:
                text[i, n] = text_of(a[len(a) + p])
                changed[i, n] = int(p in span)
            elif 0 <= p < K:
                text[i, n] = f"<thought {p}>"
            elif 0 <= p - K < len(suffix):
                text[i, n] = text_of(suffix[p - K])
    return {
        "position": (
            "position",
            np.array(positions, dtype=np.int64),
            {
                "long_name": "token offset from the first thought: question and [bot] < 0, thoughts 0..K-1, "
                "answer prompt >= K"
            },
        ),
        "position_kind": ("position", np.array(kinds, dtype=object), {"long_name": "; ".join(POSITION_KINDS)}),
        "token": (
            ("pair", "position"),
            text,
            {"long_name": "the target (patched) question's token at the position ('' where none)"},
        ),
        "changed": (
            ("pair", "position"),
            changed,
            {"long_name": "1 on the target question's changed span (the changed number)"},
        ),
    }


def with_pair_coordinates(ds: xr.Dataset, pairs: Sequence[Any]) -> xr.Dataset:
    """`ds` (whose `pair` dim follows `pairs`' order) with the per-pair metadata coordinates."""
    reserved = set(ds.variables) | set(ds.dims)
    return ds.assign_coords(pair_coordinates(pairs, reserved=reserved))


def _mask(values: np.ndarray, comparable: np.ndarray, needs_distinct: bool) -> np.ndarray:
    """NaN for pairs with equal answers where the metric needs two different answers."""
    if not needs_distinct:
        return values
    keep = comparable.reshape((-1,) + (1,) * (values.ndim - 1)) > 0
    return np.where(keep, values, np.nan)


def _pair_values(
    pairs: Sequence[Any], cfg: SweepConfig, plan: BatchPlan, rows: dict[str, np.ndarray], comparable: np.ndarray
) -> dict[str, np.ndarray]:
    """Prompted answers of the unpatched runs, the comparability flag and the self-patch control."""
    clean_rows, corrupted_rows = (
        (plan.source_rows, plan.baseline_rows) if cfg.direction == "denoise" else (plan.baseline_rows, plan.source_rows)
    )
    out: dict[str, np.ndarray] = {}
    for variant, run_rows in (("clean", clean_rows), ("corrupted", corrupted_rows)):
        answer = rows["answer"][run_rows]
        truth = np.array([float(getattr(p, variant).answer) for p in pairs])
        out[f"{variant}_prompted_answer"] = answer
        out[f"{variant}_prompted_correct"] = (answer == truth).astype(np.float64)
    out["comparable"] = comparable
    out["self_patch_kl"] = rows["kl"][plan.self_rows]
    out["self_patch_l2"] = rows["l2"][plan.self_rows]
    return out


def metric_names(metrics: tuple[Metric, ...] | None = None) -> list[str]:
    """Every metric variable name (dims `pair, layer[, head][, position][, component]`)."""
    return [m.name for m in (METRICS if metrics is None else metrics)]


__all__ = [
    "BY_NAME",
    "PAIR_VARIABLES",
    "SCHEMA",
    "batch_dataset",
    "check_metric_names",
    "metric_names",
    "per_pair_names",
]
