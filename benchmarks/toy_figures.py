"""Measure, in one run, every figure README.md and docs/ quote about the bundled toy model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/toy_figures.py --json toy_figures.json [--model DIR]

Prints one JSON object (and writes it with ``--json``): held-out accuracy with ablated latents,
the default sweep's layer profile on the demo pairs, routes through the loop, per-thought zero
ablation, early exit, logit-lens diagonal, attention to the question, a probe with its control
and the tuned lens's held-out KL. Everything goes through the public API on CPU in float32 (the
tuned-lens translators in float64), so the numbers are the ones a user reproduces.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _r(x: Any, nd: int = 4) -> Any:
    """Round floats (and lists of them) for the JSON."""
    if isinstance(x, (list, tuple)):
        return [_r(v, nd) for v in x]
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def heldout(model_dir: Path, n: int) -> dict[str, Any]:
    """`evaluate_toy` on `n` held-out problems, plus the no-latent baseline recorded in training."""
    from codi_nnsight.toy.train import evaluate_toy

    t = time.perf_counter()
    ev = evaluate_toy(model_dir, n=n)
    out = {k: v for k, v in ev.items() if k != "examples"}
    out["seconds"] = round(time.perf_counter() - t, 1)
    log = json.loads((model_dir / "train_log.json").read_text())
    out["train_time_s"] = log.get("train_time_s")
    base = log.get("no_latent_baseline")
    if base:
        out["no_latent_baseline"] = base.get("eval", {}).get("accuracy")
        out["no_latent_baseline_train_time_s"] = base.get("train_time_s")
    return out


def layer_profile(model: Any, pairs: Any) -> dict[str, Any]:
    """The default `codi-nnsight patch` sweep: flip share and logprob recovery per layer."""
    from codi_nnsight.analysis import recovery_ratio
    from codi_nnsight.patching.sweep import patch_sweep

    t = time.perf_counter()
    ds = patch_sweep(model, pairs)
    seconds = time.perf_counter() - t
    rec = recovery_ratio(ds, "logprob")["ratio"]
    return {
        "seconds": round(seconds, 1),
        "flipped": _r(ds["flipped"].mean("pair").values.tolist()),
        "logprob_recovery": _r(rec.values.tolist()),
        "sanity": {k: v for k, v in ds.attrs.items() if k.startswith("sanity_")},
    }


def routes(model: Any, pairs: Any) -> dict[str, Any]:
    """Logprob recovery per (layer, thought) for the total, the feedback and attention routes and the
    whole-loop attention effect (every feedback blocked)."""
    from codi_nnsight.analysis import recovery_ratio
    from codi_nnsight.patching.sweep import patch_sweep

    out: dict[str, Any] = {}
    for mode in ("recurrent", "block-thought-attention", "block-thought-feedback", "block-all-feedback"):
        ds = patch_sweep(model, pairs, positions="each", mode=mode)
        rec = recovery_ratio(ds, "logprob")["ratio"].transpose("layer", "position")
        out[mode] = {"positions": [str(p) for p in rec["position"].values], "ratio": _r(rec.values.tolist(), 3)}
    return out


def ablations(model: Any, pairs: Any) -> dict[str, Any]:
    """Share of pairs keeping the clean answer with one thought's `prj` output zeroed; early exit."""
    from codi_nnsight.patching.ablation import early_exit
    from codi_nnsight.patching.sweep import patch_sweep

    ds = patch_sweep(model, pairs, component="latent", positions="each", ablation="zero")
    kept = ds["kept"].mean("pair").squeeze()
    ee = early_exit(model, pairs)
    return {
        "zero_one_thought_kept": _r(kept.values.tolist(), 3),
        "early_exit_accuracy": _r(ee["correct"].mean(("pair", "variant")).values.tolist(), 3),
    }


def readouts(model: Any, n_pairs: int) -> dict[str, Any]:
    """Logit-lens diagonal, attention to the question, probe vs control, tuned-lens KL."""
    from codi_nnsight.analysis.readouts import lens_top1_rates
    from codi_nnsight.data.synthetic import make_toy_pairs
    from codi_nnsight.readouts.attention import attention_readout
    from codi_nnsight.readouts.lens import logit_lens
    from codi_nnsight.readouts.probe import probe
    from codi_nnsight.readouts.tuned import train_tuned_lens

    pairs = make_toy_pairs(n_pairs, seed=11)
    t = time.perf_counter()
    lens = logit_lens(model, pairs, batch_size=64)
    lens_s = time.perf_counter() - t
    best = lens_top1_rates(lens, "best_layer")
    block = lens_top1_rates(lens, "block")
    n_int = lens.sizes["intermediate"]
    diag_best = [float(best.sel(step=str(k), intermediate=k)) for k in range(n_int)]
    layers = block["layer"].values
    diag_by_layer = [[float(block.sel(step=str(k), intermediate=k, layer=i)) for i in layers] for k in range(n_int)]
    att = attention_readout(model, make_toy_pairs(100, seed=11))
    q_share = att["mass"].sel(region="question").mean(("pair", "variant", "head", "layer"))
    pr = probe(model, make_toy_pairs(150, seed=11))
    t = time.perf_counter()
    tuned = train_tuned_lens(model, make_toy_pairs(500, seed=0))
    tuned_s = time.perf_counter() - t
    return {
        "lens_questions": 2 * n_pairs,
        "lens_seconds": round(lens_s, 1),
        "lens_diag_best_layer": _r(diag_best, 3),
        "lens_diag_by_layer": _r(diag_by_layer, 3),
        "attention_question_share_by_step": dict(zip(map(str, q_share["step"].values), _r(q_share.values.tolist(), 3))),
        "probe": {k: _r(float(v), 3) for k, v in _probe_summary(pr).items()},
        "tuned_lens_seconds": round(tuned_s, 1),
        "tuned_lens_heldout_kl": {k: _r(v, 3) for k, v in tuned.meta["heldout_kl"].items()},
    }


def _probe_summary(ds: Any) -> dict[str, float]:
    """Held-out probe accuracy of value 1 at thought 1 (best layer) and its shuffled control."""
    acc, ctl = ds["accuracy"], ds["control_accuracy"]  # means over the probe's seeds
    sel = {"step": "1", "target": "value1"}
    return {"value1_at_thought1": float(acc.sel(sel).max()), "control": float(ctl.sel(sel).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="toy model folder (default: the bundled one)")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--lens-pairs", type=int, default=500)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from codi_nnsight.cli import default_pairs
    from codi_nnsight.data.pairs import load_pairs
    from codi_nnsight.model.config import bundled_model_dir
    from codi_nnsight.model.wrapper import load_model

    torch.manual_seed(0)
    model_dir = Path(args.model) if args.model else bundled_model_dir()
    model = load_model(str(model_dir / "codi.json"), dtype="float32", device="cpu")
    pairs = load_pairs(default_pairs())
    skip = set(filter(None, args.skip.split(",")))
    parts = {
        "heldout": lambda: heldout(model_dir, args.heldout),
        "layer_profile": lambda: layer_profile(model, pairs),
        "routes": lambda: routes(model, pairs),
        "ablations": lambda: ablations(model, pairs),
        "readouts": lambda: readouts(model, args.lens_pairs),
    }
    out: dict[str, Any] = {"model": str(model_dir), "threads": torch.get_num_threads()}
    for name, fn in parts.items():
        if name not in skip:
            t = time.perf_counter()
            out[name] = fn()
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
