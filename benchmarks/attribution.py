"""Benchmark: attribution patching (AtP) vs the exact sweep on the same grid, speed and agreement.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/attribution.py --threads 1 --pairs 24 --random-shape toy

For the bundled toy model (its demo pairs) and one random-weight shape (synthetic pairs), with the
grid every layer × latent position × component (`resid`, `attn`, `mlp`, `latent`, `head`):

* `exact_s` — `patch_sweep(..., positions="each")`, one run per component (as users call it);
* `atp_s` — `attribution_sweeps` over all components at once (one clean forward, one forward with
  autograd and one backward per metric, per batch); `atp_one_metric_s` differentiates
  `logprob_diff` only;
* `speed_ratio` = exact_s / atp_s (best of `--repeat`);
* `agreement` — `compare_with_exact` per component (Spearman, top-10 recall, ...), on `logprob_diff`;
* `atpstar_one_metric_s`, `agreement_atpstar_graddrop` — the same for `method="atp*"` (AtP* GradDrop
  score `atpstar_logprob_diff`: one more target forward and backward per decoder layer; timed once).

JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from codi_nnsight.data.pairs import load_pairs  # noqa: E402
from codi_nnsight.data.synthetic import make_synthetic_pairs  # noqa: E402
from codi_nnsight.model import load_model  # noqa: E402
from codi_nnsight.model.wrapper import DTYPES  # noqa: E402
from codi_nnsight.patching.attribution import attribution_sweeps, compare_with_exact  # noqa: E402
from codi_nnsight.patching.sweep import patch_sweep, versions  # noqa: E402
from codi_nnsight.testing.tiny import random_codi  # noqa: E402

COMPONENTS = ("resid", "attn", "mlp", "latent", "head")


def _best(fn: Any, repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench(name: str, model: Any, pairs: list[Any], batch_size: int, repeat: int) -> dict[str, Any]:
    """Times and agreement of AtP against the exact sweep on every component of one model."""
    atp_s, parts = _best(lambda: attribution_sweeps(model, pairs, COMPONENTS, batch_size=batch_size), repeat)
    one_s, _ = _best(
        lambda: attribution_sweeps(model, pairs, COMPONENTS, metrics=("logprob_diff",), batch_size=batch_size), repeat
    )
    star_s, star = _best(
        lambda: attribution_sweeps(
            model, pairs, COMPONENTS, metrics=("logprob_diff",), batch_size=batch_size, method="atp*"
        ),
        1,
    )
    exact_total, per_comp, agreement, agreement_star = 0.0, {}, {}, {}
    for c in COMPONENTS:
        t, exact = _best(
            lambda c=c: patch_sweep(model, pairs, component=c, positions="each", batch_size=batch_size), repeat
        )
        exact_total += t
        per_comp[c] = round(t, 4)
        agreement.update(compare_with_exact(parts[c], exact))
        agreement_star.update(compare_with_exact(star[c], exact, estimate="atpstar"))
    return {
        "model": name,
        "n_layers": model.n_layers,
        "num_latent": model.num_latent,
        "pairs": len(pairs),
        "dtype": str(model.dtype).replace("torch.", ""),
        "exact_s": round(exact_total, 4),
        "exact_s_by_component": per_comp,
        "atp_s": round(atp_s, 4),
        "atp_one_metric_s": round(one_s, 4),
        "speed_ratio": round(exact_total / atp_s, 2),
        "speed_ratio_one_metric": round(exact_total / one_s, 2),
        "atpstar_one_metric_s": round(star_s, 4),
        "agreement": {c: {k: round(v, 4) for k, v in d.items()} for c, d in agreement.items()},
        "agreement_atpstar_graddrop": {c: {k: round(v, 4) for k, v in d.items()} for c, d in agreement_star.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=24, help="pairs per model (toy: the first N demo pairs)")
    ap.add_argument("--random-shape", default="toy", help="a `testing.tiny.SHAPES` name (random weights)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from codi_nnsight.cli import default_pairs

    results = []
    toy = load_model(dtype=args.dtype, device="cpu")
    toy_pairs = list(load_pairs(default_pairs()))[: args.pairs]
    bench("warm-up", toy, toy_pairs[:1], 1, 1)  # first-call costs (imports, nnsight) out of the timings
    results.append(bench("toy (bundled)", toy, toy_pairs, args.batch_size, args.repeat))
    rnd = random_codi(args.random_shape, dtype=DTYPES[args.dtype], device="cpu")
    pairs = make_synthetic_pairs(args.pairs, seed=0)
    results.append(bench(f"random {args.random_shape}", rnd, list(pairs), args.batch_size, args.repeat))
    json.dump(
        {
            "command": " ".join(["python", *sys.argv]),
            "threads": torch.get_num_threads(),
            **versions(),
            "results": results,
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
