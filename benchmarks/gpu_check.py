"""GPU readiness check: the large sweep in `all` and `each`, and bfloat16 against float32, as one JSON.

    python benchmarks/gpu_check.py --device cuda --shape llama-1b --pairs 66 --dtype bfloat16

(`gpu_check.sh` runs exactly that under an 8-minute limit.) It prints one JSON object on stdout:

* `benchmark` — `sweep.py`'s results for the shape (`ours` and `raw`, `positions="all"` and
  `"each"`, useful FLOPs, the device's measured GEMM throughput, efficiency, peak memory);
* `agreement` — one sweep batch of `--agree-pairs` pairs run in float32 and then in the low
  precision dtype with the *same* weights (the float32 model cast): relative error of the
  answer logits and latents (the verdict) and the sweep's metrics side by side;
* `ok` — metrics of ours, raw agree and the dtypes agree.

Everything runs on CPU too (`--device cpu --shape toy`), which is how the tests smoke-test it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402

from codi_nnsight.model.wrapper import DTYPES  # noqa: E402
from codi_nnsight.testing.tiny import random_codi  # noqa: E402

#: Sweep metrics reported side by side between dtypes.
METRICS = ("kl", "l2", "top1_changed")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-300))


def agreement(
    shape: str, device: torch.device, dtype: torch.dtype, n_pairs: int, max_new: int = 4, tol: float = 0.1
) -> dict[str, Any]:
    """One sweep batch in float32 and in `dtype` with the same weights (the float32 model cast).

    The verdict (`agree`) rests on the raw outputs of the sweep's forward — answer-position
    logits (centered per row) and latent embeddings — whose relative error must stay below `tol`:
    rounding to 8 mantissa bits gives ~1e-2 there, a wrong kernel or mask gives O(1). The sweep's
    metrics are compared too (largest difference, float32 scale, Pearson correlation over
    pair x layer) but only reported: on random weights the patch effects themselves are often
    below bfloat16's resolution, so their correlation says little.
    """
    from codi_nnsight.patching import SweepConfig, plan_batch

    model = random_codi(shape, dtype=torch.float32, device=device, tokenizer="bpe")
    pairs = sweep.realistic_pairs(n_pairs, model)
    layers = list(range(model.n_layers))
    plan = plan_batch(model, list(pairs), SweepConfig(layers=layers, max_new_tokens=max_new))
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in plan.inputs.items()}
    runs = []
    with torch.inference_mode():
        for dt in (torch.float32, dtype):
            model.codi.to(dt)
            out = model.codi(**inputs)
            _, ds = sweep.ours(model, pairs, layers, len(pairs), max_new)
            logits = out["logits"].double()
            runs.append((logits - logits.mean(-1, keepdim=True), out["latents"].double(), ds))
    (ref_logits, ref_lat, ref), (low_logits, low_lat, low) = runs
    res: dict[str, Any] = {
        "pairs": len(pairs),
        "dtype": str(dtype).removeprefix("torch."),
        "tolerance": tol,
        "logits_rel_err": _rel(ref_logits, low_logits),
        "latents_rel_err": _rel(ref_lat, low_lat),
        "metrics": {},
    }
    for name in METRICS:
        a, b = ref[name].values.ravel().astype(float), low[name].values.ravel().astype(float)
        ok = np.isfinite(a) & np.isfinite(b)
        varied = ok.sum() > 1 and a[ok].std() > 0 and b[ok].std() > 0
        res["metrics"][name] = {
            "max_abs_diff": float(np.max(np.abs(a[ok] - b[ok]))) if ok.any() else float("nan"),
            "float32_max_abs": float(np.max(np.abs(a[ok]))) if ok.any() else float("nan"),
            "pearson": float(np.corrcoef(a[ok], b[ok])[0, 1]) if varied else float("nan"),
        }
    res["agree"] = bool(res["logits_rel_err"] <= tol and res["latents_rel_err"] <= tol)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check and print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=["toy", "gpt2-small", "llama-1b"], default="llama-1b")
    ap.add_argument("--pairs", type=int, default=66)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--agree-pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    t = time.perf_counter()
    bench_args = [
        "--device",
        args.device,
        "--shape",
        args.shape,
        "--pairs",
        str(args.pairs),
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--skip-naive",
        "--each",
        "--rss-pairs",
    ]
    if args.threads:
        bench_args += ["--threads", str(args.threads)]
    res: dict[str, Any] = {"benchmark": sweep.main(bench_args, emit=False)}
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["agreement"] = agreement(args.shape, device, DTYPES[args.dtype], args.agree_pairs)
    res["ok"] = bool(res["benchmark"]["metrics_agree"] and res["agreement"]["agree"])
    res["wall_s"] = time.perf_counter() - t
    res = _strict(res)
    print(json.dumps(res, indent=2, allow_nan=False))
    return res


def _strict(obj: Any) -> Any:
    """NaN and infinities as null, so that the output is strict JSON."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
