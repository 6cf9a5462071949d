"""Metrics as data: one entry per metric drives the trace, the Dataset, its docs and the tests.

Every metric is a value per *row* of a traced batch (a source run, an unpatched baseline, a
self-patch control or a patched variant). Trace metrics are computed on the device inside the
trace from the answer-position logits and the teacher-forced answer log-probabilities, so only
scalars leave it (this is what lets a sweep run remotely); derived metrics are computed after
the trace from trace columns, the row layout and the decoded answers. The Dataset builder
scatters rows into `(pair, layer[, position])` by name — never by column position — and adds
`baseline_<m>` / `source_<m>` per-pair variables for metrics marked `per_run`.

Adding a metric is one `Metric(...)` entry in `METRICS`; `docs/results-schema.md` lists the same
names (a test checks that they agree). Researchers add their own per sweep without editing the
package: `patch_sweep(..., metrics={"name": fn})` turns each function into one more trace
`Metric` (`user_metrics`), recorded by name and source hash (see "Metric functions" below).

The answer position is the last token of the teacher-forced prompt `[eot] The answer is:` plus
any whitespace-only tokens before the number; it predicts the first non-whitespace token of the
answer, which is "-" for negative answers (then `logit_diff` is NaN and `logprob_diff`, over the
whole answer, is the metric that stays defined).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import keyword
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UserError

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
    #: Per-row inputs beyond the answer position's that the trace computes only for metrics that
    #: ask (`NEEDS`): a sweep without such a metric costs what it always did.
    needs: tuple[str, ...] = ()
    #: A metric function's identity (`FunctionOrigin`), recorded in the Dataset and the run
    #: fingerprint; None for the built-in metrics.
    origin: FunctionOrigin | None = None


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


def trace_columns(v: dict[str, Any], metrics: tuple[Metric, ...] | None = None) -> torch.Tensor:
    """(rows, len(metrics)) float64: every trace metric, in `metrics` order (default `TRACE_METRICS`).

    `v` holds `logits`, `logp`, `base_logits`, `base_logp` (rows, V) float64, `first` (rows, 2)
    first-token ids of the clean and corrupted answers, `cand` (rows, 2) their teacher-forced
    log-probabilities, and `n_decodable` (the ids greedy decoding may emit) — plus, when a metric
    needs them, the inputs of `NEEDS` (see `user_metrics`). A metric function's result is checked
    (one value per row) before it is stacked.
    """
    metrics = TRACE_METRICS if metrics is None else metrics
    columns = []
    for m in metrics:
        if m.origin is None:
            columns.append(m.trace(v).to(torch.float64))
        else:
            # No graph: a readout through weights that require grad (a model built by hand) needs none.
            with torch.no_grad():
                columns.append(_column(m, m.trace(v), v["logits"]))
    return torch.stack(columns, dim=1)


def _column(m: Metric, value: Any, logits: torch.Tensor) -> torch.Tensor:
    """A metric function's values as a float64 column; a wrong result is one line naming it."""
    rows = logits.shape[0]
    if not (isinstance(value, torch.Tensor) and tuple(value.shape) == (rows,)):
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise UserError(
            f"metric {m.name!r} ({m.origin.function}) returned {got}; expected a torch tensor of shape "
            f"({rows},): one value per row"
        )
    return value.to(device=logits.device, dtype=torch.float64)


def row_metrics(
    columns: np.ndarray, frame: RowFrame, metrics: tuple[Metric, ...] | None = None
) -> dict[str, np.ndarray]:
    """Every metric per row, by name: trace columns (in `metrics` order) plus derived metrics."""
    metrics = METRICS if metrics is None else metrics
    out = {m.name: columns[:, i] for i, m in enumerate(m for m in metrics if m.trace is not None)}
    frame.columns = out
    for m in metrics:
        if m.derive is not None:
            out[m.name] = m.derive(frame)
    return out


# -- metric functions (researchers' own metrics, as TransformerLens takes them) ------------------
#: What a metric function may ask the trace for (`metric_function(needs=...)`), and what it adds to `v`:
#: `thoughts`: `v["thoughts"]` (rows, K, width) every row's fed-back thoughts — the output of the
#:   method's feedback module (CODI: `prj`) at the call that makes thought k, after this row's
#:   patch — and `v["lens"]`, a function from (..., width) states to (..., V) float64 logit-lens
#:   logits `lm_head(final_norm(x))` over the whole output vocabulary;
#: `gold`: `v["gold"]` (rows, G) long, the first token (`readouts.common.value_first_token`) of each
#:   gold intermediate value (`readouts.gold.gold_intermediates`) of the question the row runs, and
#:   `v["source_gold"]` (rows, G) those of its pair's source question; -1 where a question has no
#:   value k (or the row runs a resample donor). G is the batch's longest chain (it may be 0).
NEEDS: dict[str, tuple[str, ...]] = {
    "thoughts": ("thoughts", "lens"),
    "gold": ("gold", "source_gold"),
}
#: The per-row inputs every trace metric sees.
INPUTS: tuple[str, ...] = ("logits", "logp", "base_logits", "base_logp", "first", "cand", "n_decodable")
#: Set by `metric_function` on the function it declares.
DECLARATION = "__codi_metric__"


@dataclass(frozen=True)
class FunctionOrigin:
    """Which function computed a metric: recorded in the variable's attrs and the run fingerprint."""

    function: str  # module:qualname
    source_sha256: str  # sha256 of `inspect.getsource(fn)` (utf-8)
    bound: str  # JSON of the closure and default values the source does not show ("{}": none)

    def identity(self) -> str:
        """One line for the fingerprint: a changed body, closure value or default is another run."""
        out = f"{self.function} source_sha256={self.source_sha256}"
        return out if self.bound == "{}" else f"{out} bound={self.bound}"

    def attrs(self) -> dict[str, str]:
        """The Dataset variable's attrs."""
        return {"function": self.function, "function_source_sha256": self.source_sha256, "function_bound": self.bound}


def metric_function(
    fn: Callable[[dict[str, Any]], torch.Tensor] | None = None,
    *,
    needs: tuple[str, ...] | list[str] = (),
    long_name: str | None = None,
    units: str = "",
    per_run: bool = False,
    check: Callable[[Any], None] | None = None,
) -> Any:
    """Declare what a metric function needs and how its variable is described (a decorator).

    `needs`: names of `NEEDS` the trace should compute for it (default none: the answer-position
    inputs only). `long_name`, `units`: the variable's attrs (default: the function's first
    docstring line, no units). `per_run`: also store it for the unpatched baseline and source runs
    (`baseline_<name>`, `source_<name>`). `check(model)`: called before any work; raise
    `UserError` for a model the metric cannot run on. A plain function needs no declaration.
    """

    def declare(f: Callable[[dict[str, Any]], torch.Tensor]) -> Callable[[dict[str, Any]], torch.Tensor]:
        setattr(
            f,
            DECLARATION,
            {"needs": tuple(needs), "long_name": long_name, "units": units, "per_run": per_run, "check": check},
        )
        return f

    return declare if fn is None else declare(fn)


def user_metrics(metrics: Mapping[str, Any] | None) -> tuple[Metric, ...]:
    """The trace `Metric` of every `{name: function}` of `patch_sweep(metrics=...)`, checked.

    A function takes the dict `v` every trace metric sees — `logits`, `logp` (rows, V) float64
    answer-position logits and log-probabilities of each row, `base_logits`, `base_logp` those of
    its unpatched baseline row, `first` (rows, 2) the clean and corrupted answers' first token,
    `cand` (rows, 2) their teacher-forced log-probabilities, `n_decodable` (ids greedy decoding may
    emit), and what it `needs` (`NEEDS`) — and returns a (rows,) tensor, one value per row. It runs
    inside the trace, so torch only (remote sweeps run it on the server). Its source must be
    readable (`inspect.getsource`): the Dataset and `--resume` identify it by its sha256. Names
    are checked against the Dataset's own by `dataset.check_metric_names`.
    """
    if metrics is None:
        return ()
    if not isinstance(metrics, Mapping):
        raise UserError(f"metrics={metrics!r}: expected a dict {{name: function}}")
    return tuple(_user_metric(name, fn) for name, fn in metrics.items())


def _user_metric(name: Any, fn: Any) -> Metric:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise UserError(f"metrics: name {name!r} is not a variable name (letters, digits and _, not a digit first)")
    if not isinstance(fn, types.FunctionType):
        raise UserError(
            f"metrics[{name!r}]: expected a Python function (def or lambda) of the per-row inputs, "
            f"got {type(fn).__name__}"
        )
    spec = getattr(fn, DECLARATION, {})
    needs = tuple(spec.get("needs", ()))
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise UserError(f"metrics[{name!r}]: needs {unknown[0]!r} is not one of {', '.join(NEEDS)}")
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    long_name = spec.get("long_name") or (doc[0] if doc else f"metric function {fn.__qualname__}")
    return Metric(
        name,
        long_name,
        str(spec.get("units", "")),
        trace=fn,
        per_run=bool(spec.get("per_run", False)),
        needs=needs,
        origin=function_origin(name, fn),
    )


def function_origin(name: str, fn: types.FunctionType) -> FunctionOrigin:
    """`fn`'s module:qualname, the sha256 of its source and its bound values; a function without
    readable source is refused (its numbers could not be traced back to code)."""
    qualname = f"{fn.__module__}:{fn.__qualname__}"
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError) as e:
        raise UserError(
            f"metrics[{name!r}]: cannot read the source of {qualname} ({e}); define it in a file or a "
            "notebook cell, so the results can record its source hash"
        ) from None
    bound = {"closure": _closure(fn), "defaults": _defaults(fn)}
    bound = {k: v for k, v in bound.items() if v}
    return FunctionOrigin(
        qualname, hashlib.sha256(source.encode()).hexdigest(), json.dumps(bound, sort_keys=True, allow_nan=True)
    )


def _closure(fn: types.FunctionType, depth: int = 0) -> dict[str, Any]:
    out = {}
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            out[var] = _bound_value(cell.cell_contents, depth)
        except ValueError:  # an empty cell: a name assigned after the function was made
            out[var] = "<unset>"
    return out


def _defaults(fn: types.FunctionType) -> dict[str, Any]:
    code = fn.__code__
    names = code.co_varnames[: code.co_argcount]
    out = {n: _bound_value(d) for n, d in zip(names[len(names) - len(fn.__defaults__ or ()) :], fn.__defaults__ or ())}
    out.update({n: _bound_value(d) for n, d in (fn.__kwdefaults__ or {}).items()})
    return out


def _bound_value(x: Any, depth: int = 0) -> Any:
    """A closure or default value as JSON: plain data as is, tensors and arrays by content hash,
    functions by their own identity; anything else by its type only (documented: not fingerprinted)."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if depth < 4 and isinstance(x, (list, tuple)):
        return [_bound_value(y, depth + 1) for y in x]
    if depth < 4 and isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {k: _bound_value(y, depth + 1) for k, y in x.items()}
    if isinstance(x, (torch.Tensor, np.ndarray)):
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        return f"{type(x).__name__} {arr.dtype} {list(arr.shape)} sha256={hashlib.sha256(arr.tobytes()).hexdigest()}"
    if depth < 4 and isinstance(x, types.FunctionType):
        try:
            source = inspect.getsource(x)
        except (OSError, TypeError):
            return f"{x.__module__}:{x.__qualname__}"
        inner = {"closure": _closure(x, depth + 1)}
        digest = hashlib.sha256(source.encode()).hexdigest()
        return f"{x.__module__}:{x.__qualname__} source_sha256={digest}" + (
            f" bound={json.dumps(inner, sort_keys=True)}" if inner["closure"] else ""
        )
    return f"<{type(x).__module__}.{type(x).__qualname__}>"


def needed_inputs(metrics: tuple[Metric, ...]) -> set[str]:
    """The `NEEDS` names some metric asks for."""
    return {n for m in metrics for n in m.needs}


def check_metrics_on(model: Any, metrics: tuple[Metric, ...]) -> None:
    """Run every metric function's declared `check(model)` (before any work)."""
    for m in metrics:
        if m.origin is not None:
            check = getattr(m.trace, DECLARATION, {}).get("check")
            if check is not None:
                check(model)


# -- a shipped metric function -------------------------------------------------------------------
def gold_value_prob(
    value: int, thought: int | None = None, of: str = "own"
) -> Callable[[dict[str, Any]], torch.Tensor]:
    """Metric function: the logit-lens probability of gold intermediate value `value` at `thought`.

    Per row: `softmax(lm_head(final_norm(thought_k)))` at the first token of the question's gold
    intermediate value `value` (0-based), thought_k being the row's fed-back thought `thought`
    (default: `value`) — the output of the feedback module at the call that makes thought k, after
    the row's patch. `of="own"`: the gold value of the question the row runs (the target question
    in patched rows; its unpatched baseline and source runs read their own), `"source"`: the gold
    value of the pair's source question. NaN where that question has no gold value `value`. On
    an unpatched run this is the logit lens's `prj_intermediate_prob` at that thought.

    Use: `patch_sweep(model, pairs, metrics={"p_value_1": gold_value_prob(1)})`.
    """
    for arg, x in (("value", value), ("thought", thought)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 0):
            raise UserError(f"gold_value_prob: {arg}={x!r}: expected an int >= 0")
    if of not in ("own", "source"):
        raise UserError(f"gold_value_prob: of={of!r}: expected 'own' or 'source'")
    k = value if thought is None else thought
    key = "gold" if of == "own" else "source_gold"

    def check(model: Any) -> None:
        if k >= model.num_latent:
            raise UserError(
                f"gold_value_prob: thought {k} out of range (the model has {model.num_latent} thoughts, "
                f"0-{model.num_latent - 1})"
            )

    whose = "the question's" if of == "own" else "the source question's"

    @metric_function(
        needs=("thoughts", "gold"),
        long_name=f"logit-lens probability of {whose} gold intermediate value {value} at thought {k} "
        "(its first token; NaN: no such value)",
        units="probability",
        per_run=True,
        check=check,
    )
    def gold_value_prob_at_thought(v: dict[str, Any]) -> torch.Tensor:
        gold = v[key]
        nan = torch.full((gold.shape[0],), float("nan"), dtype=torch.float64, device=gold.device)
        if value >= gold.shape[1]:  # no question of this batch has that many values
            return nan
        probs = torch.softmax(v["lens"](v["thoughts"][:, k]), dim=-1)
        token = gold[:, value].to(probs.device)
        p = probs.gather(1, token.clamp(min=0)[:, None]).squeeze(1)
        return torch.where(token >= 0, p, nan.to(p.device))

    return gold_value_prob_at_thought


# -- metric functions named on the command line ----------------------------------------------------
def metric_option(text: str) -> tuple[str, Callable[[dict[str, Any]], torch.Tensor]]:
    """`(name, function)` of a CLI `--metric-fn NAME=WHERE:FUNCTION` value.

    WHERE is an importable module (`pkg.mod`) or a `.py` file; FUNCTION is a metric function's
    name, or a call of a factory with literal arguments (`gold_value_prob(1, thought=2)`), e.g.
    `p1=codi_nnsight.patching.metrics:gold_value_prob(1)` or `m=my_metrics.py:margin`. A file is
    loaded without registering it as a module, so Ray workers receive its functions by value.
    """
    import ast
    import importlib
    import importlib.util
    from pathlib import Path

    usage = (
        "expected NAME=MODULE:FUNCTION or NAME=FILE.py:FUNCTION "
        "(e.g. p1=codi_nnsight.patching.metrics:gold_value_prob(1))"
    )
    name, sep, target = text.partition("=")
    where, colon, expr = target.rpartition(":") if "(" not in target else _split_call(target)
    if not sep or not colon or not name.strip() or not where.strip() or not expr.strip():
        raise UserError(f"--metric-fn {text!r}: {usage}")
    name, where, expr = name.strip(), where.strip(), expr.strip()
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UserError(f"--metric-fn {text!r}: no file {where}")
            spec = importlib.util.spec_from_file_location(f"codi_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:  # the user's code: whatever it raises is one line here
        raise UserError(f"--metric-fn {text!r}: cannot load {where} ({type(e).__name__}: {e})") from None
    try:
        call = ast.parse(expr, mode="eval").body
    except SyntaxError:
        raise UserError(f"--metric-fn {text!r}: cannot read {expr!r}; {usage}") from None
    func = call.func if isinstance(call, ast.Call) else call
    if not isinstance(func, ast.Name) or not hasattr(module, func.id):
        raise UserError(f"--metric-fn {text!r}: {where} has no function {ast.unparse(func)!r}")
    fn = getattr(module, func.id)
    if isinstance(call, ast.Call):
        try:
            args = [ast.literal_eval(a) for a in call.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
        except ValueError:
            raise UserError(f"--metric-fn {text!r}: the arguments of {func.id} must be literals") from None
        fn = fn(*args, **kwargs)
    return name, fn


def metric_options(texts: Any) -> dict[str, Callable[[dict[str, Any]], torch.Tensor]] | None:
    """`patch_sweep(metrics=...)` from the CLI's repeated `--metric-fn` values (None: none given)."""
    out: dict[str, Callable[[dict[str, Any]], torch.Tensor]] = {}
    for text in texts or ():
        name, fn = metric_option(text)
        if name in out:
            raise UserError(f"--metric-fn: name {name!r} is given twice")
        out[name] = fn
    return out or None


def _split_call(target: str) -> tuple[str, str, str]:
    """`WHERE:factory(args)` split at the last ':' before the call's '('."""
    where, colon, expr = target[: target.index("(")].rpartition(":")
    return where, colon, expr + target[target.index("(") :]
