"""Benchmark: a layer sweep the naive way vs `patch_sweep`, in one process, same metrics checked.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/sweep.py --shape gpt2-small --pairs 4 \
        --device cpu --dtype float32 --json bench.json

* naive   — the original study's structure with the correct latent loop: batch 1, plain PyTorch
            forward hooks, one clean extraction forward per layer and one patched forward per layer;
* ours    — `patch_sweep` as users call it (nnsight trace, shared prefill, all layers batched);
* raw     — the same batched algorithm as `ours` with plain torch hooks instead of nnsight
            (exposes nnsight's own overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from codi_nnsight.data.synthetic import make_synthetic_pairs  # noqa: E402
from codi_nnsight.model.wrapper import DTYPES  # noqa: E402
from codi_nnsight.patching import SweepConfig, answer_tokens, plan_batch  # noqa: E402
from codi_nnsight.patching.sweep import patch_sweep, versions  # noqa: E402
from codi_nnsight.testing.tiny import random_codi  # noqa: E402


def _metrics(logits: torch.Tensor, base: torch.Tensor, n_decodable: int) -> np.ndarray:
    """kl, l2, top1_changed (over the ids greedy decoding may emit) of rows against their baselines."""
    logits, base = logits.double(), base.double()
    lp, lb = torch.log_softmax(logits, -1), torch.log_softmax(base, -1)
    kl = (lp.exp() * (lp - lb)).sum(-1)
    l2 = (logits - base).pow(2).mean(-1).sqrt()
    top1 = (logits[:, :n_decodable].argmax(-1) != base[:, :n_decodable].argmax(-1)).double()
    return torch.stack([kl, l2, top1], -1).cpu().numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive(model: Any, pairs: list, layers: list[int], max_new: int) -> np.ndarray:
    """Batch 1; per layer one extraction forward (clean) and one patched forward (corrupted)."""
    codi = model.codi
    latent_calls = model.schedule().latent_calls  # batch 1, no shared prefix
    out = np.zeros((len(pairs), len(layers), 3))
    for i, pair in enumerate(pairs):
        toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
        suffix = torch.tensor(toks.suffix)
        clean_in = model.prepare([pair.clean.question], suffix_ids=suffix, max_new_tokens=max_new)
        corr_in = model.prepare([pair.corrupted.question], suffix_ids=suffix, max_new_tokens=max_new)
        base = codi(**corr_in)["logits"]
        for j, L in enumerate(layers):
            saved: list[torch.Tensor] = []
            calls = {"n": 0}

            def grab(mod, args, output, saved=saved, calls=calls):
                h = output[0] if isinstance(output, tuple) else output
                if calls["n"] in latent_calls:
                    saved.append(h.clone())
                calls["n"] += 1

            handle = codi.layers[L].register_forward_hook(grab)
            codi(**clean_in)
            handle.remove()
            calls = {"n": 0}

            def put(mod, args, output, saved=saved, calls=calls):
                n = calls["n"]
                calls["n"] += 1
                if n in latent_calls:
                    k = n - latent_calls.start
                    if isinstance(output, tuple):
                        return (saved[k],) + tuple(output[1:])
                    return saved[k]
                return output

            handle = codi.layers[L].register_forward_hook(put)
            patched = codi(**corr_in)["logits"]
            handle.remove()
            out[i, j] = _metrics(patched, base, codi.eot_id)[0]
    return out


def raw(model: Any, pairs: list, layers: list[int], batch_size: int, max_new: int) -> np.ndarray:
    """`patch_sweep`'s batched algorithm with torch hooks instead of nnsight."""
    codi = model.codi
    cfg = SweepConfig(layers=layers, max_new_tokens=max_new)
    out = np.zeros((len(pairs), len(layers), 3))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        plan = plan_batch(model, chunk, cfg)
        handles = []
        for L in layers:
            calls = {"n": 0}

            def hook(mod, args, output, L=L, calls=calls, plan=plan):
                step = calls["n"]
                calls["n"] += 1
                if (L, step) in plan.layer_plan:
                    h = output[0] if isinstance(output, tuple) else output
                    dst, src = plan.layer_plan[(L, step)]
                    h[dst.to(h.device)] = h[src.to(h.device)]
                return output

            handles.append(codi.layers[L].register_forward_hook(hook))
        try:
            result = codi(**{k: (v.to(model.device) if torch.is_tensor(v) else v) for k, v in plan.inputs.items()})
        finally:
            for h in handles:
                h.remove()
        logits = result["logits"]
        m = _metrics(logits, logits[torch.tensor(plan.baseline_of, device=logits.device)], codi.eot_id)
        for i in range(len(chunk)):
            out[start + i] = m[plan.variant_rows[i]]
    raw_full_check(model, pairs)  # the same sanity work `patch_sweep` does, so only nnsight differs
    return out


def raw_full_check(model: Any, pairs: list) -> float:
    """`patching.full_patch_check` with a torch hook: layer 0 patched at every token."""
    from codi_nnsight.patching import prompt_inputs

    equal = [p for p in pairs if len(model.encode_question(p.clean.question))
             == len(model.encode_question(p.corrupted.question))]
    if not equal:
        return float("nan")
    pair = min(equal, key=lambda p: len(model.encode_question(p.clean.question)))
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    inputs, prefill_calls = prompt_inputs(model, [pair.clean.question, pair.corrupted.question])
    sched = model.schedule(prefill_calls)
    calls = {"n": 0}

    def hook(mod, args, output):
        n = calls["n"]
        calls["n"] += 1
        if prefill_calls - 1 <= n <= sched.suffix_call:
            h = output[0] if isinstance(output, tuple) else output
            h[1] = h[0]
        return output

    handle = model.codi.layers[0].register_forward_hook(hook)
    try:
        dev = model.device
        inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        logits = model.codi(**inputs, suffix_ids=torch.tensor(toks.suffix, device=dev))["logits"]
    finally:
        handle.remove()
    return float((logits[1] - logits[0]).abs().max())


def ours(model: Any, pairs: Any, layers: list[int], batch_size: int, max_new: int,
         positions: str = "all") -> tuple[np.ndarray, Any]:
    ds = patch_sweep(model, pairs, layers=layers, batch_size=batch_size, max_new_tokens=max_new,
                     positions=positions)
    m = np.stack([ds["kl"].values, ds["l2"].values, ds["top1_changed"].values], -1)
    return m, ds


def realistic_pairs(n: int, model: Any, target_tokens: int = 100) -> Any:
    """Synthetic pairs whose questions are ~`target_tokens` long: a shared story precedes each."""
    from codi_nnsight.data.pairs import Pair, PairSet, Question
    from codi_nnsight.data.synthetic import make_problems

    base = make_synthetic_pairs(n, seed=0, kind="wide")
    filler = [p.question for p in make_problems(50, seed=99)]
    out = []
    for i, p in enumerate(base):
        story = ""
        j = i
        while len(model.encode_question(story + p.clean.question)) < target_tokens:
            story += filler[j % len(filler)].split("?")[0].rsplit(".", 1)[0] + ". "
            j += 1
        out.append(Pair(p.pair_id, Question(story + p.clean.question, p.clean.answer, p.clean.meta),
                        Question(story + p.corrupted.question, p.corrupted.answer, p.corrupted.meta)))
    return PairSet.from_pairs(out)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            result = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_cuda_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["toy", "gpt2-small", "llama-1b"], default="toy")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-repeats", type=int, default=None, help="repeats of the slow naive run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--batch-size", type=int, default=None, help="pairs per trace (default: all)")
    ap.add_argument("--skip-naive", action="store_true", help="only ours and raw (large GPU runs)")
    ap.add_argument("--each", action="store_true", help="also time the positions=each sweep")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    t = time.perf_counter()
    model = random_codi(args.shape, dtype=dtype, device=device, tokenizer="bpe")
    load_s = time.perf_counter() - t
    pairs = realistic_pairs(args.pairs, model)
    layers = list(range(model.n_layers))
    bs = args.batch_size or len(pairs)
    max_new = 4
    ours_s, (m_ours, ds) = timed(lambda: ours(model, pairs, layers, bs, max_new), args.repeats, device)
    raw_s, m_raw = timed(lambda: raw(model, list(pairs), layers, bs, max_new), args.repeats, device)
    res: dict[str, Any] = {
        "shape": args.shape, "pairs": len(pairs), "layers": len(layers), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "dtype": args.dtype, "threads": torch.get_num_threads(), "batch_size": bs, "repeats": args.repeats,
        "model_build_s": load_s, "seconds": {"ours": ours_s, "raw": raw_s},
        "mean_question_tokens": float(np.mean([len(model.encode_question(p.clean.question)) for p in pairs])),
    }
    tol = 1e-6 if dtype == torch.float64 else (2e-3 if dtype == torch.float32 else 5e-2)
    res["max_abs_diff"] = {"ours_vs_raw": float(np.nanmax(np.abs(m_ours[..., :2] - m_raw[..., :2])))}
    if not args.skip_naive:
        naive_s, m_naive = timed(lambda: naive(model, list(pairs), layers, max_new),
                                 args.naive_repeats or args.repeats, device)
        res["seconds"]["naive"] = naive_s
        res["ratio_naive_over_ours"] = naive_s / ours_s
        res["max_abs_diff"]["ours_vs_naive"] = float(np.nanmax(np.abs(m_ours[..., :2] - m_naive[..., :2])))
    res["ratio_ours_over_raw"] = ours_s / raw_s
    patched_runs = len(pairs) * len(layers)
    res["patched_runs_per_second"] = {k: patched_runs / v for k, v in res["seconds"].items()}
    if args.each:
        each_s, _ = timed(lambda: ours(model, pairs, layers, bs, max_new, positions="each"), 1, device)
        res["seconds"]["ours_each_position"] = each_s
    res["metrics_agree"] = all(v <= tol * max(1.0, float(np.nanmax(np.abs(m_ours[..., :2]))))
                               for v in res["max_abs_diff"].values())
    res["sanity_passed"] = int(ds.attrs["sanity_passed"])
    res.update(peak_memory(device))
    res["versions"] = {**versions(), "python": sys.version.split()[0]}
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if not res["metrics_agree"]:
        print("ERROR: naive, ours and raw disagree", file=sys.stderr)
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
