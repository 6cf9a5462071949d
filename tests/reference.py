"""An independent eager re-implementation of the official CODI loop (batch 1, no nnsight).

Built from the checkpoint with peft (LoRA kept unmerged), plain transformers and PyTorch forward
hooks — it shares no code with `codi_nnsight` beyond reading the codi.json dict, so agreement
with it checks loading, merging, the latent loop, masks and positions.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache


class ReferenceCODI:
    """Official-style CODI: peft-wrapped LM + prj, run one question at a time."""

    def __init__(self, codi_json: str | Path, dtype: torch.dtype = torch.float64) -> None:
        codi_json = Path(codi_json)
        cfg = json.loads(codi_json.read_text())
        root = codi_json.parent
        base = root / cfg["base"]
        self.tok = AutoTokenizer.from_pretrained(base)
        hf = AutoConfig.from_pretrained(base)
        self.vocab = hf.vocab_size
        hf.vocab_size += 3
        # sdpa: an attention path independent of ours, exact in float64 (no padding at batch 1).
        lm = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
        self.family = "gpt2" if hasattr(lm, "transformer") else "llama"
        self.lm = get_peft_model(
            lm,
            LoraConfig(
                r=cfg["lora_r"],
                lora_alpha=cfg["lora_alpha"],
                target_modules=cfg["lora_target_modules"],
                lora_dropout=0.0,
                fan_in_fan_out=self.family == "gpt2",
            ),
        )
        ckpt = root / cfg["checkpoint"]
        sd = load_file(str(ckpt)) if ckpt.suffix == ".safetensors" else torch.load(ckpt, weights_only=True)
        lm_sd = {k[len("codi.") :]: v for k, v in sd.items() if k.startswith("codi.")}
        missing, unexpected = self.lm.load_state_dict(lm_sd, strict=False)
        assert not unexpected, unexpected
        assert all("lm_head" in k for k in missing), missing
        d = hf.hidden_size
        pd = cfg.get("prj_dim") or d
        self.prj = torch.nn.Sequential(
            torch.nn.Dropout(0.0), torch.nn.Linear(d, pd), torch.nn.GELU(), torch.nn.Linear(pd, d)
        )
        self.prj.add_module("ln", torch.nn.LayerNorm(d))
        self.prj.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("prj.")})
        self.lm.to(dtype).eval()
        self.prj.to(dtype).eval()
        self.num_latent = cfg["num_latent"]
        self.bot, self.eot = self.vocab + 1, self.vocab + 2
        inner = self.lm.get_base_model()
        self.blocks = inner.transformer.h if self.family == "gpt2" else inner.model.layers
        self.embed = inner.get_input_embeddings()
        fwd = inspect.signature(inner.forward).parameters
        self.cache_kw = "cache" if "cache" in fwd else "past_key_values"

    def _call(self, cache, **kw):
        return self.lm(use_cache=True, output_hidden_states=True, **{self.cache_kw: cache}, **kw)

    def site(self, layer: int, component: str) -> torch.nn.Module:
        """The module whose output is patched: block (`resid`), attention or MLP; for `head`, the
        attention output projection, whose *input* holds the heads' outputs side by side."""
        block = self.blocks[layer]
        if component == "resid":
            return block
        if component == "attn":
            return block.attn if self.family == "gpt2" else block.self_attn
        if component == "head":
            return block.attn.c_proj if self.family == "gpt2" else block.self_attn.o_proj
        return block.mlp

    @torch.no_grad()
    def run(
        self,
        question: str,
        suffix: list[int] | None = None,
        max_new_tokens: int = 0,
        patch: dict | None = None,
        candidates: list[list[int]] | None = None,
        component: str = "resid",
        latent_override: dict | None = None,
        head: slice | None = None,
    ) -> dict:
        """One question through the official loop.

        `patch` = {layer: {k: tensor(d)}} replaces the `component` output of that layer at latent
        step k (1-based call index) by the given vector; `latent_override` = {k: tensor(d)}
        replaces the input embedding of latent position k (0-based). Returns latents, the
        `component` outputs per layer at each latent step, logits after the suffix, greedy ids.
        """
        records: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(self.blocks))}
        call = {"n": 0}

        def make_hook(i):
            def hook(mod, args, out):
                h = out[0] if isinstance(out, tuple) else out
                if patch is not None and i in patch and call["n"] in patch[i]:
                    h = h.clone()
                    h[:, -1, :] = patch[i][call["n"]]
                    out = (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
                records[i].append(h[:, -1, :].clone())
                return out

            return hook

        def make_pre_hook(i):  # `head`: patch a slice of the output projection's input
            def hook(mod, args):
                x = args[0]
                if patch is not None and i in patch and call["n"] in patch[i]:
                    x = x.clone()
                    x[:, -1, head] = patch[i][call["n"]][head]
                records[i].append(x[:, -1, :].clone())
                return (x,) + tuple(args[1:])

            return hook

        if component == "head":
            handles = [
                self.site(i, component).register_forward_pre_hook(make_pre_hook(i)) for i in range(len(self.blocks))
            ]
        else:
            handles = [self.site(i, component).register_forward_hook(make_hook(i)) for i in range(len(self.blocks))]
        try:
            ids = torch.tensor([self.tok(question).input_ids + [self.bot]])
            cache = DynamicCache()
            out = self._call(cache, input_ids=ids)
            latent = self.prj(out.hidden_states[-1][:, -1:, :])
            latents = []
            for k in range(self.num_latent):
                call["n"] = k + 1
                if latent_override and k in latent_override:
                    latent = latent_override[k].reshape(1, 1, -1)
                latents.append(latent[0, 0])
                out = self._call(cache, inputs_embeds=latent)
                latent = self.prj(out.hidden_states[-1][:, -1:, :])
            call["n"] = self.num_latent + 1
            suffix = list(suffix) if suffix is not None else [self.eot]
            out = self._call(cache, inputs_embeds=self.embed(torch.tensor([suffix])))
            logits = out.logits[0, -1]
            result = {
                "latents": torch.stack(latents) if latents else None,
                "logits": logits,
                "block_latent_outputs": {i: torch.cat(v[1 : 1 + self.num_latent]) for i, v in records.items()},
            }
            gen = []
            cur = logits
            for _ in range(max_new_tokens):
                nxt = int(cur[: self.eot].argmax())
                gen.append(nxt)
                if nxt == self.tok.eos_token_id:
                    break
                call["n"] += 1
                out = self._call(cache, input_ids=torch.tensor([[nxt]]))
                cur = out.logits[0, -1]
            result["generated"] = gen
        finally:
            for h in handles:
                h.remove()
        if candidates is not None:
            lps = []
            for cand in candidates:
                lp = torch.log_softmax(result["logits"], -1)[cand[0]]
                if len(cand) > 1:
                    lp = lp + self.run_logits_after(question, suffix, cand, patch, component, latent_override)
                lps.append(lp)
            result["candidate_logprobs"] = torch.stack(lps)
        return result

    def run_logits_after(self, question, suffix, cand, patch, component="resid", latent_override=None, head=None):
        """Sum of log p(cand[j] | ..., cand[:j]) for j >= 1, recomputed from scratch."""
        full_suffix = list(suffix) + list(cand[:-1])
        res = self.run(question, suffix=full_suffix, patch=patch, component=component, latent_override=latent_override)
        # The last logits predict cand[-1]; recurse for the earlier tokens.
        lp = torch.log_softmax(res["logits"], -1)[cand[-1]]
        if len(cand) > 2:
            lp = lp + self.run_logits_after(question, suffix, cand[:-1], patch, component, latent_override)
        return lp
