"""`patch_sweep`: the patching study as users call it, from pairs to the results Dataset."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib.metadata as _md
import json
import logging
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import xarray as xr

from ..errors import UserError
from ..model.remote import check_remote_target, scrub
from ..model.wrapper import DTYPES, CODIModel
from .config import SweepConfig
from .dataset import SCHEMA, batch_dataset, with_pair_coordinates
from .plan import carries_full_patch, plan_batch
from .sanity import measure, merge_sanity, sanity_attrs
from .store import PartialStore, _write_atomic_nc, clean_attrs
from .trace import full_patch_check, full_patch_pair, run_batch

log = logging.getLogger(__name__)


def _version(name: str) -> str:
    try:
        return _md.version(name)
    except _md.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions that determine the numbers (stored in every results file)."""
    return {
        f"version_{n.replace('-', '_')}": _version(n)
        for n in ("codi-nnsight", "nnsight", "torch", "transformers", "numpy", "xarray")
    }


#: Rows per request when a remote server runs the sweep: its memory is not ours to measure, and
#: fewer, larger requests spend less time queueing (a request of this many rows returns well under 1 MB).
REMOTE_ROWS = 1024


def auto_batch_size(model: CODIModel, rows_per_pair: int, prompt_len: int, remote: bool | str = False) -> int:
    """Pairs per trace: from free memory (CUDA), a memory and row budget (CPU), or a row budget (remote).

    Rows that continue a question share its prefill cache, so a pair costs two prompts' caches plus
    each row's own latent, suffix and decoded tokens — not a full cache per row.
    """
    if remote and remote != "local":
        n = max(1, REMOTE_ROWS // rows_per_pair)
        log.info("--batch-size auto with a remote server: %d pairs (%d rows) per request", n, n * rows_per_pair)
        return n
    cfg = model.codi.lm.config
    d = cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv_token = 2 * model.n_layers * kv_heads * (d // cfg.num_attention_heads) * (torch.finfo(model.dtype).bits // 8)
    own = model.num_latent + 32  # latents, [eot] + prompt, candidates, decoded tokens
    elem = torch.finfo(model.dtype).bits // 8
    per_pair = kv_token * (2 * prompt_len + rows_per_pair * own) + rows_per_pair * (
        4 * cfg.vocab_size * 8 + 16 * d * own * elem
    )
    dev = model.device
    if dev is not None and dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return max(1, int(free * 0.6 // per_pair))
    return max(1, min(512 // rows_per_pair, int(2e9 // per_pair)))


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
    remote: bool | str = False,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    seed: int = 0,
    command: str | None = None,
    ablation: str | None = None,
    reference: Sequence[str] | None = None,
) -> xr.Dataset:
    """Patch source activations into target runs at the latent positions, layer by layer.

    Args:
        model: a loaded `CODIModel`.
        pairs: a `PairSet` (or any sequence of pairs with `.clean`/`.corrupted`/`.pair_id`).
        layers: decoder blocks to patch (default all).
        component: a patch site of `sites.SITES` (`resid`, `attn`, `mlp`, `latent`, `head`) — or a
            list of them (adds a `component` dim; `head` adds a `head` dim and runs on its own).
        positions: `all` latent positions at once, or `each` one at a time (adds `position`).
        mode: `recurrent` (later latents recomputed from the patched state: the total effect) or
            `no-feedback` (the fed-back latent embeddings held at the baseline's: the effect
            through attention only). `frozen` is the old name of `no-feedback`.
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

    Returns:
        The results `xarray.Dataset` (docs/results-schema.md).
    """
    components = [component] if isinstance(component, str) else list(component)
    cfg = SweepConfig(
        layers=list(range(model.n_layers)) if layers is None else list(layers),
        component=components[0],
        positions=positions,
        mode=mode,
        direction=direction,
        max_new_tokens=max_new_tokens,
        ablation=ablation,
    )
    if len(components) > 1:
        from .sites import SITES

        axis = next((c for c in components if c in SITES and SITES[c].axis), None)
        if axis is not None:
            raise UserError(f"--component {axis} adds a {SITES[axis].axis} dimension: sweep it on its own")
        return _multi_component_sweep(
            model,
            pairs,
            components,
            cfg,
            out=out,
            resume=resume,
            batch_size=batch_size,
            remote=remote,
            progress=progress,
            seed=seed,
            command=command,
        )
    return _single_sweep(
        model,
        pairs,
        cfg,
        batch_size=batch_size,
        remote=remote,
        out=out,
        resume=resume,
        progress=progress,
        seed=seed,
        command=command,
        reference=reference,
    )


def _single_sweep(
    model: CODIModel,
    pairs: Any,
    cfg: SweepConfig,
    batch_size: int | str,
    remote: bool | str,
    out: str | Path | None,
    resume: bool,
    progress: bool,
    seed: int,
    command: str | None,
    reference: Sequence[str] | None = None,
) -> xr.Dataset:
    """One component: check everything, run the batches (streamed to the store), assemble the file."""
    check_remote_target(remote)  # before any store exists: a refused target leaves nothing behind
    cfg.validate(model)
    source = getattr(pairs, "source", None)
    pairs, fingerprint = _checked_pairs(model, pairs, cfg, seed, reference)
    torch.manual_seed(seed)
    bs = _batch_size(model, pairs, cfg, batch_size, remote)
    ablate = _ablation_inputs(model, cfg, pairs, seed, reference, remote)
    attrs = {
        "codi_nnsight_schema": SCHEMA,
        "model_name": model.name,
        **SweepConfig.attrs_of(fingerprint),
        "run_fingerprint": json.dumps(fingerprint, sort_keys=True),
        "device": str(model.device),
        "command": command if command is not None else shlex.join(sys.argv),
        "start_time": _now(),
        "pairs_file": str(source or ""),
        "remote": scrub(str(remote), remote),
        "num_latent": model.num_latent,
        "n_layers_model": model.n_layers,
        **versions(),
    }
    order = [int(p.pair_id) for p in pairs]
    store = PartialStore(out, fingerprint) if out is not None else None
    with store if store is not None else contextlib.nullcontext():  # the store's lock is released on every exit
        done = store.open(resume) if store is not None else set()
        # What computes the numbers: one small request when remote; refuses a server with other weights.
        attrs.update(model.provenance(remote))
        check = full_patch_pair(model, pairs)
        batches, full = _run_batches(
            model,
            [p for p in pairs if int(p.pair_id) not in done],
            cfg,
            bs,
            remote,
            store,
            progress,
            total=len(pairs),
            ablate=ablate,
            full_patch_id=None if check is None else int(pairs[check].pair_id),
        )
        if full is None:  # not carried by a batch: a configuration that cannot, or a resumed run
            full = full_patch_check(model, pairs, remote=remote)

        def finalize(ds: xr.Dataset) -> xr.Dataset:
            ds = with_pair_coordinates(ds, pairs)
            compute_dtype = DTYPES.get(attrs["dtype"], model.dtype)  # the server's, when remote
            ds.attrs = clean_attrs({**attrs, **sanity_attrs(measure(ds, full), compute_dtype), "end_time": _now()})
            return ds

        if store is not None:
            return store.finish({}, order, transform=finalize)
        return finalize(xr.concat(batches, dim="pair", combine_attrs="drop"))


def _checked_pairs(
    model: CODIModel, pairs: Any, cfg: SweepConfig, seed: int, reference: Sequence[str] | None
) -> tuple[list[Any], dict[str, Any]]:
    """The pairs as a list, checked against the model, and the run's fingerprint."""
    pairs_sha = getattr(pairs, "sha256", None)
    pairs = list(pairs)
    if not pairs:
        raise UserError("no pairs to patch")
    check_context(model, pairs)
    if pairs_sha is None:
        from ..data.pairs import PairSet

        pairs_sha = PairSet.from_pairs(pairs).sha256
    fingerprint = cfg.fingerprint(model, pairs_sha, seed)
    if reference is not None:
        import hashlib

        fingerprint["reference_sha256"] = hashlib.sha256("\n".join(reference).encode()).hexdigest()
    return pairs, fingerprint


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _batch_size(
    model: CODIModel, pairs: list[Any], cfg: SweepConfig, batch_size: int | str, remote: bool | str = False
) -> int:
    """Pairs per trace: a number >= 1, or `auto` from the memory a batch needs."""
    if batch_size == "auto":
        longest = max(len(model.encode_question(q.question)) for p in pairs for q in (p.clean, p.corrupted))
        rows = 3 + (cfg.ablation == "resample") + len(cfg.variants(model)) * (2 if cfg.mode == "feedback-only" else 1)
        return auto_batch_size(model, rows, longest, remote)
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


def _run_batches(
    model: CODIModel,
    todo: list[Any],
    cfg: SweepConfig,
    bs: int,
    remote: bool | str,
    store: PartialStore | None,
    progress: bool,
    total: int,
    ablate: dict[str, Any] | None = None,
    full_patch_id: int | None = None,
) -> tuple[list[xr.Dataset], dict[str, Any] | None]:
    """Trace `todo` in batches; each finished batch goes to the store (or is returned).

    Returns (the batches kept in memory, the full-patch check if a batch carried it).
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - len(todo), desc="patching pairs", disable=not progress, unit="pair")
    in_memory: list[xr.Dataset] = []
    full: dict[str, Any] | None = None
    finished = total - len(todo)
    interrupt = _DeferredInterrupt(immediate=bool(remote) and remote != "local")
    try:
        for i in range(0, len(todo), bs):
            chunk = todo[i : i + bs]
            plan = _plan_chunk(model, chunk, cfg, ablate or {}, full_patch_id)
            out = run_batch(model, plan, cfg, remote=remote)
            if out.full_patch_max_abs is not None:
                full = {"max_abs": out.full_patch_max_abs, "pair_id": full_patch_id}
            ds = batch_dataset(model, chunk, cfg, plan, out.columns, out.generated)
            if store is not None:
                store.add(ds)
            else:
                in_memory.append(ds)
            finished += len(chunk)
            bar.update(len(chunk))
            interrupt.check()
    except UserError as e:
        if store is not None and finished:  # same error type, with where the work is and how to go on
            e.args = (
                f"{e}; the finished pairs are kept in {store.dir} — rerun the same command with --resume to continue",
            )
        raise
    finally:
        interrupt.restore()
        bar.close()
    return in_memory, full


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
    out: str | Path | None,
    resume: bool,
    **kw: Any,
) -> xr.Dataset:
    """One sweep per component, stacked along a `component` dim (each streams to its own file).

    A finished `OUT.<component>.nc` is reused on `--resume` only when its recorded fingerprint is
    this run's; the stacked file's layout never depends on its values: every metric and the
    self-patch control get the `component` dim, the unpatched runs' per-pair values do not.
    """
    from .dataset import per_pair_names
    from .metrics import METRICS

    parts = []
    for c in components:
        sub = None if out is None else Path(f"{out}.{c}.nc")
        sub_kw = {**dataclasses.asdict(cfg), "component": c, **kw}
        if sub is not None and sub.exists():
            parts.append(_reuse_component(model, pairs, sub, c, cfg, resume, kw.get("seed", 0)))
            continue
        parts.append(patch_sweep(model, pairs, out=sub, resume=resume, **sub_kw))
    stacked = [m.name for m in METRICS] + [n for n in per_pair_names() if n.startswith("self_patch")]
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
    if out is not None:
        _write_atomic_nc(ds, Path(out))
        for c in components:
            Path(f"{out}.{c}.nc").unlink(missing_ok=True)
    return ds


def _reuse_component(
    model: CODIModel, pairs: Any, path: Path, component: str, cfg: SweepConfig, resume: bool, seed: int
) -> xr.Dataset:
    """A component file finished before an interruption, if it belongs to this very run."""
    if not resume:
        raise UserError(
            f"{path}: a finished component of an earlier run exists; rerun with --resume to use it, "
            "or delete it to start over"
        )
    from ..data.pairs import PairSet

    sha = getattr(pairs, "sha256", None) or PairSet.from_pairs(list(pairs)).sha256
    sub_cfg = dataclasses.replace(cfg, component=component, layers=list(cfg.layers))
    sub_cfg.validate(model)
    expected = sub_cfg.fingerprint(model, sha, seed)
    with xr.open_dataset(path) as f:
        ds = f.load()
    stored = json.loads(ds.attrs.get("run_fingerprint", "{}"))
    diff = SweepConfig.difference(stored, expected)
    if diff is not None:
        raise UserError(
            f"{path}: finished component file is from a different run ({diff}); refusing to mix "
            "results — delete it to start over"
        )
    return ds


def check_context(model: CODIModel, pairs: list[Any]) -> None:
    """Refuse questions too long for the model's context, naming the pair."""
    model.check_fits(pairs, extra=model.num_latent + 48)  # latents, [eot], answer prompt, answer tokens
    model.check_text(pairs)
