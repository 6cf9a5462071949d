"""The CODI model as one plain `torch.nn.Module`, and strict loading of official checkpoints.

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

import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..model.config import DEFAULT_LORA_TARGETS, CODIConfig

log = logging.getLogger(__name__)

CKPT_PREFIXES = ("codi.base_model.model.", "codi.")


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
def family_of(lm: nn.Module) -> str:
    """`gpt2` or `llama` (Llama-like decoders: Llama, Qwen2, Mistral share the layout)."""
    if hasattr(lm, "transformer") and hasattr(lm.transformer, "h"):
        return "gpt2"
    if hasattr(lm, "model") and hasattr(lm.model, "layers"):
        return "llama"
    raise UserError(f"unsupported model class {type(lm).__name__}: expected a GPT-2 or Llama family LM")


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
        self.family = family_of(lm)
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
        return self.lm.transformer if self.family == "gpt2" else self.lm.model

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks; layer L of a sweep is the output of `layers[L]`."""
        return self.base.h if self.family == "gpt2" else self.base.layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids."""
        return self.lm.get_input_embeddings()(ids)

    def bot_ids(self) -> list[int]:
        """Tokens appended to the question: `[bot]`, or `[eos, bot]` when `remove_eos` is false."""
        return [self.bot_id] if self.remove_eos else [self.eos_token_id, self.bot_id]

    def eot_ids(self) -> list[int]:
        """Tokens after the latents: `[eot]`, or `[eot, eos]` when `remove_eos` is false."""
        return [self.eot_id] if self.remove_eos else [self.eot_id, self.eos_token_id]

    # -- one decoder pass --------------------------------------------------------------------
    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _run(self, cache: Any, mask: torch.Tensor, pos: torch.Tensor, *, input_ids=None,
             inputs_embeds=None) -> torch.Tensor:
        q = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        out = self.base(input_ids=input_ids, inputs_embeds=inputs_embeds,
                        attention_mask=self._additive_mask(mask, q), position_ids=pos, use_cache=True,
                        **{self._cache_kw: cache})
        return out.last_hidden_state

    def _additive_mask(self, mask: torch.Tensor, q: int) -> torch.Tensor:
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
                shifts by one.

        Returns:
            dict with `logits` (R, V) at the last suffix position, `latents` (R, K, d) the latent
            input embeddings, `candidate_logprobs` (R, C) and `candidate_first` (R, C) first-token
            ids (when candidates are given) and `generated` (R, N) greedy ids, -1 after eos.
        """
        # No autograd outside training: patching edits activations in place, and it is faster.
        with torch.inference_mode(not self.training):
            return self._forward(input_ids, attention_mask, rows, suffix_ids, candidates,
                                 max_new_tokens, num_latent, prefix_ids, prefix_mask, prompt_prefix)

    def _forward(self, input_ids, attention_mask, rows, suffix_ids, candidates, max_new_tokens,
                 num_latent, prefix_ids=None, prefix_mask=None, prompt_prefix=None) -> dict[str, torch.Tensor]:
        K = self.num_latent if num_latent is None else num_latent
        dev = input_ids.device
        mask = attention_mask.to(dtype=torch.long)
        cache = self._new_cache()
        if prefix_ids is None:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
        else:  # call 0: the shared prefixes, once each; call 1 (below): the rest of every prompt
            pmask = prefix_mask.to(device=dev, dtype=torch.long)
            self._run(cache, pmask, (pmask.cumsum(-1) - 1).clamp(min=0), input_ids=prefix_ids.to(dev))
            sel = prompt_prefix.to(dev)
            cache.batch_select_indices(sel)
            seen = pmask.sum(-1)[sel]
            pos = (seen[:, None] + mask.cumsum(-1) - 1).clamp(min=0)
            mask = torch.cat([pmask[sel], mask], dim=1)
        hidden = self._run(cache, mask, pos, input_ids=input_ids)  # call 0 (or 1): prefill
        last = hidden[:, -1:, :]
        next_pos = pos[:, -1:] + 1
        if rows is not None:
            rows = rows.to(dev)
            cache.batch_select_indices(rows)
            last, mask, next_pos = last[rows], mask[rows], next_pos[rows]
        n_rows = last.shape[0]
        ones = torch.ones(n_rows, 1, dtype=mask.dtype, device=dev)

        latents = []
        for _k in range(K):
            emb = self.prj(last)  # prj call k: input embedding of latent position k
            latents.append(emb)
            mask = torch.cat([mask, ones], dim=1)
            last = self._run(cache, mask, next_pos, inputs_embeds=emb)[:, -1:, :]  # call k+1
            next_pos = next_pos + 1

        if suffix_ids is None:
            suffix_ids = torch.tensor(self.eot_ids(), device=dev)
        suffix_ids = suffix_ids.to(dev)
        if suffix_ids.dim() == 1:
            suffix_ids = suffix_ids.unsqueeze(0).expand(n_rows, -1)
        S = suffix_ids.shape[1]
        mask = torch.cat([mask, ones.expand(n_rows, S)], dim=1)
        spos = next_pos + torch.arange(S, device=dev)
        hidden = self._run(cache, mask, spos, inputs_embeds=self.embed(suffix_ids))  # call K+1
        logits = self.lm.lm_head(hidden[:, -1, :])
        next_pos = next_pos + S
        out: dict[str, torch.Tensor] = {"logits": logits}
        out["latents"] = (torch.cat(latents, dim=1) if latents
                          else logits.new_zeros(n_rows, 0, hidden.shape[-1]))

        if candidates is not None:
            candidates = candidates.to(dev)
            first_logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                                           else logits, dim=-1)
            lps, firsts = [], []
            for c in range(candidates.shape[1]):
                ids = candidates[:, c, :]
                valid = ids >= 0
                tok = ids.clamp(min=0)
                A = tok.shape[1]
                lp = first_logp.gather(1, tok[:, :1]).squeeze(1)
                if A > 1:
                    cmask = torch.cat([mask, valid.to(mask.dtype)], dim=1)
                    h = self._run(cache, cmask, next_pos + torch.arange(A, device=dev),
                                  inputs_embeds=self.embed(tok))
                    step_logits = self.lm.lm_head(h[:, :-1, :])
                    if step_logits.dtype in (torch.float16, torch.bfloat16):
                        step_logits = step_logits.float()
                    step_lp = torch.log_softmax(step_logits, dim=-1).gather(2, tok[:, 1:, None]).squeeze(2)
                    lp = lp + (step_lp * valid[:, 1:]).sum(1)
                    cache.crop(-A)  # roll back: the next candidate starts after the suffix again
                lps.append(lp)
                firsts.append(tok[:, 0])
            out["candidate_logprobs"] = torch.stack(lps, dim=1)
            out["candidate_first"] = torch.stack(firsts, dim=1)

        if max_new_tokens > 0:
            out["generated"] = self._greedy(cache, mask, next_pos, logits, max_new_tokens)
        return out

    def _greedy(self, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, logits: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding as the official code does it: argmax over all ids but `[eot]`."""
        n_rows = logits.shape[0]
        dev = logits.device
        ones = torch.ones(n_rows, 1, dtype=mask.dtype, device=dev)
        eos = -1 if self.eos_token_id is None else self.eos_token_id
        finished = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        tokens = []
        for t in range(max_new_tokens):
            nxt = logits[:, : self.eot_id].argmax(-1)
            tokens.append(torch.where(finished, torch.full_like(nxt, -1), nxt))
            finished = finished | (nxt == eos)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, ones], dim=1)
            h = self._run(cache, mask, next_pos, input_ids=nxt[:, None])
            next_pos = next_pos + 1
            logits = self.lm.lm_head(h[:, -1, :])
        return torch.stack(tokens, dim=1)


# ---------------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (provenance of the checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_file(location: str, revision: str | None = None) -> Path:
    """A local path for `location`: itself, or a hub download for `hf://<repo>/<file>`."""
    if location.startswith("hf://"):
        rest = location[len("hf://"):]
        parts = rest.split("/")
        if len(parts) < 3:
            raise UserError(f"checkpoint {location!r}: expected hf://<owner>/<repo>/<file>")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision))
        except Exception as e:  # network / auth failures are reported as one line
            raise UserError(f"checkpoint {location!r}: download failed: {e}") from None
    path = Path(location)
    if not path.is_file():
        raise UserError(f"checkpoint {location}: no such file")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict safely: safetensors, or `torch.load(weights_only=True)` for `.bin`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refused to load (weights_only=True): {first}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state_dict of tensors")
    return sd


def _short(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def merge_codi_state_dict(sd: dict[str, torch.Tensor], lm: nn.Module, prj: nn.Module,
                          cfg: CODIConfig, family: str, source: str) -> tuple[dict, dict]:
    """Map official CODI keys onto the plain LM and prj, merging LoRA (`W += B @ A * alpha / r`).

    Returns (lm_state, prj_state). Raises `UserError` naming the offending keys for unused
    checkpoint keys, missing model weights, or shape mismatches.
    """
    targets = set(cfg.lora_target_modules or DEFAULT_LORA_TARGETS[family])
    lm_sd = lm.state_dict()
    prj_sd = prj.state_dict()
    used: set[str] = set()
    lm_state: dict[str, torch.Tensor] = {}
    prj_state: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    origin: dict[str, str] = {}  # model key -> checkpoint key, to name the user's key in errors
    for key, value in sd.items():
        if key.startswith("prj."):
            prj_state[key[4:]] = value
            used.add(key)
            continue
        inner = next((key[len(p):] for p in CKPT_PREFIXES if key.startswith(p)), None)
        if inner is None:
            unknown.append(key)
            continue
        if ".lora_A." in inner or ".lora_B." in inner:
            mod, _, rest = inner.partition(".lora_A." if ".lora_A." in inner else ".lora_B.")
            which = "A" if ".lora_A." in inner else "B"
            if rest != "default.weight":
                unknown.append(key)
                continue
            lora.setdefault(mod, {})[which] = value
            origin[f"{mod}.lora_{which}"] = key
            used.add(key)
            continue
        inner = inner.replace(".base_layer.", ".")
        lm_state[inner] = value
        origin[inner] = key
        used.add(key)
    # Keys this architecture has no place for (e.g. another family's checkpoint) come first:
    # they explain every later mismatch.
    unknown += [origin.get(k, k) for k in set(lm_state) - set(lm_sd)]
    unknown += [origin[f"{m}.lora_{w}"] for m, ab in lora.items() for w in ab if m + ".weight" not in lm_sd]
    if unknown:
        raise UserError(f"{source}: checkpoint keys not used by a CODI {family} model: {_short(sorted(unknown))}")

    # LoRA merge, in float64 for exactness, then cast back.
    scale = cfg.lora_alpha / cfg.lora_r if cfg.lora_r else 0.0
    conv1d = {name for name, m in lm.named_modules() if type(m).__name__ == "Conv1D"}
    for mod, ab in sorted(lora.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{source}: LoRA weights for {mod} incomplete (have lora_{''.join(ab)} only)")
        if mod.rsplit(".", 1)[-1] not in targets:
            raise UserError(f"{source}: LoRA weights for {mod}, which is not in lora_target_modules "
                            f"{sorted(targets)}")
        wkey = mod + ".weight"
        if wkey not in lm_state:
            raise UserError(f"{source}: LoRA weights for {mod} but no base weight {wkey}")
        a, b = ab["A"].double(), ab["B"].double()
        if a.shape[0] != cfg.lora_r:
            raise UserError(f"{source}: {mod}.lora_A has rank {a.shape[0]}, codi.json says lora_r={cfg.lora_r}")
        delta = b @ a * scale
        if mod in conv1d:  # GPT-2's Conv1D stores weights as (in, out)
            delta = delta.T
        w = lm_state[wkey]
        if delta.shape != w.shape:
            raise UserError(f"{source}: LoRA delta for {mod} has shape {tuple(delta.shape)}, "
                            f"weight has {tuple(w.shape)}")
        # Kept in float64: the load casts once, to the model's dtype (exact for float64 runs).
        lm_state[wkey] = w.double() + delta

    # Tied embeddings may be stored under either name.
    tied = getattr(lm.config, "tie_word_embeddings", False)
    emb_key = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    if tied:
        if "lm_head.weight" in lm_state and emb_key not in lm_state:
            lm_state[emb_key] = lm_state["lm_head.weight"]
        if emb_key in lm_state and "lm_head.weight" in lm_state:
            if not torch.equal(lm_state[emb_key], lm_state["lm_head.weight"]):
                raise UserError(f"{source}: lm_head.weight differs from {emb_key}, but the base "
                                f"config ties them")
        lm_state.pop("lm_head.weight", None)
    expected = {k for k in lm_sd if not (tied and k == "lm_head.weight")}
    # Non-persistent buffers (e.g. rotary inv_freq, GPT-2 causal masks) are not weights.
    missing = sorted(expected - set(lm_state))
    if missing:
        raise UserError(f"{source}: model weights missing from the checkpoint: {_short(missing)}")
    for k, v in lm_state.items():
        if tuple(v.shape) != tuple(lm_sd[k].shape):
            raise UserError(f"{source}: {origin.get(k, k)} has shape {tuple(v.shape)} in the checkpoint, "
                            f"model expects {tuple(lm_sd[k].shape)}")
    pmissing = sorted(set(prj_sd) - set(prj_state))
    pextra = sorted(set(prj_state) - set(prj_sd))
    if pextra:
        raise UserError(f"{source}: checkpoint keys not used by the projection: "
                        f"{_short(['prj.' + k for k in pextra])}")
    if pmissing:
        raise UserError(f"{source}: projection weights missing from the checkpoint: "
                        f"{_short(['prj.' + k for k in pmissing])}")
    for k, v in prj_state.items():
        if tuple(v.shape) != tuple(prj_sd[k].shape):
            raise UserError(f"{source}: prj.{k} has shape {tuple(v.shape)} in the checkpoint, model "
                            f"expects {tuple(prj_sd[k].shape)}")
    return lm_state, prj_state


def build_codi(cfg: CODIConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               meta: bool = False) -> tuple[CODIModule, Any, dict[str, str]]:
    """Build the merged CODI module and its tokenizer from a config.

    Returns (module, tokenizer, info) where info has `checkpoint_sha256` and `family`. With
    `meta=True` only the structure is built (no weights read), for nnsight's lazy loading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = cfg.base_path
    try:
        hf_config = AutoConfig.from_pretrained(base, revision=None)
        tokenizer = AutoTokenizer.from_pretrained(base)
    except Exception as e:
        raise UserError(f"base {base!r}: cannot load config/tokenizer ({str(e).splitlines()[0]})") from None
    vocab = hf_config.vocab_size
    hf_config.vocab_size = vocab + 3  # pad, bot, eot
    # Our eager attention: exact in float64 (see codi_attention).
    with torch.device("meta" if meta else "cpu"):
        lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation=register_attention())
    family = family_of(lm)
    hidden = hf_config.hidden_size
    prj = make_prj(hidden, cfg.prj_dim or hidden, cfg.use_prj, cfg.prj_no_ln)
    info = {"family": family, "checkpoint_sha256": ""}
    if not meta:
        if dtype == torch.float64:  # load straight into float64 so merged LoRA stays exact
            lm.to(torch.float64)
            prj.to(torch.float64)
        path = fetch_file(cfg.checkpoint_path, cfg.revision)
        sd = read_state_dict(path)
        lm_state, prj_state = merge_codi_state_dict(sd, lm, prj, cfg, family, str(path))
        lm.load_state_dict(lm_state, strict=False)  # strictness checked above, tied weights aside
        if getattr(lm.config, "tie_word_embeddings", False):
            lm.tie_weights()
        prj.load_state_dict(prj_state, strict=True)
        info["checkpoint_sha256"] = file_sha256(path)
    module = CODIModule(lm, prj, num_latent=cfg.num_latent, vocab_size=vocab,
                        eos_token_id=tokenizer.eos_token_id, remove_eos=cfg.remove_eos)
    module.eval()
    if not meta:
        module.to(device=device, dtype=dtype)
    return module, tokenizer, info
