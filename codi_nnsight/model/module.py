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
* then one call per greedily decoded token after the first.

`prj` is called K times: call p produces the input embedding of latent position p.
"""

from __future__ import annotations

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
# The module
# ---------------------------------------------------------------------------------------------
ATTENTION = "codi_eager"


def codi_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None,
                   dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose softmax runs in the activations' own dtype (float32 for half types).

    transformers' Llama eager attention always takes the softmax in float32, which caps float64
    runs at ~1e-7 agreement; CODI's latent loop amplifies such noise, and our exactness checks
    (batched = unbatched, package = reference) need float64 all the way through.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    soft = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    weights = torch.softmax(weights, dim=-1, dtype=soft).to(value.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def register_attention() -> str:
    """Register `codi_eager` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, codi_attention)
    return ATTENTION


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

    def __init__(self, lm: nn.Module, prj: nn.Module, *, num_latent: int, vocab_size: int,
                 eos_token_id: int | None, remove_eos: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.prj = prj
        self.num_latent = num_latent
        self.family = family_for(lm.config)
        self.pad_id = vocab_size
        self.bot_id = vocab_size + 1
        self.eot_id = vocab_size + 2
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
    def new_cache(self) -> Any:
        """An empty KV cache for `run_decoder`."""
        from transformers import DynamicCache

        return DynamicCache()

    def run_decoder(self, cache: Any, mask: torch.Tensor, pos: torch.Tensor, *, input_ids: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One pass of the decoder stack over new tokens; returns the last-layer hidden states.

        `mask` (B, K) covers every cached and new token, `pos` (B, q) are the new tokens' positions.
        Training (`toy.train`) and inference share this, so both run exactly the same model.
        """
        q = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        cache_arg = {self.cache_kw: cache} if cache is not None else {}
        out = self.base(input_ids=input_ids, inputs_embeds=inputs_embeds,
                        attention_mask=self.additive_mask(mask, q), position_ids=pos,
                        use_cache=cache is not None, **cache_arg)
        return out.last_hidden_state

    def additive_mask(self, mask: torch.Tensor, q: int) -> torch.Tensor:
        """(B, 1, q, K) additive causal + padding mask with a *finite* fill value.

        transformers fills with finfo(dtype).min, which becomes -inf where Llama's eager attention
        takes the softmax in float32 (float64 runs): fully masked left-pad rows then give NaN, and
        0 * NaN leaks into real rows. float32's min is finite in every softmax dtype and still
        underflows exp() to exactly 0, so padded and unpadded runs agree bit for bit.
        """
        dtype = self.lm.get_input_embeddings().weight.dtype
        fill = max(torch.finfo(dtype).min, torch.finfo(torch.float32).min)
        k = mask.shape[1]
        key_pos = torch.arange(k, device=mask.device)
        query_pos = torch.arange(k - q, k, device=mask.device)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None] & mask.bool()[:, None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
            ~allowed, fill)[:, None]

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
            prefix_ids, prefix_mask: (Q, Tp) left-padded token prefixes shared by several prompts
                (a clean question and its corrupted twin share everything before the changed
                number); `input_ids` then holds only the rest of each prompt, and
                `prompt_prefix` (P,) says which prefix each prompt continues. The prefill then
                takes two decoder calls (prefixes, then the rests) and every later call index
                shifts by one (see `CallSchedule`).

        Returns:
            dict with `logits` (R, V) at the last suffix position, `latents` (R, K, d) the latent
            input embeddings, `candidate_logprobs` (R, C) and `candidate_first` (R, C) first-token
            ids (when candidates are given) and `generated` (R, N) greedy ids, -1 after eos.
        """
        # No autograd outside training: patching edits activations in place, and it is faster.
        with torch.inference_mode(not self.training):
            K = self.num_latent if num_latent is None else num_latent
            state = self._prefill(input_ids, attention_mask, rows, prefix_ids, prefix_mask, prompt_prefix)
            latents = self._latent_loop(state, K)
            logits, hidden_size = self._suffix(state, suffix_ids)
            out: dict[str, torch.Tensor] = {"logits": logits}
            out["latents"] = (torch.cat(latents, dim=1) if latents
                              else logits.new_zeros(logits.shape[0], 0, hidden_size))
            if candidates is not None:
                out["candidate_logprobs"], out["candidate_first"] = self._score(state, logits, candidates)
            if max_new_tokens > 0:
                out["generated"] = self._greedy(state, logits, max_new_tokens)
            return out

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor | None,
                 prefix_ids: torch.Tensor | None, prefix_mask: torch.Tensor | None,
                 prompt_prefix: torch.Tensor | None) -> _LoopState:
        """Decoder call 0 (or calls 0-1 with shared prefixes): the questions, then rows picked."""
        dev = input_ids.device
        mask = attention_mask.to(dtype=torch.long)
        cache = self.new_cache()
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
            cache.batch_select_indices(rows)
            last, mask, next_pos = last[rows], mask[rows], next_pos[rows]
        return _LoopState(cache, mask, next_pos, last)

    def _latent_loop(self, state: _LoopState, num_latent: int) -> list[torch.Tensor]:
        """The continuous thoughts: prj call k makes latent token k's input embedding."""
        latents = []
        for _k in range(num_latent):
            emb = self.prj(state.last)
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
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], n_new)], dim=1)
        pos = state.next_pos + torch.arange(n_new, device=state.mask.device)
        state.next_pos = state.next_pos + n_new
        return self.run_decoder(state.cache, state.mask, pos, **new)

    def _score(self, state: _LoopState, logits: torch.Tensor, candidates: torch.Tensor
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
                cmask = torch.cat([state.mask, valid.to(state.mask.dtype)], dim=1)
                h = self.run_decoder(state.cache, cmask, state.next_pos + torch.arange(A, device=dev),
                                     inputs_embeds=self.embed(tok))
                step_logits = _upcast(self.lm.lm_head(h[:, :-1, :]))
                step_lp = torch.log_softmax(step_logits, dim=-1).gather(2, tok[:, 1:, None]).squeeze(2)
                lp = lp + (step_lp * valid[:, 1:]).sum(1)
                state.cache.crop(-A)  # roll back: the next candidate starts after the suffix again
            lps.append(lp)
            firsts.append(tok[:, 0])
        return torch.stack(lps, dim=1), torch.stack(firsts, dim=1)

    def _greedy(self, state: _LoopState, logits: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding as the official code does it: argmax over all ids but `[eot]`."""
        eos = -1 if self.eos_token_id is None else self.eos_token_id
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        tokens = []
        for t in range(max_new_tokens):
            nxt = logits[:, : self.eot_id].argmax(-1)
            tokens.append(torch.where(finished, torch.full_like(nxt, -1), nxt))
            finished = finished | (nxt == eos)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            h = self._step(state, input_ids=nxt[:, None])
            logits = self.lm.lm_head(h[:, -1, :])
        return torch.stack(tokens, dim=1)

    @property
    def cache_kw(self) -> str:
        """Name of the decoder's KV-cache argument (transformers 5.2x renamed `past_key_values`)."""
        return self._cache_kw


@dataclass
class _LoopState:
    """What the latent loop carries from one decoder call to the next, per row."""

    cache: Any
    mask: torch.Tensor  # (R, tokens so far)
    next_pos: torch.Tensor  # (R, 1) position of the next token
    last: torch.Tensor  # (R, 1, d) last hidden state


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 before a softmax; others as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
