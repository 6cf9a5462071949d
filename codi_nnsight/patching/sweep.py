"""`patch_sweep`: the patching study as users call it, from pairs to the results Dataset."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
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
from ..model.wrapper import CODIModel
from ..patching.store import SCHEMA, PartialStore, clean_attrs
from ..patching.trace import (
    SweepConfig,
    batch_dataset,
    full_patch_check,
    plan_batch,
    run_batch,
    sanity_attrs,
    variants_of,
)

log = logging.getLogger(__name__)


def _version(name: str) -> str:
    try:
        return _md.version(name)
    except _md.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions that determine the numbers (stored in every results file)."""
    return {f"version_{n.replace('-', '_')}": _version(n)
            for n in ("codi-nnsight", "nnsight", "torch", "transformers", "numpy", "xarray")}


def auto_batch_size(model: CODIModel, rows_per_pair: int, prompt_len: int) -> int:
    """Pairs per trace from free memory (CUDA) or a fixed row budget (CPU)."""
    cfg = model.codi.lm.config
    d = cfg.hidden_size
    n_layers = model.n_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv_dim = kv_heads * (d // cfg.num_attention_heads)
    seq = prompt_len + model.num_latent + 32
    elem = torch.finfo(model.dtype).bits // 8
    per_row = 2 * n_layers * seq * kv_dim * elem + 4 * cfg.vocab_size * 8 + 16 * d * seq * elem
    dev = model.device
    if dev is not None and dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        rows = int(free * 0.6 // per_row)
    else:
        rows = min(512, int(2e9 // per_row))
    return max(1, rows // rows_per_pair)


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
) -> xr.Dataset:
    """Patch source activations into target runs at CoT positions, layer by layer.

    Args:
        model: a loaded `CODIModel`.
        pairs: a `PairSet` (or any sequence of pairs with `.clean`/`.corrupted`/`.pair_id`).
        layers: decoder blocks to patch (default all).
        component: `resid`, `attn`, `mlp` or `latent` — or a list of them (adds a `component` dim).
        positions: `all` CoT positions at once, or `each` one at a time (adds `position`).
        mode: `recurrent` (later latents recomputed from the patched state) or `frozen`
            (latent input embeddings kept at the baseline's: direct effect only).
        direction: `denoise` (clean → corrupted) or `noise` (corrupted → clean).
        batch_size: pairs per trace, or `"auto"`.
        max_new_tokens: greedy tokens decoded after the answer prompt (default: answer length + 3).
        remote: nnsight's `remote=` (False, True for NDIF, a host URL, or "local").
        out: netCDF path. Finished batches stream to `<out>.partial/`; the final file is atomic.
        resume: continue an interrupted run from `<out>.partial/` (same configuration only).
        progress: show a progress bar.
        seed: recorded for provenance (the sweep itself is deterministic).
        command: command line recorded in the attrs.

    Returns:
        The results `xarray.Dataset` (docs/results-schema.md).
    """
    components = [component] if isinstance(component, str) else list(component)
    if len(components) > 1:
        return _multi_component_sweep(model, pairs, components, out=out, resume=resume, layers=layers,
                                      positions=positions, mode=mode, direction=direction,
                                      batch_size=batch_size, max_new_tokens=max_new_tokens, remote=remote,
                                      progress=progress, seed=seed, command=command)
    torch.manual_seed(seed)
    cfg = SweepConfig(layers=list(range(model.n_layers)) if layers is None else list(layers),
                      component=components[0], positions=positions, mode=mode, direction=direction,
                      max_new_tokens=max_new_tokens)
    cfg.validate(model)
    source = getattr(pairs, "source", None)
    pairs_sha = getattr(pairs, "sha256", None)
    pairs = list(pairs)
    if not pairs:
        raise UserError("no pairs to patch")
    check_context(model, pairs)
    start = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if pairs_sha is None:
        from ..data.pairs import PairSet

        pairs_sha = PairSet.from_pairs(pairs).sha256
    fingerprint = {
        "model_config": model.codi_config.to_json() if model.codi_config else "",
        "checkpoint_sha256": model.checkpoint_sha256, "pairs_sha256": pairs_sha,
        "mode": mode, "direction": direction, "component": cfg.component, "positions": positions,
        "layers": cfg.layers, "dtype": str(model.dtype).replace("torch.", ""),
        "max_new_tokens": max_new_tokens, "seed": seed,
    }
    n_variants = len(variants_of(cfg, model.num_latent))
    if batch_size == "auto":
        longest = max(len(model.encode_question(q.question)) for p in pairs for q in (p.clean, p.corrupted))
        bs = auto_batch_size(model, 3 + n_variants, longest)
    else:
        bs = int(batch_size)
        if bs < 1:
            raise UserError(f"--batch-size {batch_size}: must be >= 1 or auto")
    store = PartialStore(out, fingerprint) if out is not None else None
    done = store.open(resume) if store is not None else set()
    todo = [p for p in pairs if int(p.pair_id) not in done]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="patching pairs",
               disable=not progress, unit="pair")
    in_memory: list[xr.Dataset] = []
    interrupt = _DeferredInterrupt()
    try:
        for i in range(0, len(todo), bs):
            chunk = todo[i:i + bs]
            plan = plan_batch(model, chunk, cfg)
            metrics, generated = run_batch(model, plan, cfg, remote=remote)
            ds = batch_dataset(model, chunk, cfg, plan, metrics, generated)
            ds.attrs = {}
            if store is not None:
                store.add(ds)
            else:
                in_memory.append(ds)
            bar.update(len(chunk))
            interrupt.check()
    finally:
        interrupt.restore()
        bar.close()
    full = full_patch_check(model, pairs, remote=remote)
    attrs = {
        "codi_nnsight_schema": SCHEMA, "model_name": model.name,
        "model_config": fingerprint["model_config"], "checkpoint_sha256": model.checkpoint_sha256,
        "mode": mode, "direction": direction, "component": cfg.component, "positions": positions,
        "layers": ",".join(map(str, cfg.layers)), "dtype": fingerprint["dtype"],
        "device": str(model.device), "seed": seed,
        "command": command if command is not None else shlex.join(sys.argv),
        "start_time": start, "pairs_file": str(source or ""), "pairs_sha256": pairs_sha,
        "remote": str(remote), "num_latent": model.num_latent, "n_layers_model": model.n_layers,
        **versions(),
    }
    order = [int(p.pair_id) for p in pairs]
    if store is not None:
        # Sanity attrs need every pair: finish() concatenates, so compute them on the way.
        merged = xr.concat(store.batches(), dim="pair", combine_attrs="override")
        attrs.update(sanity_attrs(merged, full, model.dtype))
        attrs["end_time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return store.finish(clean_attrs(attrs), order)
    ds = xr.concat(in_memory, dim="pair", combine_attrs="override")
    ds.attrs = {}
    attrs.update(sanity_attrs(ds, full, model.dtype))
    attrs["end_time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    ds.attrs.update(clean_attrs(attrs))
    return ds


class _DeferredInterrupt:
    """Ctrl-C during a batch takes effect once the batch is stored; a second Ctrl-C is immediate.

    A KeyboardInterrupt raised inside nnsight's interleaving (its worker greenlets) can leave the
    trace hanging instead of unwinding, so the first SIGINT only sets a flag checked between
    batches. Installed only in the main thread, where Python delivers signals.
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # asked twice: stop now
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


def _multi_component_sweep(model: CODIModel, pairs: Any, components: list[str], out: str | Path | None,
                           resume: bool, **kw: Any) -> xr.Dataset:
    """One sweep per component, stacked along a `component` dim (each streams to its own file)."""
    from ..patching.store import _write_atomic_nc

    parts = []
    for c in components:
        sub = None if out is None else Path(f"{out}.{c}.nc")
        if sub is not None and resume and sub.exists():  # finished before the interruption
            with xr.open_dataset(sub) as f:
                parts.append(f.load())
            continue
        parts.append(patch_sweep(model, pairs, component=c, out=sub, resume=resume, **kw))
    ds = xr.concat(parts, dim=xr.DataArray(components, dims="component", name="component"),
                   data_vars="different", coords="minimal", join="outer", combine_attrs="override")
    ds = ds.transpose("pair", "layer", ...)  # the schema's order: component last
    ds.attrs["component"] = ",".join(components)
    for name in ("sanity_self_patch_max_kl", "sanity_full_patch_max_abs"):
        ds.attrs[name] = max(float(p.attrs[name]) for p in parts)
    ds.attrs["sanity_min_kl"] = min(float(p.attrs["sanity_min_kl"]) for p in parts)
    ds.attrs["sanity_passed"] = int(all(int(p.attrs["sanity_passed"]) for p in parts))
    if out is not None:
        _write_atomic_nc(ds, Path(out))
        for c in components:
            Path(f"{out}.{c}.nc").unlink(missing_ok=True)
    return ds


def check_context(model: CODIModel, pairs: list[Any]) -> None:
    """Refuse questions too long for the model's context, naming the pair."""
    cfg = model.codi.lm.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not limit:
        return
    extra = model.num_latent + 48  # latents, [eot], answer prompt, answer tokens
    for p in pairs:
        for variant in ("clean", "corrupted"):
            n = len(model.encode_question(getattr(p, variant).question))
            if n + extra > limit:
                raise UserError(f"pair_id {p.pair_id}, {variant} question: {n} tokens + {extra} for "
                                f"latents and answer exceed the model's context of {limit}")
