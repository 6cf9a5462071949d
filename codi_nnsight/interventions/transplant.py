"""Thought transplant: run problem A with its thought k (or block L's output at latent k) taken from problem B.

The recipient A is each pair's clean question; the donor B is, per `donors`:

* ``twin``: the pair's corrupted question (one number changed: its intermediates equal A's
  before the changed number enters the chain and differ after);
* ``next``: the clean question of the next pair (cyclically; a different problem);
* ``self``: A itself (a transplant that must change nothing: the invariant check).

The donor's state comes from its own unedited run (`common.base_runs`), and the recipient's run
continues from the transplanted state through every later step (the total effect). Does the
answer then follow A, B, or B's intermediate carried through A's remaining steps
(`chain.carried_answer`: A's chain with B's value at step s)?
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..run import Executor, Run
from .chain import carried_answer
from .common import (
    attrs,
    base_runs,
    check_choices,
    check_layers,
    check_thoughts,
    gold_table,
    same,
    site_state,
    variable,
)
from .core import Edit, Row, run_rows

SCHEMA = "codi-nnsight/transplant/1"
DONORS = ("twin", "next", "self")

__all__ = ["DONORS", "SCHEMA", "donor_question", "transplant"]


def donor_question(pairs: Sequence[Any], i: int, donor: str) -> Any:
    """Pair i's donor question of kind `donor` (see the module docstring)."""
    if donor == "twin":
        return pairs[i].corrupted
    if donor == "next":
        return pairs[(i + 1) % len(pairs)].clean
    return pairs[i].clean


def transplant(
    model: Any,
    pairs: Sequence[Any],
    thoughts: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    donors: Sequence[str] = ("twin", "next"),
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    remote: bool | str = False,
    workers: int | Executor | None = None,
    ray_address: str | None = None,
) -> xr.Dataset:
    """Transplant thought k (or block L's output at latent k, with `layers`) from a donor problem.

    Returns a Dataset with dims `(pair, donor, thought[, layer][, intermediate])` and attr
    `codi_nnsight_schema = "codi-nnsight/transplant/1"` (variables: docs/interventions.md).
    `workers` / `ray_address` shard the traces over Ray workers (docs/sharding.md).
    """
    donors = check_choices(donors, DONORS, "--donors", pairs, "next")
    ks = check_thoughts(model, thoughts)
    site_layers = check_layers(model, layers)
    # A refused target, a weightless local run or workers that cannot run: one line, before any work;
    # one executor (one Ray cluster with workers) for every loop of the command.
    with Run(model, remote, workers=workers, ray_address=ray_address) as run:
        model.check_fits(list(pairs), extra=model.num_latent + 16 + (max_new_tokens or 32))
        from ..patching.plan import answer_tokens

        lay = site_layers or [None]
        recipients = [p.clean for p in pairs]
        donor_qs = [[donor_question(pairs, i, d) for d in donors] for i in range(len(pairs))]
        index, base = base_runs(
            model, run, recipients + [q for qs in donor_qs for q in qs], [L for L in lay if L is not None], batch_size
        )
        rows, where = [], []
        for i, a in enumerate(recipients):
            for di, b in enumerate(donor_qs[i]):
                toks = answer_tokens(model, a.answer, b.answer)
                for ti, k in enumerate(ks):
                    for li, L in enumerate(lay):
                        vec = site_state(base, index[b.question], k, L)
                        rows.append(
                            Row(a.question, tuple(toks.suffix), [toks.clean, toks.corrupted], [Edit(k, "set", vec, L)])
                        )
                        where.append((i, di, ti, li))
        got = run_rows(model, run, rows, batch_size, max_new_tokens=max_new_tokens)
        shape = (len(pairs), len(donors), len(ks), len(lay))
        arrays = {
            n: np.full(shape, np.nan)
            for n in ("answer", "answer_changed", "kl", "logp_recipient_answer", "logp_donor_answer")
        }
        changed = got.changed()
        for r, idx in enumerate(where):
            arrays["answer_changed"][idx] = changed[r]
            arrays["answer"][idx] = got.answer[r]
            arrays["kl"][idx] = got.kl[r]
            arrays["logp_recipient_answer"][idx] = got.cand_logp[r, 0]
            arrays["logp_donor_answer"][idx] = got.cand_logp[r, 1]
        gold_a, n_gold = gold_table(recipients)
        gold_b = np.full((len(pairs), len(donors), n_gold), np.nan)
        carried = np.full((len(pairs), len(donors), n_gold), np.nan)
        for i, a in enumerate(recipients):
            for di, b in enumerate(donor_qs[i]):
                g, _ = gold_table([b])
                gold_b[i, di, : min(n_gold, g.shape[1])] = g[0, :n_gold]
                for s in range(n_gold):
                    carried[i, di, s] = carried_answer(a, s, gold_b[i, di, s])
        ans_a = np.array([float(a.answer) for a in recipients])
        ans_b = np.array([[float(b.answer) for b in qs] for qs in donor_qs])
        base_a = np.array([base.answer[index[a.question]] for a in recipients])
        answer = arrays["answer"]
        dims = ("pair", "donor", "thought", "layer")
        follows_carried = same(answer[..., None], carried[:, :, None, None, :])
        data = {
            "answer": variable(dims, answer, "answer decoded after the transplant", "answer value"),
            "follows_recipient": variable(
                dims, same(answer, ans_a[:, None, None, None]), "the answer is the recipient's true answer", "share"
            ),
            "follows_donor": variable(
                dims, same(answer, ans_b[:, :, None, None]), "the answer is the donor's true answer", "share"
            ),
            "follows_carried": variable(
                dims + ("intermediate",),
                follows_carried,
                "the answer is the recipient's chain carried on from the donor's value at this intermediate step",
                "share",
            ),
            "answer_changed": variable(
                dims,
                arrays["answer_changed"],
                "the decoded answer text differs from the recipient's unedited one",
                "share",
            ),
            "kl": variable(dims, arrays["kl"], "KL(transplanted || unedited) at the answer position", "nats"),
            "logp_recipient_answer": variable(
                dims, arrays["logp_recipient_answer"], "log-probability of the recipient's true answer", "nats"
            ),
            "logp_donor_answer": variable(
                dims, arrays["logp_donor_answer"], "log-probability of the donor's true answer", "nats"
            ),
            "carried_answer": variable(
                ("pair", "donor", "intermediate"),
                carried,
                "recipient's answer with the donor's value at this step carried through its chain (NaN: no chain)",
                "answer value",
            ),
            "intermediate_equal": variable(
                ("pair", "donor", "intermediate"),
                same(gold_a[:, None, :], gold_b),
                "recipient and donor have the same gold value at this step",
                "share",
            ),
            "recipient_gold": variable(
                ("pair", "intermediate"), gold_a, "recipient's gold intermediate values", "value"
            ),
            "donor_gold": variable(
                ("pair", "donor", "intermediate"), gold_b, "donor's gold intermediate values", "value"
            ),
            "recipient_base_answer": variable(("pair",), base_a, "recipient's unedited decoded answer", "answer value"),
            "recipient_true_answer": variable(("pair",), ans_a, "recipient's true answer", "answer value"),
            "donor_true_answer": variable(("pair", "donor"), ans_b, "donor's true answer", "answer value"),
        }
        coords = {
            "pair": np.array([int(p.pair_id) for p in pairs], dtype=np.int64),
            "donor": np.array(donors, dtype=object),
            "thought": ("thought", np.array(ks, dtype=np.int64), {"long_name": "latent position k"}),
            "layer": (
                "layer",
                np.array([-1 if L is None else L for L in lay], dtype=np.int64),
                {"long_name": "block whose output at latent k is transplanted (-1: the thought itself)"},
            ),
            "intermediate": np.arange(n_gold, dtype=np.int64),
        }
        ds = xr.Dataset(data, coords=coords)
        if site_layers is None:
            ds = ds.squeeze("layer", drop=True)
        ds.attrs = attrs(
            model,
            pairs,
            SCHEMA,
            run,
            None if site_layers is None else site_layers[0],
            recipient="each pair's clean question",
            donors=",".join(donors),
        )
        if site_layers is not None:
            ds.attrs["layer"] = ",".join(str(L) for L in site_layers)
        return ds
