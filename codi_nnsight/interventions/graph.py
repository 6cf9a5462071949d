"""The thought-to-thought graph: intervene on thought i and measure every later thought j and the answer.

For each pair's clean question, each source thought i (latent token i's input embedding, or block
`layer`'s output at latent i) and each intervention, the run continues from the replaced state
and every later thought j > i is compared with the unedited run: L2 distance and cosine of the
thought, KL of its lens distribution (`softmax(lm_head(norm(thought)))`) and whether its top lens
token changed; the answer's KL and whether it changed. Entries with j ≤ i are NaN (the graph's
diagonal and below hold nothing: a thought cannot change an earlier one).

Interventions (the replacement of the state at i):

* ``zero``; ``mean``: its mean over the pairs' clean questions;
* ``resample``: the same site of the next pair's clean question (a problem of the same class:
  the *noise floor* an edge must exceed to count);
* ``noise``: σ·z, z ~ N(0, I_d) seeded per (pair, source), σ = mean‖h‖/√d × `noise_scale`, the
  mean over the clean questions at that position — so E‖σz‖² = (mean‖h‖·scale)²
  (`patching.ablation.norm_scaled_sigma`; σ is stored per source).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..errors import UserError
from ..patching.ablation import norm_scaled_sigma, seeded_normal
from ..run import Executor, Run
from .common import attrs, base_runs, check_choices, check_layers, check_thoughts, variable
from .core import Edit, Row, run_rows

SCHEMA = "codi-nnsight/thought-graph/1"
INTERVENTIONS = ("zero", "mean", "resample", "noise")

__all__ = ["INTERVENTIONS", "SCHEMA", "thought_graph"]


def thought_graph(
    model: Any,
    pairs: Sequence[Any],
    interventions: Sequence[str] = INTERVENTIONS,
    layer: int | None = None,
    noise_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    remote: bool | str = False,
    workers: int | Executor | None = None,
    ray_address: str | None = None,
) -> xr.Dataset:
    """A K × K matrix per pair and intervention: how replacing thought i moves thought j > i and the answer.

    Returns a Dataset with dims (pair, intervention, source, target) and attr
    `codi_nnsight_schema = "codi-nnsight/thought-graph/1"` (variables: docs/interventions.md).
    `workers` / `ray_address` shard the traces over Ray workers (docs/sharding.md).
    """
    interventions = check_choices(interventions, INTERVENTIONS, "--interventions", pairs, "resample")
    if not (isinstance(noise_scale, (int, float)) and np.isfinite(noise_scale) and noise_scale >= 0):
        raise UserError(f"--noise-scale {noise_scale!r}: expected a number >= 0")
    K = model.num_latent
    sources = check_thoughts(model, None)
    L = (check_layers(model, None if layer is None else [layer]) or [None])[0]
    # A refused target, a weightless local run or workers that cannot run: one line, before any work;
    # one executor (one Ray cluster with workers) for every loop of the command.
    with Run(model, remote, workers=workers, ray_address=ray_address) as run:
        model.check_fits(list(pairs), extra=K + 16 + (max_new_tokens or 32))
        from ..patching.plan import answer_tokens
        from .common import site_state

        qs = [p.clean for p in pairs]
        index, base = base_runs(model, run, qs, [] if L is None else [L], batch_size)
        states = np.stack([[site_state(base, index[q.question], k, L) for k in range(K)] for q in qs])  # (P, K, d)
        d = states.shape[-1]
        mean = states.mean(0)
        mean_norm = np.linalg.norm(states, axis=-1).mean(0)  # (K,)
        sigma = np.array([norm_scaled_sigma(mean_norm[k], d, noise_scale) for k in range(K)])
        rows, where = [], []
        for i, q in enumerate(qs):
            toks = answer_tokens(model, q.answer, q.answer)
            for xi, kind in enumerate(interventions):
                for k in sources:
                    if kind == "zero":
                        vec = np.zeros(d)
                    elif kind == "mean":
                        vec = mean[k]
                    elif kind == "resample":
                        vec = states[(i + 1) % len(qs), k]
                    else:
                        vec = sigma[k] * seeded_normal(d, (seed, int(pairs[i].pair_id), k))
                    rows.append(
                        Row(q.question, tuple(toks.suffix), [toks.clean], [Edit(k, "set", torch.as_tensor(vec), L)])
                    )
                    where.append((i, xi, k))
        got = run_rows(model, run, rows, batch_size, max_new_tokens=max_new_tokens)
        P, X = len(qs), len(interventions)
        graph = {n: np.full((P, X, K, K), np.nan) for n in ("state_l2", "state_cos", "lens_kl", "lens_top_changed")}
        answer, kl, changed = (np.full((P, X, K), np.nan) for _ in range(3))
        later = np.arange(K)
        text_changed = got.changed()
        for r, (i, xi, k) in enumerate(where):
            changed[i, xi, k] = text_changed[r]
            keep = later > k  # j ≤ k: the diagonal and below hold nothing
            graph["state_l2"][i, xi, k, keep] = got.state_l2[r, keep]
            graph["state_cos"][i, xi, k, keep] = got.state_cos[r, keep]
            graph["lens_kl"][i, xi, k, keep] = got.lens_kl[r, keep]
            graph["lens_top_changed"][i, xi, k, keep] = got.lens_top_changed[r, keep]
            answer[i, xi, k], kl[i, xi, k] = got.answer[r], got.kl[r]
        base_a = np.array([base.answer[index[q.question]] for q in qs])
        g = ("pair", "intervention", "source", "target")
        a = ("pair", "intervention", "source")
        what = "thought j" if L is None else f"block {L}'s output at latent j"
        data = {
            "state_l2": variable(g, graph["state_l2"], f"‖{what} − unedited‖ (NaN: j ≤ i)", "state units"),
            "state_cos": variable(
                g, graph["state_cos"], f"cosine of {what} with the unedited one (NaN: j ≤ i)", "cosine"
            ),
            "lens_kl": variable(
                g, graph["lens_kl"], "KL of thought j's lens distribution from the unedited one", "nats"
            ),
            "lens_top_changed": variable(g, graph["lens_top_changed"], "thought j's top lens token changed", "share"),
            "kl": variable(a, kl, "KL(intervened || unedited) at the answer position", "nats"),
            "answer": variable(a, answer, "answer decoded after the intervention", "answer value"),
            "answer_changed": variable(a, changed, "the decoded answer text differs from the unedited one", "share"),
            "noise_sigma": variable(
                ("source",), sigma, "σ of the noise intervention: mean‖h‖/√d × noise_scale", "state units"
            ),
            "mean_state_norm": variable(("source",), mean_norm, "mean ‖h‖ over the clean questions", "state units"),
            "base_answer": variable(("pair",), base_a, "unedited decoded answer", "answer value"),
        }
        coords = {
            "pair": np.array([int(p.pair_id) for p in pairs], dtype=np.int64),
            "intervention": np.array(interventions, dtype=object),
            "source": ("source", np.arange(K, dtype=np.int64), {"long_name": "thought i intervened on"}),
            "target": ("target", np.arange(K, dtype=np.int64), {"long_name": "later thought j measured"}),
        }
        meta = attrs(
            model,
            pairs,
            SCHEMA,
            run,
            L,
            noise_scale=float(noise_scale),
            noise_sigma_rule="sigma = mean ||h|| / sqrt(d) * noise_scale, mean over the clean questions per position",
            noise_floor="resample",
            seed=int(seed),
        )
        return xr.Dataset(data, coords=coords, attrs=meta)
