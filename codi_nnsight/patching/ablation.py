"""Ablations (do-interventions) on the continuous thoughts, and early exit.

An ablation replaces an activation at a patch site — any site of `sites.SITES`, any latent
position — by something that carries no information about the question: zero, its mean over a
reference set of questions, the same site's activation for another problem (resample), or a
random direction with the ablated activation's own norm (noise). They are the field's standard
controls for "does this thought matter", and they run through the same plan, trace, metrics and
Dataset as activation patching (`patch_sweep(..., ablation=...)`).

Early exit answers after k latents instead of K (`early_exit`): how much of the answer is there
already; with `past_trained=N` also after K+1 … K+N (more thoughts than the model was trained
with), and k = 0 is the no-thought baseline ([bot] then straight to [eot] and the answer prompt).

Two kinds of noise replace a state. `--ablation noise` draws a random *direction* and gives it the
replaced activation's own norm (per row, exactly). The norm-scaled noise of the thought
interventions (`norm_scaled_sigma`, causal-latent-cot's convention) draws σ·z with z ~ N(0, I_d)
and σ = mean‖h‖/√d × scale, the mean over a reference set — so its expected squared norm is
(mean‖h‖ × scale)²; σ and the scale are recorded in the file's attrs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from ..errors import UserError
from ..model.inference import decode
from ..model.remote import remote_errors, trace_kwargs
from ..model.wrapper import CODIModel
from ..run import Run
from ..run.executors import Executor
from .config import SweepConfig
from .plan import AblationValues, answer_tokens
from .sites import output_tensor
from .trace import cut_to_limits


def norm_scaled_sigma(mean_norm: float, width: int, scale: float = 1.0) -> float:
    """σ of norm-scaled Gaussian noise: mean‖h‖/√d × scale (E‖σz‖² = (mean‖h‖·scale)² for z ~ N(0, I_d))."""
    if width < 1:
        raise ValueError(f"width {width}: expected >= 1")
    return float(mean_norm) / float(np.sqrt(width)) * float(scale)


def seeded_normal(width: int, key: Sequence[int]) -> np.ndarray:
    """A standard normal vector (float64) fixed by `key` alone (e.g. (seed, pair id, position)): batch-independent."""
    return np.random.default_rng([int(x) & 0xFFFFFFFF for x in key]).standard_normal(width)


def donor_questions(pairs: Sequence[Any]) -> dict[int, str]:
    """Resample donors: pair i takes the clean question of pair i+1 (cyclically) of the whole sweep.

    Fixed by the pair order alone, so a result never depends on how pairs are batched.
    """
    if len(pairs) < 2:
        raise UserError("the resample ablation needs at least 2 pairs (each takes another problem's activations)")
    return {int(p.pair_id): pairs[(i + 1) % len(pairs)].clean.question for i, p in enumerate(pairs)}


def site_width(model: CODIModel, cfg: SweepConfig) -> int:
    """The last dimension of the site's tensor (hidden size; heads × head width for `head`)."""
    cfg_hf = model.codi.lm.config
    if cfg.site.axis == "head":
        from .sites import head_dim, n_heads

        return n_heads(model) * head_dim(model)
    return int(cfg_hf.hidden_size)


def reference_means(
    model: CODIModel, cfg: SweepConfig, questions: Sequence[str], batch_size: int = 32, remote: bool | str = False
) -> dict[tuple[Any, int], torch.Tensor]:
    """Mean of the site's activation over `questions`, per layer (or "prj") and latent position.

    The sums are taken inside the trace (float64), so only one vector per (layer, position) leaves it.
    """
    sums: dict[tuple[Any, int], torch.Tensor] = {}
    for start in range(0, len(questions), batch_size):
        for key, value in _reference_sums(model, cfg, list(questions[start : start + batch_size]), remote).items():
            sums[key] = sums.get(key, 0) + value
    return {key: value / len(questions) for key, value in sums.items()}


def _reference_sums(
    model: CODIModel, cfg: SweepConfig, questions: list[str], remote: bool | str
) -> dict[tuple[Any, int], torch.Tensor]:
    sched = model.schedule()
    latent_of = sched.latent_of_calls()  # the step iterator's {decoder call: latent k}
    K = model.num_latent
    reads_input = cfg.site.reads == "input"
    envoys = {L: cfg.site.envoy(model, L) for L in cfg.layers} if cfg.site.per_layer else {}
    with remote_errors(remote), model.trace(**model.prepare(questions), **trace_kwargs(remote)) as tracer:
        saved = nnsight.save({})  # a plain dict would not come back out of the trace
        if envoys:
            for call in tracer.iter[sched.latent_calls.start : sched.latent_calls.stop]:
                for L, envoy in envoys.items():
                    h = envoy.input if reads_input else output_tensor(envoy.output)
                    saved[(L, latent_of[call])] = h[:, -1].to(torch.float64).sum(0).cpu().save()
        else:
            latents = model.output["latents"].to(torch.float64).sum(0).cpu().save()
    if not envoys:
        return {("prj", k): torch.as_tensor(latents)[k] for k in range(K)}
    return {key: torch.as_tensor(v) for key, v in saved.items()}


def ablation_values(
    model: CODIModel,
    cfg: SweepConfig,
    pairs: Sequence[Any],
    seed: int,
    reference: Sequence[str] | None = None,
    remote: bool | str = False,
) -> AblationValues:
    """What the zero, mean and noise ablations write (means over `reference`, default: the clean questions)."""
    values = AblationValues(width=site_width(model, cfg), dtype=model.dtype, seed=seed)
    if cfg.ablation == "mean":
        questions = list(reference) if reference is not None else [p.clean.question for p in pairs]
        if not questions:
            raise UserError("the mean ablation needs at least one reference question")
        values.means = reference_means(model, cfg, questions, remote=remote)
    return values


def early_exit(
    model: CODIModel,
    pairs: Sequence[Any],
    steps: Sequence[int] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    remote: bool | str = False,
    past_trained: int = 0,
    workers: int | Executor | None = None,
    ray_address: str | None = None,
) -> xr.Dataset:
    """Answer after k latent steps instead of K, for every clean and corrupted question.

    Returns a Dataset with dims (pair, variant, n_latent): `answer` (decoded greedily after the
    teacher-forced prompt), `correct`, and `logp_answer` (teacher-forced log-probability of the
    question's true answer) — the accuracy-versus-thoughts curve of the field's early-exit control.
    `past_trained=N` allows (and by default runs) k up to K + N: more thoughts than trained.
    k = 0 is the no-thought baseline. Attr `trained_num_latent` = K. `workers` / `ray_address`
    shard the (k, batch) traces over Ray workers as `patch_sweep`'s are (bit-identical to one
    process on one thread with the same `batch_size`).
    """
    # A refused target, a weightless local run or workers that cannot run: one line, before any work.
    run = Run(model, remote, workers=workers, ray_address=ray_address)
    if isinstance(past_trained, bool) or not isinstance(past_trained, (int, np.integer)) or past_trained < 0:
        raise UserError(f"--past-trained {past_trained!r}: expected an int >= 0")
    top = model.num_latent + int(past_trained)
    steps = list(range(top + 1)) if steps is None else [int(k) for k in steps]
    bad = [k for k in steps if not 0 <= k <= top]
    if bad:
        raise UserError(f"--steps: {bad[0]} out of range 0..{top}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or int(max_new_tokens) < 1):
        raise UserError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
    # Questions past the context would run on positions the model never saw: refuse before any work.
    model.check_fits(list(pairs), extra=max(steps, default=0) + 16 + (max_new_tokens or 32))
    remote = run.remote
    items = [(i, v, getattr(p, v)) for i, p in enumerate(pairs) for v in ("clean", "corrupted")]
    shape = (len(pairs), 2, len(steps))
    out = {name: np.full(shape, np.nan) for name in ("answer", "correct", "logp_answer")}
    chunks = [(j, items[s : s + batch_size]) for j in range(len(steps)) for s in range(0, len(items), batch_size)]
    jobs = [(steps[j], [q for _, _, q in chunk]) for j, chunk in chunks]

    def store(n: int, result: tuple[list[float | None], list[float]]) -> None:
        j, chunk = chunks[n]
        for (i, v, q), a, lp in zip(chunk, *result):
            idx = (i, 0 if v == "clean" else 1, j)
            out["answer"][idx] = np.nan if a is None else a
            out["correct"][idx] = float(a is not None and a == float(q.answer))
            out["logp_answer"][idx] = lp

    with run:
        run.map(early_exit_batch, (max_new_tokens, remote), jobs, store)
    attrs = {
        "answer": ("number decoded after the teacher-forced prompt", "answer value"),
        "correct": ("the decoded answer equals the question's true answer", "share"),
        "logp_answer": ("teacher-forced log-probability of the question's true answer", "nats"),
    }
    ds = xr.Dataset(
        {
            n: (("pair", "variant", "n_latent"), a, {"long_name": attrs[n][0], "units": attrs[n][1]})
            for n, a in out.items()
        },
        coords={
            "pair": np.array([int(p.pair_id) for p in pairs], dtype=np.int64),
            "variant": ["clean", "corrupted"],
            "n_latent": np.array(steps, dtype=np.int64),
        },
    )
    ds.attrs.update(
        {
            "codi_nnsight_schema": "codi-nnsight/early-exit/1",
            "model_name": model.name,
            "num_latent": model.num_latent,
            "trained_num_latent": model.num_latent,
            "past_trained": int(past_trained),
            "question_normalization": model.question_normalization,
            **run.provenance(),  # computed_on, the server's dtype and weights, remote, versions
        }
    )
    return ds


def early_exit_batch(
    model: CODIModel, context: tuple[int | None, bool | str], job: tuple[int, list[Any]]
) -> tuple[list[float | None], list[float]]:
    """One (k, batch) trace of `early_exit` (the executors' unit of work; module level, so a Ray
    worker can run it): greedy answers and true-answer log-probabilities after k thoughts."""
    max_new_tokens, remote = context
    k, questions = job
    return _answer_after(model, questions, k, max_new_tokens, remote)


def _answer_after(
    model: CODIModel, questions: list[Any], k: int, max_new_tokens: int | None, remote: bool | str
) -> tuple[list[float | None], list[float]]:
    """Greedy answers and true-answer log-probabilities after k latents, one trace."""
    toks = [answer_tokens(model, q.answer, q.answer) for q in questions]
    if len({tuple(t.suffix) for t in toks}) != 1:
        raise UserError("questions in one batch need the same answer prompt tokens; use --batch-size 1")
    n = max(len(t.clean) for t in toks)
    cands = torch.full((len(questions), 1, n), -1, dtype=torch.long)
    for r, t in enumerate(toks):
        cands[r, 0, : len(t.clean)] = torch.tensor(t.clean)
    limits = [max_new_tokens or len(t.clean) + 3 for t in toks]
    inputs = model.prepare(
        [q.question for q in questions],
        suffix_ids=torch.tensor(toks[0].suffix),
        candidates=cands,
        max_new_tokens=max(limits),
        num_latent=k,
    )
    with remote_errors(remote), model.trace(**inputs, **trace_kwargs(remote)):
        logp = model.output["candidate_logprobs"][:, 0].to(torch.float64).cpu().save()
        generated = model.output["generated"].cpu().save()
    gen = cut_to_limits(torch.as_tensor(generated).numpy(), limits)  # answers never depend on the batch
    return ([model.method.parse_answer(decode(model, g)) for g in gen], torch.as_tensor(logp).tolist())
