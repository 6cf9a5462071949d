"""The CODI model as one plain `torch.nn.Module` (checkpoint loading is in `checkpoint`).

`CODIModule.forward` runs the whole continuous-thought procedure — prefill of
`question [bot]`, `num_latent` latent steps that feed `prj(last hidden)` back as the next input
embedding, `[eot]` (+ an optional teacher-forced answer prompt), scoring of candidate answers and
greedy decoding — so a single nnsight trace can read and write any decoder block at any step.
Call order of every decoder block (what `tracer.iter[...]` indexes):

* call 0: prefill of the question;
* call 1 … K: latent steps (latent position p = call p+1);
* call K+1: the suffix (`[eot]`, then the teacher-forced prompt, if any);
* call K+2 … K+1+C: one call per candidate answer being scored (cache rolled back after each);
* then one call per greedily decoded token after the first: `max_new_tokens - 1` calls, or fewer
  when every row has emitted eos — checked only after every `EOS_CHECK_EVERY`-th token, so a
  forward may run up to `EOS_CHECK_EVERY - 1` decoder calls past the point where all rows were done
  (their tokens are -1 and trimmed; `generated` is exactly what a per-token check would give).

`prj` is called K times: call p produces the input embedding of latent position p.

Speed without changing a result beyond float rounding (the exactness tests hold at 1e-9 in
float64):

* the KV cache and the attention mask are preallocated for the whole forward
  (`PreallocatedCache`, `_LoopState`) instead of being regrown with `torch.cat` at every step —
  that copy, with its page faults, was most of a CPU sweep's time;
* rows that continue the same prompt share its prefill cache (`SharedPrefix`): nothing is copied
  per row, and `codi_attention` reads each prompt's keys once per step for all its rows instead of
  once per row — one matrix product per bucket of prompts with the same number of rows, so no
  work goes to padding when prompts have very different row counts (1 and 2 + n_layers in a
  patching sweep);
* grouped-query attention folds the query heads instead of repeating the keys;
* GPT-2's `gelu_new` runs as torch's fused tanh GELU (`FusedGELUTanh`, the same function);
* the latent and decode loops make no host sync (greedy decoding asks once per
  `EOS_CHECK_EVERY` tokens whether all rows are done, and once at the end).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .families import family_for
from .schedule import CallSchedule

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# A preallocated KV cache, with the question's part shared by the rows that continue it
# ---------------------------------------------------------------------------------------------
#: The cache of the decoder pass now running, for `codi_attention` to find shared question keys.
_ACTIVE_CACHE: contextvars.ContextVar[Any] = contextvars.ContextVar("codi_active_cache", default=None)


@dataclass(frozen=True)
class PromptBucket:
    """The prompts of one row count, as one dense grid: `slot[i, j]` is the j-th row of the i-th prompt.

    The prompts are positions `start:stop` of `SharedPrefix.order`, so their shared keys are one slice.
    """

    start: int
    stop: int
    slot: torch.Tensor  # (stop - start, rows per prompt) row index


@dataclass
class SharedPrefix:
    """Which rows continue which prompt, laid out for batched per-prompt products.

    One dense (prompts, rows) grid for all prompts would be padded up to the largest prompt's rows:
    in a patching sweep a pair's source prompt has 1 row and its target 2 + n_layers, so about half
    the grid would be padding, computed and thrown away at every layer and step. The prompts are
    instead grouped into buckets by row count (few distinct counts in practice) and each bucket is
    its own grid, with no padding slot. Prompts that no row continues are in no bucket.

    `order` lists the prompts bucket by bucket (None: as cached, when the buckets already are
    consecutive runs of prompts starting at 0). `PreallocatedLayer.share` permutes the shared keys
    into that order once, so each bucket's keys are a slice, read in place at every step.
    """

    n_prompts: int
    order: torch.Tensor | None  # (P',) prompt at each bucketed position; None: position p is prompt p
    buckets: tuple[PromptBucket, ...]

    @classmethod
    def of(cls, rows: torch.Tensor, n_prompts: int) -> SharedPrefix:
        """The layout of `rows` (R,) prompt indices."""
        by_prompt: list[list[int]] = [[] for _ in range(n_prompts)]
        for r, p in enumerate(rows.tolist()):  # the one host sync of the shared layout, once per forward
            if not 0 <= p < n_prompts:
                raise ValueError(f"row {r} continues prompt {p}, not one of the {n_prompts} prompts")
            by_prompt[p].append(r)
        by_count: dict[int, list[int]] = {}  # in order of first appearance: prompts already grouped stay put
        for p, prompt_rows in enumerate(by_prompt):
            if prompt_rows:
                by_count.setdefault(len(prompt_rows), []).append(p)
        order: list[int] = []
        buckets = []
        for prompts in by_count.values():
            slot = torch.tensor([by_prompt[p] for p in prompts], dtype=torch.long, device=rows.device)
            buckets.append(PromptBucket(len(order), len(order) + len(prompts), slot))
            order += prompts
        keep = None if order == list(range(len(order))) else torch.tensor(order, device=rows.device)
        return cls(n_prompts, keep, tuple(buckets))

    def matmul(self, x: torch.Tensor, shared: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """Every row's `x` (R, H, q, E) times its prompt's `shared` (P, kv_heads, E, F): (R, H, q, F).

        `shared` is in `order` (see `PreallocatedLayer.share`); query head h reads kv head
        h // (H / kv_heads). Per bucket, one gather lays its rows out as (prompts, kv_heads,
        rows * groups * q, E) — each prompt's rows and the query heads of a kv head folded into the
        query-length axis — one batched product reads each prompt's keys once, and one scatter
        puts the results back in row order.
        """
        r, n_heads, q, e = x.shape
        groups, f = n_heads // kv_heads, shared.shape[-1]
        out = x.new_empty(r, n_heads, q, f)  # every row is in exactly one bucket: all of it is written
        # Splitting the head axis is a view of any strided tensor (merging axes may need a copy).
        rows_in = x.view(r, kv_heads, groups, q, e)
        rows_out = out.view(r, kv_heads, groups, q, f)
        head = torch.arange(kv_heads, device=x.device)[:, None]
        for b in self.buckets:
            n, c = b.slot.shape
            cell = (b.slot[:, None, :], head)  # (n, kv_heads, c): each prompt's rows, per kv head
            # (a view when q is 1; the gather keeps x's order of the query-length and head axes)
            grid = rows_in[cell].reshape(n, kv_heads, c * groups * q, e)
            y = torch.matmul(grid, shared[b.start : b.stop])
            rows_out[cell] = y.view(n, kv_heads, c, groups, q, f)
        return out


@functools.cache
def preallocated_classes() -> tuple[type, type]:  # noqa: C901 — two classes defined in one factory
    """(`PreallocatedLayer`, `PreallocatedCache`), defined on first use: importing this module skips transformers."""
    from transformers.cache_utils import Cache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """One layer's KV cache in buffers of a fixed token capacity, filled in place.

        transformers' `DynamicLayer` regrows keys and values with `torch.cat` at every decoder call,
        copying the whole cache (and, on CPU, page-faulting a fresh allocation) once per layer and
        step. Here `update` writes the new tokens into the buffer and returns views of the filled
        part. It grows (doubling) only if a caller under-estimated the capacity.

        After `share`, the tokens cached so far (the prompts' prefill, one row per prompt) become
        `shared_keys`/`shared_values` and the buffers hold only each row's own later tokens: `update`
        returns those, and `codi_attention` attends to the shared part through the cache's
        `SharedPrefix` layout. Nothing is copied per row or per step, and each prompt's keys are
        read once per step for all its rows instead of once per row.
        """

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0  # tokens in the buffers (after `share`: each row's own tokens)
            self.shared_keys: torch.Tensor | None = None
            self.shared_values: torch.Tensor | None = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            """Allocate the buffers from the first update's batch, heads, dtype and device."""
            self.device = key_states.device
            b, h, _, dk = key_states.shape
            self.keys = key_states.new_empty(b, h, self.capacity, dk)
            self.values = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Write the new tokens after the cached ones; return the views of all buffered tokens."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.keys.shape[-2]:
                self._grow(max(end, 2 * self.keys.shape[-2]))
            self.keys[:, :, self.length : end] = key_states
            self.values[:, :, self.length : end] = value_states
            self.length = end
            return self.keys[:, :, :end], self.values[:, :, :end]

        def _grow(self, capacity: int) -> None:
            keys, values = self.keys, self.values
            self.keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
            self.values = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
            self.keys[:, :, : self.length] = keys[:, :, : self.length]
            self.values[:, :, : self.length] = values[:, :, : self.length]
            self.capacity = capacity

        def share(self, n_rows: int, order: torch.Tensor | None = None) -> None:
            """Make the cached tokens the shared part; start empty per-row buffers for `n_rows` rows.

            `order` (a `SharedPrefix.order`) permutes the cached prompts so that each bucket's are
            consecutive: one gather per layer and forward, instead of one per bucket and step.
            """
            if not self.is_initialized:
                return
            keys_t = self.keys[:, :, : self.length].transpose(-1, -2)
            values = self.values[:, :, : self.length]
            if order is not None:  # `index_select` writes a contiguous result: gather and layout in one copy
                keys_t, values = torch.index_select(keys_t, 0, order), values[order]
            # The keys are stored as contiguous (E, S) matrices, the layout the scores' product reads
            # (`shared_keys` stays their (S, E) view): on CPU that product ran up to twice as fast as
            # on the cache's (S, E) rows (gpt2-small shapes), for one copy per layer and forward.
            self.shared_keys = keys_t.contiguous().transpose(-1, -2)
            self.shared_values = values
            own = max(self.capacity - self.length, 1)
            self.keys = self.keys.new_empty(n_rows, self.keys.shape[1], own, self.keys.shape[-1])
            self.values = self.values.new_empty(n_rows, self.values.shape[1], own, self.values.shape[-1])
            self.capacity, self.length = own, 0

        @property
        def shared_length(self) -> int:
            return 0 if self.shared_keys is None else self.shared_keys.shape[-2]

        def get_seq_length(self) -> int:
            """Tokens cached, shared ones included (a Python int: asking costs no device sync)."""
            return self.shared_length + self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            """Length and offset of the keys a query attends to."""
            return self.get_seq_length() + query_length, 0

        def crop(self, tokens_to_remove: int) -> None:
            """Forget the last `-tokens_to_remove` tokens (negative, as `DynamicLayer.crop` wants)."""
            if tokens_to_remove > 0 or -tokens_to_remove > self.length:
                raise ValueError(f"cannot crop {tokens_to_remove} of {self.length} own tokens")
            self.length += tokens_to_remove

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep (or repeat) the rows `indices`: one gather, into buffers of the same capacity."""
            if self.shared_keys is not None:
                raise NotImplementedError("rows of a shared-prefix cache cannot be reselected")
            if self.is_initialized:
                self.keys = self.keys[indices]
                self.values = self.values[indices]

        def batch_repeat_interleave(self, repeats: int) -> None:
            """Repeat every row `repeats` times."""
            self.batch_select_indices(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            """Reorder rows (beam search)."""
            if self.is_initialized:
                self.batch_select_indices(beam_idx.to(self.keys.device))

        def reset(self) -> None:
            """Drop the buffers."""
            self.length = 0
            self.shared_keys = self.shared_values = None
            super().reset()

    class PreallocatedCache(Cache):
        """`PreallocatedLayer`s, one per decoder block, and the rows' `SharedPrefix` once shared."""

        def __init__(self, n_layers: int, capacity: int) -> None:
            super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])
            self.prefix: SharedPrefix | None = None

        def share(self, rows: torch.Tensor, n_prompts: int) -> None:
            """Let row r continue prompt `rows[r]` without copying its cache (see `PreallocatedLayer`)."""
            self.prefix = SharedPrefix.of(rows, n_prompts)
            for layer in self.layers:
                layer.share(len(rows), self.prefix.order)

    return PreallocatedLayer, PreallocatedCache


def preallocated_cache(n_layers: int, capacity: int) -> Any:
    """A transformers `Cache` of `n_layers` `PreallocatedLayer`s holding `capacity` tokens each."""
    return preallocated_classes()[1](n_layers, capacity)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
ATTENTION = "codi_eager"


def codi_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose softmax runs in the activations' own dtype (float32 for half types).

    transformers' Llama eager attention always takes the softmax in float32, which caps float64
    runs at ~1e-7 agreement; CODI's latent loop amplifies such noise, and our exactness checks
    (batched = unbatched, package = reference) need float64 all the way through.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    b, n_heads, q, d = query.shape
    kv_heads = key.shape[1]
    # Grouped-query attention without `repeat_interleave`, which copied the whole KV cache of every
    # layer at every step: query heads j*groups ... j*groups+groups-1 share kv head j, so folding
    # each group's heads into the query-length axis gives the same dot products.
    scores = torch.matmul(query.reshape(b, kv_heads, -1, d), key.transpose(-1, -2)).view(b, n_heads, q, -1)
    cache = _ACTIVE_CACHE.get()
    layer = cache.layers[module.layer_idx] if cache is not None and getattr(cache, "prefix", None) else None
    n_shared = 0
    if layer is not None and layer.shared_keys is not None:
        # Rows continuing a shared prompt: their scores against its keys, each prompt's keys read
        # once for all its rows; the mask's first columns are those keys, then the row's own
        # (cached and new) tokens.
        pre = cache.prefix
        shared = pre.matmul(query, layer.shared_keys.transpose(-1, -2), kv_heads)
        n_shared = shared.shape[-1]
        scores = torch.cat([shared, scores], dim=-1)
    weights = scores * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[..., : weights.shape[-1]]
    soft = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    weights = torch.softmax(weights, dim=-1, dtype=soft).to(value.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    own = weights[..., n_shared:] if n_shared else weights
    out = torch.matmul(own.reshape(b, kv_heads, -1, own.shape[-1]), value).view(b, n_heads, q, value.shape[-1])
    if n_shared:
        out = out + pre.matmul(weights[..., :n_shared], layer.shared_values, kv_heads)
    return out.transpose(1, 2).contiguous(), weights


def register_attention() -> str:
    """Register `codi_eager` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, codi_attention)
    return ATTENTION


class FusedGELUTanh(nn.Module):
    """GPT-2's `gelu_new`, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as torch's one fused kernel.

    transformers' `NewGELUActivation` spells the formula out in six element-wise kernels, each a
    pass over the (rows, 4d) MLP activations: ~4 % of a CPU sweep of GPT-2 small. Same function,
    agreeing to float rounding (~3e-16 in float64, ~2e-7 in float32).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")


def fuse_activations(lm: nn.Module) -> int:
    """Swap each `NewGELUActivation` in `lm` for `FusedGELUTanh`, in place; returns how many.

    The module keeps its place (GPT-2's `mlp.act`), so nnsight paths and hooks on it are unchanged.
    """
    from transformers.activations import NewGELUActivation

    swapped = 0
    for parent in lm.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, FusedGELUTanh())
                swapped += 1
    return swapped


def make_prj(hidden: int, prj_dim: int, use_prj: bool, prj_no_ln: bool) -> nn.Module:
    """The official projection: Dropout, Linear(d, prj_dim), GELU, Linear(prj_dim, d), [ln]."""
    if not use_prj:
        return nn.Identity()
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(hidden, prj_dim), nn.GELU(), nn.Linear(prj_dim, hidden))
    if not prj_no_ln:
        prj.add_module("ln", nn.LayerNorm(hidden))
    return prj


class CODIModule(nn.Module):
    """A causal LM (LoRA merged) plus CODI's projection, running CODI inference in `forward`."""

    def __init__(
        self,
        lm: nn.Module,
        prj: nn.Module,
        *,
        num_latent: int,
        vocab_size: int,
        eos_token_id: int | None,
        remove_eos: bool = True,
        method: Any = None,
    ) -> None:
        super().__init__()
        fuse_activations(lm)
        from ..methods import CODI

        #: The latent-reasoning method (`codi_nnsight.methods`): its tokens, prompt and feedback.
        self.method = CODI if method is None else method
        self.lm = lm
        # The feedback module under the method's own name (CODI: `prj`), so nnsight paths read as its papers do.
        setattr(self, self.method.feedback, prj)
        #: Off (default): outside training `forward` runs under `torch.inference_mode` with the
        #: preallocated KV cache. On: `forward` runs with autograd enabled (and so the growing
        #: `DynamicCache`, see `new_cache`) even in eval mode, so a caller can take gradients of
        #: its outputs w.r.t. any activation (attribution patching, `patching.attribution`).
        #: Patches must then not write in place into tensors autograd saved.
        self.keep_grad = False
        self.num_latent = num_latent
        self.family = family_for(lm.config)
        self.vocab_size = vocab_size
        self.pad_id = self.method.token_id("pad", vocab_size, eos_token_id)
        self.bot_id = self.method.token_id("start", vocab_size)
        self.eot_id = self.method.token_id("end", vocab_size)
        below = self.method.greedy_below
        #: Greedy decoding picks among the ids below this one (None: every id), as the method's official decoder.
        self.greedy_limit = None if below is None else self.method.token_id(below, vocab_size)
        self.eos_token_id = eos_token_id
        self.remove_eos = remove_eos
        params = inspect.signature(self.base.forward).parameters
        # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- structure ---------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        """The decoder stack without the LM head (`transformer` / `model`)."""
        return self.family.decoder(self.lm)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks; layer L of a sweep is the output of `layers[L]`."""
        return self.family.blocks(self.lm)

    @property
    def feedback(self) -> nn.Module:
        """The module that turns the last state into the next thought's input embedding (CODI: `prj`)."""
        return getattr(self, self.method.feedback)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids."""
        return self.lm.get_input_embeddings()(ids)

    def bot_ids(self) -> list[int]:
        """Tokens appended to the question: `[bot]`, or `[eos, bot]` when `remove_eos` is false."""
        return [self.bot_id] if self.remove_eos else [self.eos_token_id, self.bot_id]

    def eot_ids(self) -> list[int]:
        """Tokens after the latents: `[eot]`, or `[eot, eos]` when `remove_eos` is false."""
        return [self.eot_id] if self.remove_eos else [self.eot_id, self.eos_token_id]

    def schedule(self, prefill_calls: int = 1) -> CallSchedule:
        """The call schedule of a forward pass (2 prefill calls with shared prefixes)."""
        return CallSchedule(self.num_latent, prefill_calls)

    # -- one decoder pass --------------------------------------------------------------------
    def new_cache(self, capacity: int | None = None) -> Any:
        """An empty KV cache for `run_decoder`: preallocated for `capacity` tokens when given.

        With autograd on (training) the growing `DynamicCache` is kept: attention saves views of
        the cache for the backward pass, which in-place writes into a shared buffer would spoil.
        """
        if capacity is None or torch.is_grad_enabled():
            from transformers import DynamicCache

            return DynamicCache()
        return preallocated_cache(len(self.layers), capacity)

    def run_decoder(
        self,
        cache: Any,
        mask: torch.Tensor,
        pos: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass of the decoder stack over new tokens; returns the last-layer hidden states.

        `mask` (B, K) covers every cached and new token, `pos` (B, q) are the new tokens' positions.
        Training (`toy.train`) and inference share this, so both run exactly the same model.
        """
        q = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        return self._run(cache, self.additive_mask(mask, q), pos, input_ids=input_ids, inputs_embeds=inputs_embeds)

    def _run(
        self,
        cache: Any,
        additive: torch.Tensor,
        pos: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`run_decoder` with the (B, 1, q, K) additive mask already built."""
        cache_arg = {self.cache_kw: cache} if cache is not None else {}
        token = _ACTIVE_CACHE.set(cache)  # `codi_attention` reads a shared prefix from it
        try:
            out = self.base(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=additive,
                position_ids=pos,
                use_cache=cache is not None,
                **cache_arg,
            )
        finally:
            _ACTIVE_CACHE.reset(token)
        return out.last_hidden_state

    def mask_fill(self) -> float:
        """The additive mask's fill value (see `additive_mask`)."""
        dtype = self.lm.get_input_embeddings().weight.dtype
        return max(torch.finfo(dtype).min, torch.finfo(torch.float32).min)

    def additive_mask(self, mask: torch.Tensor, q: int) -> torch.Tensor:
        """(B, 1, q, K) additive causal + padding mask with a *finite* fill value.

        transformers fills with finfo(dtype).min, which becomes -inf where Llama's eager attention
        takes the softmax in float32 (float64 runs): fully masked left-pad rows then give NaN, and
        0 * NaN leaks into real rows. float32's min is finite in every softmax dtype and still
        underflows exp() to exactly 0, so padded and unpadded runs agree bit for bit.
        """
        dtype = self.lm.get_input_embeddings().weight.dtype
        k = mask.shape[1]
        key_pos = torch.arange(k, device=mask.device)
        query_pos = torch.arange(k - q, k, device=mask.device)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None] & mask.bool()[:, None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, self.mask_fill())[
            :, None
        ]

    # -- the CODI procedure ------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor | None = None,
        suffix_ids: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
        max_new_tokens: int = 0,
        num_latent: int | None = None,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        prompt_prefix: torch.Tensor | None = None,
        keep_grad: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run CODI inference.

        Args:
            input_ids: (P, T) left-padded `question [+bos] ... [bot]` token ids.
            attention_mask: (P, T) 1 for real tokens.
            rows: (R,) index into the P prompts; each prompt's prefill is computed once and its
                KV cache shared by every row that names it. Default: one row per prompt.
            suffix_ids: (S,) or (R, S) ids fed after the latents (default: `[eot]`).
            candidates: (R, C, A) answer token ids to score by teacher forcing, right-padded with
                -1; each candidate starts right after the suffix.
            max_new_tokens: greedy tokens to decode after the suffix (stops at eos).
            num_latent: override the number of latent steps.
            prefix_ids: (Q, Tp) left-padded token prefixes shared by several prompts (a clean
                question and its corrupted twin share everything before the changed number);
                `input_ids` then holds only the rest of each prompt. The prefill then takes two
                decoder calls (prefixes, then the rests) and every later call index shifts by one
                (see `CallSchedule`).
            prefix_mask: (Q, Tp) 1 for the real tokens of `prefix_ids`.
            prompt_prefix: (P,) which prefix each prompt continues.
            keep_grad: run with autograd in eval mode too (as the `keep_grad` attribute does), so
                gradients of the outputs w.r.t. any activation can be taken — in a request, so a
                remote server does it as well (attribution patching).

        Returns:
            dict with `logits` (R, V) at the last suffix position, `latents` (R, K, d) the latent
            input embeddings, `candidate_logprobs` (R, C) and `candidate_first` (R, C) first-token
            ids (when candidates are given) and `generated` (R, N) greedy ids, -1 after eos.
        """
        # No autograd outside training: patching edits activations in place, and it is faster.
        # `keep_grad` (attribution patching) turns autograd on in eval mode too.
        keep_grad = keep_grad or self.keep_grad
        grad = contextlib.nullcontext() if not keep_grad else torch.enable_grad()
        with torch.inference_mode(not (self.training or keep_grad)), grad:
            K = self.num_latent if num_latent is None else num_latent
            # Every token this forward will cache, so the KV cache and the mask are allocated once.
            n_suffix = len(self.eot_ids()) if suffix_ids is None else suffix_ids.shape[-1]
            n_after = max(candidates.shape[-1] if candidates is not None else 0, max_new_tokens - 1)
            capacity = (
                input_ids.shape[1] + (prefix_ids.shape[1] if prefix_ids is not None else 0) + K + n_suffix + n_after
            )
            state = self._prefill(input_ids, attention_mask, rows, prefix_ids, prefix_mask, prompt_prefix, capacity)
            latents = self._latent_loop(state, K)
            logits, hidden_size = self._suffix(state, suffix_ids)
            out: dict[str, torch.Tensor] = {"logits": logits}
            out["latents"] = torch.cat(latents, dim=1) if latents else logits.new_zeros(logits.shape[0], 0, hidden_size)
            if candidates is not None:
                out["candidate_logprobs"], out["candidate_first"] = self._score(state, logits, candidates)
            if max_new_tokens > 0:
                out["generated"] = self._greedy(state, logits, max_new_tokens)
            return out

    def _prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor | None,
        prefix_ids: torch.Tensor | None,
        prefix_mask: torch.Tensor | None,
        prompt_prefix: torch.Tensor | None,
        capacity: int,
    ) -> _LoopState:
        """Decoder call 0 (or calls 0-1 with shared prefixes): the questions, then rows picked."""
        dev = input_ids.device
        mask = attention_mask.to(dtype=torch.long)
        cache = self.new_cache(capacity)
        if prefix_ids is None:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
        else:  # call 0: the shared prefixes, once each; call 1 (below): the rest of every prompt
            pmask = prefix_mask.to(device=dev, dtype=torch.long)
            self.run_decoder(cache, pmask, (pmask.cumsum(-1) - 1).clamp(min=0), input_ids=prefix_ids.to(dev))
            sel = prompt_prefix.to(dev)
            cache.batch_select_indices(sel)
            seen = pmask.sum(-1)[sel]
            pos = (seen[:, None] + mask.cumsum(-1) - 1).clamp(min=0)
            mask = torch.cat([pmask[sel], mask], dim=1)
        hidden = self.run_decoder(cache, mask, pos, input_ids=input_ids)
        last = hidden[:, -1:, :]
        next_pos = pos[:, -1:] + 1
        if rows is not None:
            rows = rows.to(dev)
            if hasattr(cache, "share") and getattr(self.lm.config, "_attn_implementation", None) == ATTENTION:
                cache.share(rows, input_ids.shape[0])  # rows read their prompt's cache, no copy
            else:
                cache.batch_select_indices(rows)
            last, mask, next_pos = last[rows], mask[rows], next_pos[rows]
        return _LoopState.start(cache, mask, next_pos, last, capacity, self.mask_fill(), hidden.dtype)

    def _latent_loop(self, state: _LoopState, num_latent: int) -> list[torch.Tensor]:
        """The continuous thoughts: prj call k makes latent token k's input embedding."""
        latents = []
        for _k in range(num_latent):
            emb = self.feedback(state.last)
            latents.append(emb)
            state.last = self._step(state, inputs_embeds=emb)[:, -1:, :]
        return latents

    def _suffix(self, state: _LoopState, suffix_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """`[eot]` + teacher-forced prompt in one decoder call; logits at its last position."""
        n_rows, dev = state.last.shape[0], state.last.device
        if suffix_ids is None:
            suffix_ids = torch.tensor(self.eot_ids(), device=dev)
        suffix_ids = suffix_ids.to(dev)
        if suffix_ids.dim() == 1:
            suffix_ids = suffix_ids.unsqueeze(0).expand(n_rows, -1)
        hidden = self._step(state, inputs_embeds=self.embed(suffix_ids))
        return self.lm.lm_head(hidden[:, -1, :]), hidden.shape[-1]

    def _step(self, state: _LoopState, **new: torch.Tensor) -> torch.Tensor:
        """Append new tokens (ids or embeddings) to every row and run the decoder once."""
        n_new = next(iter(new.values())).shape[1]
        start, end = state.reserve(n_new)
        state.mask[:, start:end] = 1
        state.length = end
        pos = state.next_pos + torch.arange(n_new, device=state.mask.device)
        state.next_pos = state.next_pos + n_new
        if n_new == 1:  # one new token sees every earlier one: the padding bias alone is the mask
            additive = state.bias[:, None, None, :end]
        else:
            additive = self.additive_mask(state.mask[:, :end], n_new)
        return self._run(state.cache, additive, pos, **new)

    def _score(
        self, state: _LoopState, logits: torch.Tensor, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probability of each candidate answer (cache rolled back after each)."""
        dev = logits.device
        candidates = candidates.to(dev)
        first_logp = torch.log_softmax(_upcast(logits), dim=-1)
        lps, firsts = [], []
        for c in range(candidates.shape[1]):
            ids = candidates[:, c, :]
            valid = ids >= 0
            tok = ids.clamp(min=0)
            A = tok.shape[1]
            lp = first_logp.gather(1, tok[:, :1]).squeeze(1)
            if A > 1:
                # The candidate's mask goes after the cached tokens without advancing `length`:
                # decoding (or the next candidate) overwrites it, as `crop` rolls the cache back.
                start, end = state.reserve(A)
                state.mask[:, start:end] = valid
                h = self._run(
                    state.cache,
                    self.additive_mask(state.mask[:, :end], A),
                    state.next_pos + torch.arange(A, device=dev),
                    inputs_embeds=self.embed(tok),
                )
                step_logits = _upcast(self.lm.lm_head(h[:, :-1, :]))
                step_lp = torch.log_softmax(step_logits, dim=-1).gather(2, tok[:, 1:, None]).squeeze(2)
                lp = lp + (step_lp * valid[:, 1:]).sum(1)
                state.cache.crop(-A)  # roll back: the next candidate starts after the suffix again
            lps.append(lp)
            firsts.append(tok[:, 0])
        return torch.stack(lps, dim=1), torch.stack(firsts, dim=1)

    def _greedy(self, state: _LoopState, logits: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding as the method's official code does it: argmax over the ids below
        `greedy_limit` (CODI: all but `[eot]`), or over every id (Coconut).

        Rows that have emitted eos keep being decoded (their tokens are replaced by -1), so no
        step needs to know on the host whether all rows are done; that is asked only every
        `EOS_CHECK_EVERY` tokens, and the result is trimmed to the columns a per-token check
        would have produced, so `generated` does not depend on the check interval.
        """
        eos = -1 if self.eos_token_id is None else self.eos_token_id
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        tokens, all_done = [], []
        for t in range(max_new_tokens):
            nxt = logits[:, : self.greedy_limit].argmax(-1)
            tokens.append(torch.where(finished, torch.full_like(nxt, -1), nxt))
            finished = finished | (nxt == eos)
            all_done.append(finished.all())
            if t == max_new_tokens - 1 or ((t + 1) % EOS_CHECK_EVERY == 0 and bool(all_done[-1])):
                break
            h = self._step(state, input_ids=nxt[:, None])
            logits = self.lm.lm_head(h[:, -1, :])
        done = torch.stack(all_done)
        # One sync per forward: the width up to the first token after which every row was done.
        width = int(torch.where(done.any(), done.long().argmax(), len(tokens) - 1)) + 1
        return torch.stack(tokens, dim=1)[:, :width]

    @property
    def cache_kw(self) -> str:
        """Name of the decoder's KV-cache argument (transformers 5.2x renamed `past_key_values`)."""
        return self._cache_kw


#: Greedy decoding asks the host whether every row has emitted eos only after this many tokens.
EOS_CHECK_EVERY = 8


@dataclass
class _LoopState:
    """What the latent loop carries from one decoder call to the next, per row.

    `mask` and `bias` are preallocated for every token of the forward; the first `length`
    columns are in use.
    """

    cache: Any
    mask: torch.Tensor  # (R, capacity) 1 for real tokens
    bias: torch.Tensor  # (R, capacity) additive padding mask: fill where `mask` is 0 (before `length`)
    length: int  # tokens so far
    next_pos: torch.Tensor  # (R, 1) position of the next token
    last: torch.Tensor  # (R, 1, d) last hidden state

    @classmethod
    def start(
        cls,
        cache: Any,
        mask: torch.Tensor,
        next_pos: torch.Tensor,
        last: torch.Tensor,
        capacity: int,
        fill: float,
        dtype: torch.dtype,
    ) -> _LoopState:
        """The state after the prefill: `mask` (R, T) copied into buffers of `capacity` columns."""
        n_rows, length = mask.shape
        buf = mask.new_zeros(n_rows, max(capacity, length))
        buf[:, :length] = mask
        bias = torch.zeros(buf.shape, dtype=dtype, device=mask.device)
        bias[:, :length].masked_fill_(mask == 0, fill)
        return cls(cache, buf, bias, length, next_pos, last)

    def reserve(self, n_new: int) -> tuple[int, int]:
        """Columns [start, end) for `n_new` tokens after the current ones (grown if ever short)."""
        start, end = self.length, self.length + n_new
        if end > self.mask.shape[1]:
            extra = max(end, 2 * self.mask.shape[1]) - self.mask.shape[1]
            self.mask = torch.cat([self.mask, self.mask.new_zeros(self.mask.shape[0], extra)], dim=1)
            self.bias = torch.cat([self.bias, self.bias.new_zeros(self.bias.shape[0], extra)], dim=1)
        return start, end


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 before a softmax; others as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
