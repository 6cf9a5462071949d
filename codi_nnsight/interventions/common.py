"""What the intervention commands share: argument checks, the unedited runs, site states and attrs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UserError
from ..readouts.gold import gold_intermediates
from .core import Row, RowResults, run_rows

__all__ = [
    "attrs",
    "base_runs",
    "check_choices",
    "check_layers",
    "check_thoughts",
    "gold_table",
    "same",
    "site_state",
    "variable",
]


def check_choices(
    values: Sequence[str], allowed: Sequence[str], flag: str, pairs: Sequence[Any], two: str
) -> list[str]:
    """`values` without repeats, each one of `allowed`; `pairs` non-empty, and at least 2 when `two` is asked for."""
    out = list(dict.fromkeys(values))
    bad = [v for v in out if v not in allowed]
    if bad or not out:
        raise UserError(f"{flag} {','.join(bad) or '(none)'}: expected some of {', '.join(allowed)}")
    if not len(pairs):
        raise UserError("no pairs to intervene on")
    if two in out and len(pairs) < 2:
        raise UserError(f"the '{two}' {flag.strip('-')[:-1]} needs at least 2 pairs (each takes the next pair's state)")
    return out


def attrs(model: Any, pairs: Any, schema: str, run: Any, layer: int | None, **extra: Any) -> dict[str, Any]:
    """A file's attrs: the readouts' provenance (`readouts.common.provenance`), the site and `extra`."""
    from ..readouts.common import provenance

    site = {"site": "thought" if layer is None else "resid", "layer": -1 if layer is None else int(layer)}
    return provenance(model, pairs, schema, run=run, **site, **extra)


def check_thoughts(model: Any, thoughts: Sequence[int] | None, flag: str = "--thoughts") -> list[int]:
    """The latent positions asked for (default: all K), each in 0..K-1."""
    K = model.num_latent
    out = list(range(K)) if thoughts is None else [int(k) for k in thoughts]
    bad = [k for k in out if not 0 <= k < K]
    if bad:
        raise UserError(f"{flag}: thought {bad[0]} out of range 0..{K - 1}")
    if not out:
        raise UserError(f"{flag}: expected at least one thought")
    return out


def check_layers(model: Any, layers: Sequence[int] | None) -> list[int] | None:
    """The residual-stream layers asked for, each in range (None: the thoughts themselves)."""
    if layers is None:
        return None
    out = [int(L) for L in layers]
    bad = [L for L in out if not 0 <= L < model.n_layers]
    if bad:
        raise UserError(
            f"--layers: layer {bad[0]} out of range (model has {model.n_layers} layers, 0-{model.n_layers - 1})"
        )
    return out


def base_runs(
    model: Any, run: Any, questions: Sequence[Any], layers: Sequence[int] = (), batch_size: int = 16
) -> tuple[dict[str, int], RowResults]:
    """Unedited runs of `questions` (data.pairs.Question): {question text: row} and their results."""
    from ..patching.plan import answer_tokens

    unique = list({q.question: q for q in questions}.values())
    rows = []
    for q in unique:
        toks = answer_tokens(model, q.answer, q.answer)
        rows.append(Row(q.question, tuple(toks.suffix), [toks.clean]))
    return {q.question: i for i, q in enumerate(unique)}, run_rows(model, run, rows, batch_size, layers)


def site_state(got: RowResults, row: int, k: int, layer: int | None) -> np.ndarray:
    """The state at latent position k of a base run: the thought (`layer` None) or block `layer`'s output."""
    return got.thoughts[row, k] if layer is None else got.states[layer][row, k]


def gold_table(questions: Sequence[Any]) -> tuple[np.ndarray, int]:
    """Gold intermediates (questions, S) NaN-padded, and S."""
    golds = [gold_intermediates(q) for q in questions]
    n = max((len(g) for g in golds), default=0)
    out = np.full((len(questions), n), np.nan)
    for i, g in enumerate(golds):
        out[i, : len(g)] = g
    return out, n


def variable(dims: tuple[str, ...], data: Any, long_name: str, units: str) -> tuple:
    """One data variable with its long name and units."""
    return (dims, data, {"long_name": long_name, "units": units})


def same(answer: Any, target: Any) -> np.ndarray:
    """1.0 where the decoded `answer` equals `target`, 0.0 where it differs (or has no number), NaN where
    `target` is NaN (nothing to compare with)."""
    a, b = np.broadcast_arrays(np.asarray(answer, dtype=float), np.asarray(target, dtype=float))
    out = (a == b).astype(float)
    out[~np.isfinite(b)] = np.nan
    return out
