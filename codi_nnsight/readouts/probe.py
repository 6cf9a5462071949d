"""Linear probes: can a linear map read each gold intermediate value off a position's state?

For every step (`bot`, latent token 0 … K-1, `answer`) and decoder block L, the block output at
that position is collected for every question (both variants of every pair) in one nnsight trace
per batch. A multinomial logistic regression (plain torch, L-BFGS, L2 penalty, features
standardized on the training split) then predicts each target:

* ``value{j}``: gold intermediate j (`readouts.gold`) as a class among the values seen in training;
* ``digit{j}``: its last digit (10 classes; integer values only);
* ``answer``: the question's answer, as a class.

Held-out accuracy is measured on a split *by pair* (a clean question and its corrupted twin share
most intermediate values, so they are never on both sides). The control task follows Hewitt &
Liang (2019) in spirit: the same probe trained and tested on labels shuffled across questions
(within each split, so class frequencies are kept); `selectivity` = accuracy − control accuracy.
Every seed draws its own split and shuffle; a test value never seen in training counts as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from ..errors import UserError
from ..run import Executor, Run
from .common import ReadoutBatch, base_coords, batches, provenance, question_infos, step_labels

SCHEMA = "codi-nnsight/probe/1"

__all__ = ["SCHEMA", "collect_states", "fit_logistic", "probe", "probe_states", "probe_targets", "states_batch"]


def _run_states(model: Any, batch: ReadoutBatch, layers: list[int], remote: bool | str) -> np.ndarray:
    """One trace: (B, steps, layers, d) block outputs at the last position of every decoder call."""
    from ..model.remote import remote_errors, trace_kwargs

    blocks = [model.layers[L] for L in layers]
    keep = torch.float64 if model.dtype == torch.float64 else torch.float32
    calls = model.schedule().readout_calls  # the step iterator: [bot], each latent, the answer prompt
    with remote_errors(remote), model.trace(**batch.inputs, **trace_kwargs(remote)) as tracer:
        states = []
        for _call in tracer.iter[calls.start : calls.stop]:
            hs = []
            for block in blocks:
                h = block.output
                h = h[0] if isinstance(h, tuple) else h
                hs.append(h[:, -1, :].to(keep))
            states.append(torch.stack(hs, 1))
        saved = nnsight.save(torch.stack(states, 1).cpu())
    return torch.as_tensor(saved).numpy()


def collect_states(
    model: Any,
    pairs: Sequence[Any],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    remote: bool | str = False,
    workers: int | Executor | None = None,
    ray_address: str | None = None,
    run: Run | None = None,
) -> tuple[np.ndarray, list[Any]]:
    """Block outputs (questions, steps, layers, d) of every question of `pairs`, and the question infos.

    `workers` / `ray_address` shard the batches over Ray workers (docs/sharding.md); a caller's
    `run` is used instead of a new one (its backend and executor).
    """
    if run is not None:
        return _collect_states(model, pairs, layers, batch_size, run)
    with Run(model, remote, workers=workers, ray_address=ray_address) as run:
        return _collect_states(model, pairs, layers, batch_size, run)


def states_batch(model: Any, context: tuple[list[int], bool | str], job: ReadoutBatch) -> np.ndarray:
    """One batch of `collect_states` (the executors' unit of work; module level, so a Ray worker can run it)."""
    layers, remote = context
    return _run_states(model, job, layers, remote)


def _collect_states(
    model: Any, pairs: Sequence[Any], layers: Sequence[int] | None, batch_size: int, run: Run
) -> tuple[np.ndarray, list[Any]]:
    infos = question_infos(model, pairs)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    jobs = list(batches(model, infos, batch_size))
    out: list[np.ndarray] = []

    def keep(n: int, got: np.ndarray) -> None:
        if not out:
            out.append(np.zeros((len(infos),) + got.shape[1:], dtype=got.dtype))
        out[0][jobs[n].index] = got

    run.map(states_batch, (layers, run.remote), jobs, keep)
    assert out
    return out[0], infos


def probe_targets(infos: Sequence[Any]) -> tuple[list[str], np.ndarray]:
    """Target names and labels (questions, targets); NaN where a question has no such value."""
    n_gold = max((len(i.gold) for i in infos), default=0)
    names = [f"{kind}{j}" for j in range(n_gold) for kind in ("value", "digit")] + ["answer"]
    labels = np.full((len(infos), len(names)), np.nan)
    for q, info in enumerate(infos):
        for j, v in enumerate(info.gold):
            labels[q, 2 * j] = v
            if np.isfinite(v) and float(v).is_integer():
                labels[q, 2 * j + 1] = abs(int(v)) % 10
        labels[q, -1] = info.answer
    return names, labels


#: Below this median number of questions per class a probe cannot learn a class, and its accuracy
#: and chance level say little (24 demo pairs give 1-2 questions per intermediate value).
MIN_PER_CLASS = 5


def too_few_per_class(names: Sequence[str], labels: np.ndarray, minimum: int = MIN_PER_CLASS) -> str:
    """A one-line warning naming the targets whose median class has fewer than `minimum` questions ("" if none)."""
    thin = []
    for t, name in enumerate(names):
        y = labels[:, t]
        y = y[np.isfinite(y)]
        if y.size == 0:
            continue
        counts = np.unique(y, return_counts=True)[1]
        if float(np.median(counts)) < minimum:
            thin.append(f"{name} ({float(np.median(counts)):g})")
    if not thin:
        return ""
    return (
        f"too few questions per class to train a probe for {', '.join(thin)} (median questions per class; "
        f"fewer than {minimum}): accuracies and the chance level are unreliable — use --synthetic N "
        "(e.g. 500) for a probe study"
    )


def fit_logistic(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, l2: float = 1e-3, max_iter: int = 50
) -> np.ndarray:
    """Multinomial logistic regressions; returns predicted class indices of `x_test`.

    Shapes: `x_train` (P, n, d), `y_train` (P, n) class indices 0..C-1, `x_test` (P, m, d): P
    independent probes on the same questions, fitted together (their losses add up, so the joint
    optimum is every probe's own optimum; one vectorized fit is ~P times faster). Features are
    standardized with the training mean and std of each probe; the loss is mean cross-entropy +
    `l2`·‖W‖² (bias unpenalized), minimized by L-BFGS from zeros in float64 — deterministic, so a
    probe depends only on its data. Returns (P, m).
    """
    xtr = torch.as_tensor(x_train, dtype=torch.float64)
    xte = torch.as_tensor(x_test, dtype=torch.float64)
    mu, sd = xtr.mean(1, keepdim=True), xtr.std(1, unbiased=False, keepdim=True).clamp(min=1e-8)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    y = torch.as_tensor(y_train, dtype=torch.long)
    n_classes = int(y.max()) + 1 if y.numel() else 1
    if n_classes == 1:
        return np.zeros(xte.shape[:2], dtype=np.int64)
    P, d = xtr.shape[0], xtr.shape[2]
    w = torch.zeros(P, d, n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(P, 1, n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-7, history_size=20
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.baddbmm(b, xtr, w)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, n_classes), y.reshape(-1), reduction="sum")
        loss = ce / xtr.shape[1] + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return torch.baddbmm(b, xte, w).argmax(-1).numpy()


def _split(groups: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train/test masks, whole groups (pairs) on one side."""
    unique = rng.permutation(np.unique(groups))
    n_test = min(max(1, int(round(test_fraction * len(unique)))), len(unique) - 1)
    test = np.isin(groups, unique[:n_test])
    return ~test, test


def _accuracies(x: np.ndarray, ys: list[np.ndarray], train: np.ndarray, test: np.ndarray, l2: float) -> np.ndarray:
    """Held-out accuracies (len(ys), P) of probes on `x` (questions, P, d) for each label vector in `ys`.

    Classes are the values seen in training; a test value unseen in training counts as wrong.
    """
    xs, labels, truths = [], [], []
    for y in ys:
        classes = np.unique(y[train])
        index = {v: i for i, v in enumerate(classes)}
        labels.append(np.array([index[v] for v in y[train]]))
        truths.append((classes, y[test]))
    x_tr = np.moveaxis(x[train], 1, 0)
    x_te = np.moveaxis(x[test], 1, 0)
    P = x.shape[1]
    xs = np.concatenate([x_tr] * len(ys))
    y_all = np.concatenate([np.broadcast_to(lab, (P, len(lab))) for lab in labels])
    pred = fit_logistic(xs, y_all, np.concatenate([x_te] * len(ys)), l2=l2).reshape(len(ys), P, -1)
    return np.stack([np.mean(classes[pred[i]] == truth[None, :], axis=1) for i, (classes, truth) in enumerate(truths)])


def probe_states(
    states: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    seeds: Sequence[int] = (0, 1, 2),
    test_fraction: float = 0.25,
    l2: float = 1e-3,
) -> dict[str, np.ndarray]:
    """Probe every (step, layer) of `states` (questions, steps, layers, d) for every target column
    of `labels` (questions, targets; NaN = missing). `groups` (questions,) keeps pairs together.

    Returns arrays (seed, step, layer, target) `accuracy`, `control`; (seed, target) `majority`
    (accuracy of always answering the most frequent training label), `n_train`, `n_test`, `n_classes`.
    Cells with fewer than 2 training classes or no test question are NaN.
    """
    n_q, n_steps, n_layers, d = states.shape
    flat = states.reshape(n_q, n_steps * n_layers, d)
    n_seeds, n_targets = len(seeds), labels.shape[1]
    acc = np.full((n_seeds, n_steps, n_layers, n_targets), np.nan)
    ctrl = np.full_like(acc, np.nan)
    majority = np.full((n_seeds, n_targets), np.nan)
    counts = {k: np.zeros((n_seeds, n_targets), dtype=np.int64) for k in ("n_train", "n_test", "n_classes")}
    for s, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        train_all, test_all = _split(groups, test_fraction, rng)
        for t in range(n_targets):
            y = labels[:, t]
            have = np.isfinite(y)
            train, test = train_all & have, test_all & have
            # The control labels: the same values, shuffled across questions within each split.
            y_ctrl = y.copy()
            for side in (train, test):
                where = np.flatnonzero(side)
                y_ctrl[where] = y[rng.permutation(where)]
            classes, freq = np.unique(y[train], return_counts=True)
            counts["n_train"][s, t], counts["n_test"][s, t] = train.sum(), test.sum()
            counts["n_classes"][s, t] = len(classes)
            if len(classes) < 2 or not test.any():
                continue
            majority[s, t] = float(np.mean(y[test] == classes[np.argmax(freq)]))
            got = _accuracies(flat, [y, y_ctrl], train, test, l2)
            acc[s, :, :, t] = got[0].reshape(n_steps, n_layers)
            ctrl[s, :, :, t] = got[1].reshape(n_steps, n_layers)
    return {"accuracy": acc, "control": ctrl, "majority": majority, **counts}


def probe(
    model: Any,
    pairs: Sequence[Any],
    layers: Sequence[int] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    test_fraction: float = 0.25,
    l2: float = 1e-3,
    batch_size: int = 16,
    remote: bool | str = False,
    workers: int | Executor | None = None,
    ray_address: str | None = None,
) -> xr.Dataset:
    """Linear probes for the gold intermediates at every step × layer (layout: docs/readouts.md).

    Returns a Dataset with dims (step, layer, target[, seed]) and attr
    `codi_nnsight_schema = "codi-nnsight/probe/1"`. `workers` / `ray_address` shard collecting
    the states over Ray workers (docs/sharding.md); the probes are fitted here.
    """
    if not 0 < test_fraction < 1:
        raise UserError(f"test fraction {test_fraction}: expected a number between 0 and 1")
    if len(pairs) < 2:
        raise UserError(f"probing needs at least 2 pairs (a training and a test side); got {len(pairs)}")
    if not seeds:
        raise UserError("probing needs at least one seed")
    # A refused target, a weightless local run or workers that cannot run: one line, before any work.
    run = Run(model, remote, workers=workers, ray_address=ray_address)
    bad = [L for L in (layers or []) if isinstance(L, bool) or not isinstance(L, (int, np.integer))]
    bad += [L for L in (layers or []) if L not in bad and not 0 <= int(L) < model.n_layers]
    if bad:
        raise UserError(
            f"--layers: layer {bad[0]!r} out of range (model has {model.n_layers} layers, 0-{model.n_layers - 1})"
        )
    with run:
        states, infos = collect_states(model, pairs, layers, batch_size, run=run)
    names, labels = probe_targets(infos)
    thin = too_few_per_class(names, labels)
    groups = np.array([i.pair_index for i in infos])
    got = probe_states(states, labels, groups, seeds, test_fraction, l2)
    layer_list = list(range(model.n_layers)) if layers is None else list(layers)
    dims = ("step", "layer", "target")
    acc, ctrl = got["accuracy"], got["control"]
    with np.errstate(all="ignore"):
        mean = lambda a: np.nanmean(a, axis=0) if np.isfinite(a).any() else np.full(a.shape[1:], np.nan)  # noqa: E731
        std = lambda a: np.nanstd(a, axis=0) if np.isfinite(a).any() else np.full(a.shape[1:], np.nan)  # noqa: E731
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            data: dict[str, Any] = {
                "accuracy": (
                    dims,
                    mean(acc),
                    {"long_name": "held-out probe accuracy, mean over seeds", "units": "share of test questions"},
                ),
                "accuracy_std": (
                    dims,
                    std(acc),
                    {"long_name": "its standard deviation over seeds", "units": "share of test questions"},
                ),
                "control_accuracy": (
                    dims,
                    mean(ctrl),
                    {
                        "long_name": "held-out accuracy of the same probe on "
                        "shuffled labels (control task), mean over seeds",
                        "units": "share of test questions",
                    },
                ),
                "control_std": (
                    dims,
                    std(ctrl),
                    {"long_name": "its standard deviation over seeds", "units": "share of test questions"},
                ),
                "selectivity": (
                    dims,
                    mean(acc - ctrl),
                    {"long_name": "accuracy minus control accuracy", "units": "share of test questions"},
                ),
                "majority": (
                    ("target",),
                    mean(got["majority"]),
                    {
                        "long_name": "accuracy of always answering the most frequent training label (chance)",
                        "units": "share of test questions",
                    },
                ),
                "accuracy_by_seed": (
                    ("seed",) + dims,
                    acc,
                    {"long_name": "held-out probe accuracy", "units": "share of test questions"},
                ),
                "control_by_seed": (
                    ("seed",) + dims,
                    ctrl,
                    {"long_name": "control-task accuracy", "units": "share of test questions"},
                ),
                "n_train": (
                    ("seed", "target"),
                    got["n_train"],
                    {"long_name": "training questions with this target", "units": "questions"},
                ),
                "n_test": (
                    ("seed", "target"),
                    got["n_test"],
                    {"long_name": "test questions with this target", "units": "questions"},
                ),
                "n_classes": (
                    ("seed", "target"),
                    got["n_classes"],
                    {"long_name": "classes seen in training", "units": "classes"},
                ),
            }
    coords = {
        "step": (
            "step",
            np.array(step_labels(model.num_latent), dtype=object),
            base_coords(model, pairs[:1], infos[:2])["step"][2],
        ),
        "layer": ("layer", np.array(layer_list, dtype=np.int64), {"long_name": "decoder block (its output)"}),
        "target": (
            "target",
            np.array(names, dtype=object),
            {"long_name": "valueJ: gold intermediate J as a class; digitJ: its last digit; answer: the answer"},
        ),
        "target_intermediate": (
            "target",
            np.array([int(n[5:]) if n[:5] in ("value", "digit") else -1 for n in names], dtype=np.int64),
            {"long_name": "gold intermediate index (-1: answer)"},
        ),
        "seed": ("seed", np.array(list(seeds), dtype=np.int64)),
    }
    attrs = provenance(
        model,
        pairs,
        SCHEMA,
        run=run,
        l2=float(l2),
        test_fraction=float(test_fraction),
        n_questions=len(infos),
        readout="multinomial logistic regression on standardized block outputs, split by pair; "
        "control = same probe on labels shuffled within each split",
        warning=thin,
    )
    return xr.Dataset(data, coords=coords, attrs=attrs)
