"""`patch_sweep`: the patching study as users call it, from pairs to the results Dataset."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..errors import UserError
from ..model.wrapper import DTYPES, CODIModel
from ..run import Backend, Run, client_versions, now, write_results
from ..run.batching import REMOTE_ROWS, auto_batch_size  # noqa: F401  (REMOTE_ROWS: re-exported)
from ..run.executors import Executor
from .config import SweepConfig
from .dataset import SCHEMA, batch_dataset, check_metric_names, with_pair_coordinates
from .metrics import METRICS, Metric, check_metrics_on, needed_inputs, user_metrics
from .options import ROUTES
from .plan import carries_full_patch, changed_positions, plan_batch, row_gold_tokens, sequence_window
from .sanity import measure, merge_sanity, sanity_attrs
from .store import PartialStore, clean_attrs
from .trace import full_patch_check, full_patch_pair, run_batch

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions that determine the numbers, of this process (`run.client_versions`)."""
    return client_versions()


def patch_sweep(
    model: CODIModel,
    pairs: Any,
    layers: Sequence[int] | None = None,
    component: str | Sequence[str] = "resid",
    positions: str = "all",
    mode: str = "recurrent",
    direction: str = "denoise",
    batch_size: int | str = "auto",
    max_new_tokens: int | None = None,
    remote: bool | str | Backend = False,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    seed: int = 0,
    command: str | None = None,
    ablation: str | None = None,
    reference: Sequence[str] | None = None,
    force: bool = False,
    workers: int | Executor | None = None,
    ray_address: str | None = None,
    metrics: Mapping[str, Callable[[dict[str, Any]], torch.Tensor]] | None = None,
    tokens: Sequence[int | str] | None = None,
) -> xr.Dataset:
    """Patch source activations into target runs at the latent positions, layer by layer.

    Args:
        model: a loaded `CODIModel`.
        pairs: a `PairSet` (or any sequence of pairs with `.clean`/`.corrupted`/`.pair_id`).
        layers: decoder blocks to patch (default all).
        component: a patch site of `sites.SITES` (`resid`, `attn`, `mlp`, `latent`, `head`) — or a
            list of them (adds a `component` dim; `head` adds a `head` dim and runs on its own).
        positions: `all` latent positions at once, `each` one at a time (adds `position`), or
            `sequence`: every token on its own — the question's, `[bot]`, each thought and the
            answer prompt's (adds `position`, counted from the first thought; see
            docs/results-schema.md). `sequence` patches decoder-block sites in `recurrent` mode;
            a changed number of another token length leaves its own tokens out (NaN).
        tokens: with `positions="sequence"`, patch only these tokens: offsets from the first
            thought (ints; the question's are negative, `[bot]` is -1) and regions `question`,
            `number` (each pair's changed number, wherever it sits), `bot`, `thoughts`, `answer`;
            e.g. `["number", "bot", "thoughts"]`. Default: every token.
        mode: what is blocked between the patched thought and the answer (`options.MODES`):
            `recurrent` (nothing: the total effect through the latent loop),
            `block-all-feedback` (every fed-back latent embedding held at the baseline's),
            `block-thought-feedback` (only the patched thought's own fed-back embedding: the
            attention route) or `block-thought-attention` (the patched thought's keys and values:
            the feedback route); the last two need `positions="each"`. `routes` runs the three
            sweeps of the route split and stacks them on a `route` dim (total, feedback, attention,
            interaction = total - feedback - attention; see `routes`). Old names, accepted with a
            FutureWarning: `no-feedback` and `frozen` (block-all-feedback), `feedback-only`
            (block-thought-attention).
        direction: `denoise` (clean → corrupted) or `noise` (corrupted → clean).
        batch_size: pairs per trace, or `"auto"`. Results do not depend on it.
        max_new_tokens: greedy tokens decoded after the answer prompt (default: the pair's longer
            answer + 3 tokens).
        remote: nnsight's `remote=` (False, True for NDIF, a host URL, or "local").
        out: netCDF path. Finished batches stream to `<out>.partial/`; the final file is atomic.
        resume: continue an interrupted run from `<out>.partial/` (same configuration only).
        progress: show a progress bar.
        seed: recorded for provenance (the sweep itself is deterministic).
        command: command line recorded in the attrs.
        ablation: instead of patching, ablate the site in the clean run: `zero`, `mean` (over
            `reference` questions, default the clean questions), `resample` (from the next pair's
            clean question) or `noise` (a random direction of the same norm). See `ablation`.
        reference: the mean ablation's reference questions.
        force: replace an existing `out` (default: refuse, as the CLI does without `--force`).
        workers: shard the batches over this many Ray workers (each loads the model once, on one
            torch thread); None or 1: this process. The file is bit-identical to a one-process
            run on one torch thread with the same batch size (docs/sharding.md). An `Executor`
            (`codi_nnsight.run.executors`) is used as it is and left open.
        ray_address: run the workers on this existing Ray cluster instead of a local one.
        metrics: your own metrics, `{name: function}` (as TransformerLens takes them): each
            function gets the dict `v` of per-row trace inputs the built-in metrics see
            (`metrics.user_metrics` lists its keys; `metrics.metric_function` declares what else it
            needs, e.g. the fed-back thoughts and gold intermediate tokens) and returns a (rows,)
            tensor. Each becomes a variable `name` beside the built-in metrics, whose attrs record
            the function (module:qualname) and the sha256 of its source; the run fingerprint holds
            them too, so `resume` refuses a changed function. The functions run inside the trace:
            torch only (on NDIF they run on the server: define them in your script or notebook,
            or `nnsight.register` their module), and picklable by cloudpickle for `workers`.
            Shipped: `metrics.gold_value_prob(k)`.

    Returns:
        The results `xarray.Dataset` (docs/results-schema.md).
    """
    components = _components(component)
    _check_scalars(seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size)
    user = user_metrics(metrics)  # names, sources and what the model allows: one line, before any work
    check_metric_names(user)
    check_metrics_on(model, user)
    split = mode == ROUTES
    if split:
        _check_route_split(components, positions)
    cfg = SweepConfig(
        layers=list(range(model.n_layers)) if layers is None else check_layers(layers, model.n_layers),
        component=components[0],
        positions=positions,
        mode="recurrent" if split else mode,  # the route split runs its own modes
        direction=direction,
        max_new_tokens=max_new_tokens,
        ablation=ablation,
        tokens=_token_choice(tokens),
    )
    # The run layer: refuses a forbidden target and workers that cannot run (Ray missing, a remote
    # backend) before any work, and probes the server once.
    run = Run(model, remote, command, workers=workers, ray_address=ray_address)
    if out is not None:
        _refuse_existing(out, force, stacked=len(components) > 1 or split)
    if len(components) > 1 and not split:
        from .sites import SITES

        axis = next((c for c in components if SITES[c].axis), None)
        if axis is not None:
            raise UserError(f"--component {axis} adds a {SITES[axis].axis} dimension: sweep it on its own")
    # One executor for the whole command (the run's): a stacked sweep's parts share its workers.
    with run:
        common = dict(
            batch_size=batch_size,
            progress=progress,
            seed=seed,
            reference=reference,
            resume=resume,
            force=force,
            user=user,
        )
        if split:
            return _route_sweep(model, pairs, cfg, run, out=out, **common)
        if len(components) > 1:
            return _multi_component_sweep(model, pairs, components, cfg, run, out=out, **common)
        return _single_sweep(model, pairs, cfg, run, out=out, **common)


def route_split(model: CODIModel, pairs: Any, **kwargs: Any) -> xr.Dataset:
    """The route split: `patch_sweep(model, pairs, mode="routes", positions="each", **kwargs)`.

    Returns a results Dataset whose metrics have a `route` dim — `total` (mode `recurrent`),
    `feedback` (`block-thought-attention`), `attention` (`block-thought-feedback`) and
    `interaction` = total − feedback − attention, for additive quantities only — plus
    `delta_<metric>` variables (patched − baseline); see `routes.stack_routes`.
    """
    if "mode" in kwargs:
        raise TypeError("route_split() runs its own modes: do not pass mode=")
    kwargs.setdefault("positions", "each")
    return patch_sweep(model, pairs, mode=ROUTES, **kwargs)


def _components(component: str | Sequence[str]) -> list[str]:
    """`component` as a checked list of site names (strictly typed: a notebook typo is one line)."""
    from .sites import COMPONENTS

    components = [component] if isinstance(component, str) else component
    if not isinstance(components, (list, tuple)) or not components:
        raise UserError(f"component={component!r}: expected one of {', '.join(COMPONENTS)} or a non-empty list of them")
    for c in components:
        if not isinstance(c, str) or c not in COMPONENTS:
            raise UserError(f"--component {c!r}: expected one of {', '.join(COMPONENTS)}")
    if len(set(components)) != len(components):
        raise UserError(f"--component {','.join(components)}: a component is named twice")
    return list(components)


def _check_route_split(components: list[str], positions: Any) -> None:
    """The route split needs one component, one thought at a time (checked before any work)."""
    if len(components) > 1:
        raise UserError(f"--mode {ROUTES} takes one --component, not {','.join(components)}")
    if positions != "each":
        raise UserError(f"--mode {ROUTES} needs --positions each (it splits one patched thought's effect)")


def check_layers(layers: Any, n_layers: int) -> list[int]:
    """`layers` as a list of distinct ints in range; bools, floats and duplicates are refused, not coerced."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise UserError(f"layers={layers!r}: expected a list of layer indices")
    for L in layers:
        if isinstance(L, bool) or not isinstance(L, (int, np.integer)):
            raise UserError(f"layers: {L!r} is not a layer index (expected ints 0-{n_layers - 1})")
    out = [int(L) for L in layers]
    if len(set(out)) != len(out):
        raise UserError(f"layers: {out} names a layer twice")
    return out


def _token_choice(tokens: Any) -> list[str] | None:
    """`tokens` as the config's list of text items (ints as "-3"); None stays None."""
    if tokens is None:
        return None
    items = [tokens] if isinstance(tokens, (str, int)) else list(tokens)
    out = [str(t).strip() for t in items if str(t).strip()]
    if not out or any(isinstance(t, (bool, float)) for t in items):
        raise UserError(f"--tokens {tokens!r}: expected offsets (ints) and region names, e.g. number,bot,thoughts")
    return out


def _check_scalars(seed: Any, max_new_tokens: Any, batch_size: Any) -> None:
    """Refuse, in one line, scalar arguments a notebook call would otherwise coerce or crash on."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(seed) or not 0 <= seed < 2**63:
        raise UserError(f"seed={seed!r}: expected an int in 0 .. 2**63-1")
    if max_new_tokens is not None and (not is_int(max_new_tokens) or max_new_tokens < 1):
        raise UserError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1 (or None: the answer's length + 3)")
    if batch_size != "auto" and (not is_int(batch_size) or batch_size < 1):
        raise UserError(f"batch_size={batch_size!r}: expected an int >= 1 or 'auto'")


def _refuse_existing(out: str | Path, force: bool, stacked: bool = False) -> None:
    """Refuse to replace a finished results file unless `force` (checked before any work); a
    `stacked` run (several components or routes) writes its parts beside `out`, so makes its folder."""
    if not force and Path(out).exists():
        raise UserError(f"{out}: file exists; add --force to overwrite it")
    if stacked and not Path(out).parent.exists():
        Path(out).parent.mkdir(parents=True, exist_ok=True)


def _single_sweep(
    model: CODIModel,
    pairs: Any,
    cfg: SweepConfig,
    run: Run,
    batch_size: int | str,
    out: str | Path | None,
    resume: bool,
    progress: bool,
    seed: int,
    reference: Sequence[str] | None = None,
    force: bool = False,
    user: tuple[Metric, ...] = (),
) -> xr.Dataset:
    """One component: check everything, run the batches (streamed to the store), assemble the file."""
    cfg.validate(model)
    source = getattr(pairs, "source", None)
    pairs, fingerprint = _checked_pairs(model, pairs, cfg, seed, reference, run, user)
    torch.manual_seed(seed)
    bs = _batch_size(model, pairs, cfg, batch_size, run)
    ablate = _ablation_inputs(model, cfg, pairs, seed, reference, run.remote)
    attrs = {
        "codi_nnsight_schema": SCHEMA,
        "model_name": model.name,
        **SweepConfig.attrs_of(fingerprint),
        "run_fingerprint": json.dumps(fingerprint, sort_keys=True),
        "pairs_file": str(source or ""),
        "num_latent": model.num_latent,
        "n_layers_model": model.n_layers,
        **run.provenance(),  # computed_on, dtype, device, weights, versions, remote, command, start_time
    }
    order = [int(p.pair_id) for p in pairs]
    store = PartialStore(out, fingerprint, force=force) if out is not None else None
    with store if store is not None else contextlib.nullcontext():  # the store's lock is released on every exit
        done = store.open(resume, pair_ids=order) if store is not None else set()
        check = full_patch_pair(model, pairs)
        batches, full = _run_batches(
            run,
            [p for p in pairs if int(p.pair_id) not in done],
            cfg,
            bs,
            store,
            progress,
            total=len(pairs),
            ablate=ablate,
            full_patch_id=None if check is None else int(pairs[check].pair_id),
            user=user,
        )
        if full is None:  # not carried by a batch: a configuration that cannot, or a resumed run
            full = full_patch_check(model, pairs, remote=run.remote)

        def finalize(ds: xr.Dataset) -> xr.Dataset:
            ds = with_pair_coordinates(ds, pairs)
            compute_dtype = DTYPES.get(attrs["dtype"], model.dtype)  # the server's, when remote
            ds.attrs = clean_attrs({**attrs, **sanity_attrs(measure(ds, full), compute_dtype), "end_time": now()})
            return ds

        if store is not None:
            return store.finish({}, order, transform=finalize)
        # "override": the variables keep their attrs (long_name, units, a metric function's origin),
        # as in a written file; the Dataset's own attrs are set by `finalize`.
        return finalize(xr.concat(batches, dim="pair", combine_attrs="override"))


def _checked_pairs(
    model: CODIModel,
    pairs: Any,
    cfg: SweepConfig,
    seed: int,
    reference: Sequence[str] | None,
    run: Run,
    user: tuple[Metric, ...] = (),
) -> tuple[list[Any], dict[str, Any]]:
    """The pairs as a list, checked against the model, and the run's fingerprint."""
    from ..data.pairs import PairSet

    if isinstance(pairs, (str, Path)):
        raise UserError(f"pairs={str(pairs)!r}: expected pairs, not a path; load them with codi_nnsight.load_pairs")
    pairs_sha = getattr(pairs, "sha256", None)
    pairs = list(pairs)
    if not pairs:
        raise UserError("no pairs to patch")
    check_context(model, pairs, cfg.max_new_tokens)
    if cfg.positions == "sequence":  # the axis's extent
        cfg.question_tokens, cfg.suffix_tokens = sequence_window(model, pairs, cfg.direction)
        if cfg.tokens is not None:
            _choose_tokens(model, pairs, cfg)
    if pairs_sha is None:
        pairs_sha = PairSet.from_pairs(pairs).sha256
    return pairs, sweep_fingerprint(model, cfg, pairs_sha, seed, reference, run, user)


def _choose_tokens(model: CODIModel, pairs: list[Any], cfg: SweepConfig) -> None:
    """`--tokens`: the changed numbers' offsets when `number` is chosen; an offset no pair has, or a
    choice that leaves no token, is one line."""
    if "number" in cfg.tokens:
        cfg.number_positions = sorted({p for pair in pairs for p in changed_positions(model, pair, cfg.direction)})
    top = model.num_latent + cfg.suffix_tokens
    for t in cfg.tokens:
        if t.lstrip("-").isdigit() and not -cfg.question_tokens <= int(t) < top:
            raise UserError(
                f"--tokens {t}: no pair has a token there (positions run from {-cfg.question_tokens} to {top - 1})"
            )
    if not cfg.sequence_positions(model):
        raise UserError(f"--tokens {','.join(cfg.tokens)}: chooses no token of these pairs")


def sweep_fingerprint(
    model: CODIModel,
    cfg: SweepConfig,
    pairs_sha: str,
    seed: int,
    reference: Sequence[str] | None,
    run: Run,
    user: tuple[Metric, ...] = (),
) -> dict[str, Any]:
    """Everything that determines a sweep's numbers, the weights and dtype being those that compute them.

    On a server these are the server's (its checkpoint hash, else its weights fingerprint, and its
    dtype), so resuming against a redeployed server with other weights is refused, never mixed.
    Each metric function adds `metric_fn_<name>`: its module:qualname, source sha256 and bound
    values (`metrics.FunctionOrigin.identity`); a sweep without them keeps its old fingerprint.
    """
    import hashlib

    fingerprint = cfg.fingerprint(model, pairs_sha, seed)
    if run.backend.is_server:
        prov = run.provenance()
        fingerprint.update(checkpoint_sha256=run.weights_identity(), dtype=prov["dtype"])
    if reference is not None:
        fingerprint["reference_sha256"] = hashlib.sha256("\n".join(reference).encode()).hexdigest()
    for m in user:
        fingerprint[f"metric_fn_{m.name}"] = m.origin.identity() + (" per_run" if m.per_run else "")
    return fingerprint


def _batch_size(model: CODIModel, pairs: list[Any], cfg: SweepConfig, batch_size: int | str, run: Run) -> int:
    """Pairs per trace: a number >= 1, or `auto`: the run layer's batch policy for this run's backend."""
    if batch_size == "auto":
        longest = max(len(model.encode_question(q.question)) for p in pairs for q in (p.clean, p.corrupted))
        rows = (
            3
            + (cfg.ablation == "resample")
            + len(cfg.variants(model)) * (2 if cfg.mode == "block-thought-attention" else 1)
        )
        if cfg.positions == "sequence":
            # Each question-token variant prefills a prompt of its own: 2 + that many prompts per
            # pair, where the policy counts 2 (the cache it budgets is per prompt token).
            own = sum(1 for _, p, _ in cfg.variants(model) if p < 0)
            longest = -(-longest * (2 + own) // 2)
        return run.auto_batch_size(rows, longest)
    bs = int(batch_size)
    if bs < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1 or auto")
    return bs


def _ablation_inputs(
    model: CODIModel, cfg: SweepConfig, pairs: list[Any], seed: int, reference: Sequence[str] | None, remote: bool | str
) -> dict[str, Any]:
    """Donor questions (resample) or values (zero / mean / noise) of an ablation, for the whole sweep."""
    from .ablation import ablation_values, donor_questions

    if cfg.ablation is None:
        return {}
    if cfg.ablation == "resample":
        return {"donors": donor_questions(pairs)}
    return {"values": ablation_values(model, cfg, pairs, seed, reference=reference, remote=remote)}


def _plan_chunk(
    model: CODIModel, chunk: list[Any], cfg: SweepConfig, ablate: dict[str, Any], full_patch_id: int | None = None
) -> Any:
    """The plan of one batch, with the ablation inputs of its pairs (and the full-patch check, if
    the pair `full_patch_id` is in it and the configuration can carry it)."""
    donors = [ablate["donors"][int(p.pair_id)] for p in chunk] if "donors" in ablate else None
    values = ablate.get("values")
    if values is not None:
        values = dataclasses.replace(values, pair_seeds=[int(p.pair_id) for p in chunk])
    ids = [int(p.pair_id) for p in chunk]
    full_patch = ids.index(full_patch_id) if full_patch_id in ids and carries_full_patch(cfg) else None
    return plan_batch(model, chunk, cfg, donors=donors, ablation_values=values, full_patch=full_patch)


@dataclasses.dataclass(frozen=True)
class BatchContext:
    """What every batch of one sweep shares, sent once to each worker."""

    cfg: SweepConfig
    ablate: dict[str, Any]
    full_patch_id: int | None
    remote: bool | str = False
    #: The sweep's metric functions (`metrics.user_metrics`), after the built-in metrics.
    user: tuple[Metric, ...] = ()


def sweep_batch(model: CODIModel, ctx: BatchContext, chunk: list[Any]) -> tuple[xr.Dataset, float | None]:
    """Plan and trace one batch: (its Dataset, the full-patch check it carried or None).

    The executors' unit of work (module level, so a Ray worker imports it by name): wherever it
    runs, the same pairs give the same plan, the same trace and so the same numbers.
    """
    plan = _plan_chunk(model, chunk, ctx.cfg, ctx.ablate, ctx.full_patch_id)
    table = METRICS + ctx.user if ctx.user else None
    # Only a sweep with metric functions passes them: the call of a plain sweep stays as it was.
    functions = {}
    if ctx.user:
        gold = row_gold_tokens(model, chunk, plan, ctx.cfg) if "gold" in needed_inputs(ctx.user) else None
        functions = {"metrics": table, "gold": gold}
    out = run_batch(model, plan, ctx.cfg, remote=ctx.remote, **functions)
    ds = batch_dataset(model, chunk, ctx.cfg, plan, out.columns, out.generated, metrics=table)
    return ds, out.full_patch_max_abs


def _run_batches(
    run: Run,
    todo: list[Any],
    cfg: SweepConfig,
    bs: int,
    store: PartialStore | None,
    progress: bool,
    total: int,
    ablate: dict[str, Any] | None = None,
    full_patch_id: int | None = None,
    user: tuple[Metric, ...] = (),
) -> tuple[list[xr.Dataset], dict[str, Any] | None]:
    """Trace `todo` in batches of `bs` on the run's executor (`Run.map`: this process or Ray
    workers); each finished batch goes to the store (or is kept, in batch order) as it arrives,
    under one progress bar.

    Returns (the batches kept in memory, the full-patch check if a batch carried it).
    """
    from tqdm.auto import tqdm

    remote = run.remote
    bar = tqdm(total=total, initial=total - len(todo), desc="patching pairs", disable=not progress, unit="pair")
    kept: dict[int, xr.Dataset] = {}
    full: dict[str, Any] | None = None
    finished = total - len(todo)
    interrupt = _DeferredInterrupt(immediate=bool(remote) and remote != "local")
    chunks = [todo[i : i + bs] for i in range(0, len(todo), bs)]
    ctx = BatchContext(cfg, ablate or {}, full_patch_id, remote, user)

    def on_result(i: int, result: tuple[xr.Dataset, float | None]) -> None:
        nonlocal full, finished
        ds, full_max = result
        if full_max is not None:
            full = {"max_abs": full_max, "pair_id": full_patch_id}
        if store is not None:
            store.add(ds)
        else:
            kept[i] = ds
        finished += len(chunks[i])
        bar.update(len(chunks[i]))
        interrupt.check()

    try:
        run.map(sweep_batch, ctx, chunks, on_result)
    except UserError as e:
        if store is not None and finished:  # same error type, with where the work is and how to go on
            e.args = (
                f"{e}; the finished pairs are kept in {store.dir} — rerun the same command with --resume to continue",
            )
        raise
    finally:
        interrupt.restore()
        bar.close()
    return [kept[i] for i in sorted(kept)], full


class _DeferredInterrupt:
    """Ctrl-C during a batch takes effect once the batch is stored; a second Ctrl-C is immediate.

    A KeyboardInterrupt raised inside nnsight's interleaving (its worker greenlets) can leave the
    trace hanging instead of unwinding, so the first SIGINT only sets a flag checked between
    batches. A remote sweep interleaves nothing here — it waits on the network — so there the
    first Ctrl-C ends the wait at once (`immediate`). Installed only in the main thread, where
    Python delivers signals.
    """

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.requested = False
        self.previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested or self.immediate:  # asked twice, or only waiting on a server: stop now
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """Raise KeyboardInterrupt at this safe point if Ctrl-C was pressed."""
        if self.requested:
            raise KeyboardInterrupt

    def restore(self) -> None:
        """Put back the handler that was there before."""
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _multi_component_sweep(
    model: CODIModel,
    pairs: Any,
    components: list[str],
    cfg: SweepConfig,
    run: Run,
    out: str | Path | None,
    resume: bool,
    **kw: Any,
) -> xr.Dataset:
    """One sweep per component, stacked along a `component` dim (each streams to its own file).

    Every component runs with the same options, `reference` included (a mean ablation over several
    components uses the given reference questions for each). A finished `OUT.<component>.nc` is
    reused on `--resume` only when its recorded fingerprint is this run's; the stacked file's
    layout never depends on its values: every metric and the self-patch control get the
    `component` dim, the unpatched runs' per-pair values do not.
    """
    from .dataset import per_pair_names

    subs = {c: dataclasses.replace(cfg, component=c, layers=list(cfg.layers)) for c in components}
    parts = list(_run_parts(model, pairs, subs, run, out, resume, "component", **kw).values())
    table = METRICS + kw.get("user", ())
    stacked = [m.name for m in table] + [n for n in per_pair_names() if n.startswith("self_patch")]
    ds = xr.concat(
        parts,
        dim=xr.DataArray(components, dims="component", name="component"),
        data_vars=stacked,
        coords="minimal",
        compat="override",
        join="outer",
        combine_attrs="override",
    )
    ds = ds.transpose("pair", "layer", ...)  # the schema's order: component last
    ds.attrs["component"] = ",".join(components)
    ds.attrs.update(merge_sanity([p.attrs for p in parts], DTYPES.get(parts[0].attrs.get("dtype"), model.dtype)))
    fp = json.loads(ds.attrs["run_fingerprint"])
    ds.attrs["run_fingerprint"] = json.dumps({**fp, "component": components}, sort_keys=True)
    _write_stacked(ds, out, components, kw.get("force", False))
    return ds


def _run_parts(
    model: CODIModel,
    pairs: Any,
    subs: dict[str, SweepConfig],
    run: Run,
    out: str | Path | None,
    resume: bool,
    what: str,
    **kw: Any,
) -> dict[str, xr.Dataset]:
    """One ordinary sweep per named sub-configuration, each streamed to `OUT.<name>.nc`; a part
    finished before an interruption is reused on `--resume` when its fingerprint is this run's."""
    parts: dict[str, xr.Dataset] = {}
    for name, sub_cfg in subs.items():
        sub = None if out is None else Path(f"{out}.{name}.nc")
        if sub is not None and sub.exists():
            parts[name] = _reuse_component(
                model, pairs, sub, sub_cfg, resume, run, kw["seed"], kw.get("reference"), what, kw.get("user", ())
            )
            continue
        parts[name] = _single_sweep(model, pairs, sub_cfg, run, out=sub, resume=resume, **kw)
    return parts


def _write_stacked(ds: xr.Dataset, out: str | Path | None, names: Sequence[str], force: bool) -> None:
    """Write the stacked file (the one writer), then remove the parts it replaces."""
    if out is None:
        return
    write_results(ds, Path(out), replace=force)
    for name in names:
        Path(f"{out}.{name}.nc").unlink(missing_ok=True)


def _route_sweep(
    model: CODIModel,
    pairs: Any,
    cfg: SweepConfig,
    run: Run,
    out: str | Path | None,
    resume: bool,
    **kw: Any,
) -> xr.Dataset:
    """The route split (`routes`): one ordinary sweep per route mode, stacked on a `route` dim.

    Each sweep streams to its own `OUT.<route>.nc` (resumable like a stacked component); the
    stacked file replaces them once written.
    """
    from .routes import ROUTE_MODES, stack_routes

    subs = {route: dataclasses.replace(cfg, mode=mode, layers=list(cfg.layers)) for route, mode in ROUTE_MODES.items()}
    parts = _run_parts(model, pairs, subs, run, out, resume, "route", **kw)
    ds = _with_routed_functions(stack_routes(parts), parts, kw.get("user", ()))
    ds.attrs["mode"] = ROUTES
    ds.attrs["route_modes"] = json.dumps(ROUTE_MODES)
    ds.attrs.update(merge_sanity([p.attrs for p in parts.values()], DTYPES.get(ds.attrs.get("dtype"), model.dtype)))
    fp = json.loads(ds.attrs["run_fingerprint"])
    ds.attrs["run_fingerprint"] = json.dumps({**fp, "mode": ROUTES}, sort_keys=True)
    _write_stacked(ds, out, list(ROUTE_MODES), kw.get("force", False))
    return ds


def _with_routed_functions(ds: xr.Dataset, parts: dict[str, xr.Dataset], user: tuple[Metric, ...]) -> xr.Dataset:
    """The route split's Dataset with each metric function on the `route` dim too, as the built-in
    metrics are: each route's own values, NaN at `interaction` (a function's values need not add)."""
    from .routes import ROUTE_MODES, _with_interaction

    for m in user:
        total = parts["total"][m.name]
        values = [np.asarray(parts[r][m.name].values, dtype=np.float64) for r in ROUTE_MODES]
        attrs = {**total.attrs, "interaction": "NaN: not additive"}
        ds[m.name] = (total.dims + ("route",), _with_interaction(values, False), attrs)
    return ds.transpose("pair", "layer", ...)


def _reuse_component(
    model: CODIModel,
    pairs: Any,
    path: Path,
    sub_cfg: SweepConfig,
    resume: bool,
    run: Run,
    seed: int,
    reference: Sequence[str] | None,
    what: str = "component",
    user: tuple[Metric, ...] = (),
) -> xr.Dataset:
    """A component (or route) file finished before an interruption, if it belongs to this very run."""
    if not resume:
        raise UserError(
            f"{path}: a finished {what} of an earlier run exists; rerun with --resume to use it, "
            "or delete it to start over"
        )
    from ..data.pairs import PairSet

    sha = getattr(pairs, "sha256", None) or PairSet.from_pairs(list(pairs)).sha256
    sub_cfg.validate(model)
    expected = sweep_fingerprint(model, sub_cfg, sha, seed, reference, run, user)
    with xr.open_dataset(path) as f:
        ds = f.load()
    stored = json.loads(ds.attrs.get("run_fingerprint", "{}"))
    diff = SweepConfig.difference(stored, expected)
    if diff is not None:
        raise UserError(
            f"{path}: finished {what} file is from a different run ({diff}); refusing to mix "
            "results — delete it to start over"
        )
    return ds


def check_context(model: CODIModel, pairs: list[Any], max_new_tokens: int | None = None) -> None:
    """Refuse questions too long for the model's context (with the tokens to decode), naming the pair."""
    # latents, [eot], answer prompt, answer tokens — and the greedy tokens asked for
    model.check_fits(pairs, extra=model.num_latent + 48 + (max_new_tokens or 0))
    model.check_text(pairs)
