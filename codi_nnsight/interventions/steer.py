"""Steering: add λ·‖h‖·v̂ to a thought (or block L's output at latent k), or project v̂ out of it.

The site is thought k (`layer` None: latent token k's input embedding) or block `layer`'s output
at latent k; with `probe=` (a `probe.nc` Dataset or path) it is the latent step, layer and
intermediate whose value probe is most selective (accuracy minus control).

Directions v̂ (unit vectors, fitted on the states of both variants of `fit_pairs`, default `pairs`):

* ``probe``: a ridge-regression value probe for gold intermediate `intermediate` at the site
  (p(h) = w·(h − mean h) + mean value); v̂ = w/‖w‖, so +λ raises the value it reads;
* ``mean-diff``: the mean state of the questions whose intermediate is b minus that of those with
  a (`classes`, default the two most frequent values, a < b);
* ``random0`` …: `n_random` random unit directions (seeded), the control;
* any `{name: vector}` given in `directions`.

Each pair's clean question is steered with every direction at every scale λ (units of the state's
own norm: λ = 1 adds a vector as long as the state). With `project=True` the scale is the share
of the state's component along v̂ that is removed (1: all of it). The value a steered state
"predicts" is the value probe's reading of it, rounded (the same rule for every direction); the
predicted answer is the question's chain carried on from that value (`chain.carried_answer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..errors import UserError
from ..run import Executor, Run
from .chain import carried_answer
from .common import attrs, base_runs, check_layers, check_thoughts, gold_table, same, site_state, variable
from .core import Edit, Row, run_rows

SCHEMA = "codi-nnsight/steer/1"
DEFAULT_SCALES = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)

__all__ = ["DEFAULT_SCALES", "SCHEMA", "best_probe_site", "ridge_probe", "steer"]


def best_probe_site(probe: Any) -> tuple[int, int, int]:
    """(thought k, layer, intermediate j) of the most selective value probe at a latent step of `probe.nc`."""
    ds = xr.load_dataset(probe) if not isinstance(probe, xr.Dataset) else probe
    if str(ds.attrs.get("codi_nnsight_schema", "")).split("/")[1:2] != ["probe"]:
        raise UserError(f"--probe {probe if not isinstance(probe, xr.Dataset) else 'Dataset'}: not a probe.nc file")
    steps = [s for s in ds["step"].values if str(s).isdigit()]
    targets = [t for t in ds["target"].values if str(t).startswith("value")]
    sel = ds["selectivity"].sel(step=steps, target=targets)
    if not np.isfinite(sel.values).any():
        raise UserError("--probe: no value probe at a latent step has a selectivity (too few questions?)")
    s, L, t = np.unravel_index(np.nanargmax(sel.values), sel.shape)
    return int(steps[s]), int(sel["layer"].values[L]), int(str(targets[t])[5:])


def ridge_probe(x: np.ndarray, y: np.ndarray, alpha: float = 1e-2) -> tuple[np.ndarray, float, np.ndarray]:
    """Ridge regression of `y` (n,) on `x` (n, d): (w, intercept at the mean state, mean state).

    The penalty is `alpha` times the mean eigenvalue of the centred covariance (scale-free).
    """
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(np.unique(y)) < 2:
        raise UserError("the value probe needs at least two distinct gold values at this step")
    mu, my = x.mean(0), y.mean()
    xc = x - mu
    gram = xc.T @ xc
    lam = alpha * max(np.trace(gram) / gram.shape[0], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ (y - my))
    return w, float(my), mu


def steer(
    model: Any,
    pairs: Sequence[Any],
    intermediate: int | None = None,
    thought: int | None = None,
    layer: int | None = None,
    probe: Any = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    directions: Sequence[str] | Mapping[str, Any] = ("probe", "mean-diff", "random"),
    n_random: int = 3,
    classes: tuple[float, float] | None = None,
    project: bool = False,
    fit_pairs: Sequence[Any] | None = None,
    seed: int = 0,
    alpha: float = 1e-2,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    remote: bool | str = False,
    workers: int | Executor | None = None,
    ray_address: str | None = None,
) -> xr.Dataset:
    """Steer each pair's clean question along value-probe, mean-difference and random directions.

    Returns a Dataset with dims (pair, direction, scale) and attr
    `codi_nnsight_schema = "codi-nnsight/steer/1"` (variables: docs/interventions.md).
    `workers` / `ray_address` shard the traces over Ray workers (docs/sharding.md).
    """
    if not len(pairs):
        raise UserError("steer needs at least one pair")
    if probe is not None:
        thought, layer, intermediate = best_probe_site(probe)
    k = check_thoughts(model, [model.num_latent - 1 if thought is None else thought], "--thought")[0]
    L = (check_layers(model, None if layer is None else [layer]) or [None])[0]
    j = 0 if intermediate is None else int(intermediate)
    scales = [float(s) for s in scales]
    if not scales:
        raise UserError("--scales: expected at least one scale")
    # A refused target, a weightless local run or workers that cannot run: one line, before any work;
    # one executor (one Ray cluster with workers) for every loop of the command.
    with Run(model, remote, workers=workers, ray_address=ray_address) as run:
        model.check_fits(list(pairs), extra=model.num_latent + 16 + (max_new_tokens or 32))
        fit_pairs = pairs if fit_pairs is None else fit_pairs
        fit_qs = [q for p in fit_pairs for q in (p.clean, p.corrupted)]
        recipients = [p.clean for p in pairs]
        layers = [] if L is None else [L]
        index, base = base_runs(model, run, recipients + fit_qs, layers, batch_size)
        x = np.stack([site_state(base, index[q.question], k, L) for q in fit_qs])
        gold_fit, n_fit = gold_table(fit_qs)
        if j >= n_fit or not np.isfinite(gold_fit[:, j]).any():  # pairs without chains: none at all
            raise UserError(f"--intermediate {j}: no question of the fitting pairs has a gold value at this step")
        y = gold_fit[:, j]
        w, my, mu = ridge_probe(x, y, alpha)
        vecs, a_b = _directions(directions, n_random, x, y, w, classes, seed)
        names = list(vecs)
        unit = np.stack([vecs[n] / np.linalg.norm(vecs[n]) for n in names])
        rows, where, predicted = [], [], np.full((len(pairs), len(names), len(scales)), np.nan)
        from ..patching.plan import answer_tokens

        for i, a in enumerate(recipients):
            h = site_state(base, index[a.question], k, L)
            for di, v in enumerate(unit):
                for si, s in enumerate(scales):
                    if project:
                        edit, h2 = Edit(k, "project", v, L, share=s), h - s * float(h @ v) * v
                    else:
                        edit, h2 = Edit(k, "add", s * v, L), h + s * float(np.linalg.norm(h)) * v
                    value = float(np.round(w @ (h2 - mu) + my))
                    predicted[i, di, si] = carried_answer(a, j, value)
                    target = predicted[i, di, si] if np.isfinite(predicted[i, di, si]) else a.answer
                    toks = _tokens(answer_tokens, model, a.answer, target)
                    rows.append(Row(a.question, tuple(toks.suffix), [toks.clean, toks.corrupted], [edit]))
                    where.append((i, di, si))
        got = run_rows(model, run, rows, batch_size, max_new_tokens=max_new_tokens)
        shape = predicted.shape
        answer, kl, lp_a, lp_p, changed = (np.full(shape, np.nan) for _ in range(5))
        text_changed = got.changed()
        for r, idx in enumerate(where):
            changed[idx] = text_changed[r]
            answer[idx], kl[idx], lp_a[idx] = got.answer[r], got.kl[r], got.cand_logp[r, 0]
            lp_p[idx] = got.cand_logp[r, 1] if np.isfinite(predicted[idx]) else np.nan
        base_a = np.array([base.answer[index[a.question]] for a in recipients])
        true_a = np.array([float(a.answer) for a in recipients])
        moved = np.where(same(predicted, true_a[:, None, None]) == 0, predicted, np.nan)
        dims = ("pair", "direction", "scale")
        gold_r, _ = gold_table(recipients)
        data = {
            "answer": variable(dims, answer, "answer decoded after steering", "answer value"),
            "answer_changed": variable(dims, changed, "the decoded answer text differs from the unedited one", "share"),
            "follows_predicted": variable(
                dims,
                same(answer, moved),
                "the answer is the chain's answer with the value the steered state reads as "
                "(NaN where that is the question's own answer)",
                "share",
            ),
            "predicted_answer": variable(
                dims,
                predicted,
                "the chain's answer with the value probe's reading of the steered state",
                "answer value",
            ),
            "kl": variable(dims, kl, "KL(steered || unedited) at the answer position", "nats"),
            "logp_answer": variable(dims, lp_a, "log-probability of the question's true answer", "nats"),
            "logp_predicted_answer": variable(dims, lp_p, "log-probability of the predicted answer", "nats"),
            "direction_vector": variable(("direction", "hidden"), unit, "unit direction v", "state units"),
            "probe_alignment": variable(
                ("direction",), unit @ (w / np.linalg.norm(w)), "cosine of v with the value probe's weights", "cosine"
            ),
            "gold_value": variable(
                ("pair",),
                gold_r[:, j] if gold_r.shape[1] > j else np.full(len(pairs), np.nan),
                "gold value at the steered intermediate",
                "value",
            ),
            "base_answer": variable(("pair",), base_a, "unedited decoded answer", "answer value"),
            "true_answer": variable(("pair",), true_a, "the question's true answer", "answer value"),
        }
        coords = {
            "pair": np.array([int(p.pair_id) for p in pairs], dtype=np.int64),
            "direction": np.array(names, dtype=object),
            "scale": (
                "scale",
                np.array(scales, dtype=np.float64),
                {
                    "long_name": "share of the component along v removed"
                    if project
                    else "λ, in units of the state's norm"
                },
            ),
        }
        meta = attrs(
            model,
            pairs,
            SCHEMA,
            run,
            L,
            thought=k,
            intermediate=j,
            operation="project" if project else "add",
            probe_alpha=float(alpha),
            probe_site_from=str(probe)
            if probe is not None and not isinstance(probe, xr.Dataset)
            else ("probe Dataset" if probe is not None else ""),
            mean_diff_classes="" if a_b is None else f"{a_b[0]:g},{a_b[1]:g}",
            seed=int(seed),
            n_fit_questions=len(fit_qs),
        )
        return xr.Dataset(data, coords=coords, attrs=meta)


def _tokens(answer_tokens: Any, model: Any, a: float, b: float) -> Any:
    """`answer_tokens(a, b)`, or (a, a) when b puts other tokens before the number."""
    try:
        return answer_tokens(model, a, b)
    except UserError:
        return answer_tokens(model, a, a)


def _directions(
    directions: Sequence[str] | Mapping[str, Any],
    n_random: int,
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    classes: tuple[float, float] | None,
    seed: int,
) -> tuple[dict[str, np.ndarray], tuple[float, float] | None]:
    """{name: vector} of the directions asked for, and the mean-difference classes (a, b) if used."""
    if isinstance(directions, Mapping):
        out = {str(n): np.asarray(v, dtype=np.float64) for n, v in directions.items()}
        bad = [n for n, v in out.items() if v.shape != (x.shape[1],) or not np.linalg.norm(v) > 0]
        if bad:
            raise UserError(f"direction {bad[0]!r}: expected a nonzero vector of length {x.shape[1]}")
        return out, None
    known = ("probe", "mean-diff", "random")
    bad = [n for n in directions if n not in known]
    if bad or not directions:
        raise UserError(f"--directions {','.join(bad) or '(none)'}: expected some of {', '.join(known)}")
    out: dict[str, np.ndarray] = {}
    a_b = None
    for name in directions:
        if name == "probe":
            out["probe"] = w
        elif name == "mean-diff":
            a_b = classes or _two_most_frequent(y)
            ma, mb = (y == a_b[0]), (y == a_b[1])
            if not ma.any() or not mb.any():
                missing = a_b[0] if not ma.any() else a_b[1]
                raise UserError(f"--classes {a_b[0]:g},{a_b[1]:g}: no fitting question has value {missing:g}")
            out["mean-diff"] = x[mb].mean(0) - x[ma].mean(0)
        else:
            rng = np.random.default_rng(seed)
            for r in range(n_random):
                out[f"random{r}"] = rng.standard_normal(x.shape[1])
    return out, a_b


def _two_most_frequent(y: np.ndarray) -> tuple[float, float]:
    values, counts = np.unique(y[np.isfinite(y)], return_counts=True)
    if len(values) < 2:
        raise UserError("the mean-difference direction needs two distinct gold values at this step")
    top = sorted(values[np.argsort(-counts, kind="stable")[:2]])
    return float(top[0]), float(top[1])
