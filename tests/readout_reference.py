"""Independent readouts of the official-style reference CODI loop (`reference.ReferenceCODI`).

Plain PyTorch forward hooks on the peft-wrapped (LoRA unmerged) reference model, which runs
transformers' sdpa attention: block outputs are read from the blocks, and attention weights are
recomputed from scratch — q and k from the attention module's input through its own
(LoRA-wrapped) projections, RoPE applied by hand for Llama/Qwen2 (with the cos/sin the module is
given), grouped kv heads repeated, softmax(q·kᵀ/√d) of the last query over every key so far. It
shares no code with `codi_nnsight.readouts`.
"""

from __future__ import annotations

import torch
from reference import ReferenceCODI
from transformers import DynamicCache


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ReadoutReference:
    """Run one question (batch 1, no padding) and keep, per decoder call, what readouts need."""

    def __init__(self, ref: ReferenceCODI) -> None:
        self.ref = ref
        inner = ref.lm.get_base_model()
        self.inner = inner
        self.gpt2 = ref.family == "gpt2"
        self.norm = inner.transformer.ln_f if self.gpt2 else inner.model.norm
        self.head = inner.lm_head
        cfg = inner.config
        self.heads = cfg.n_head if self.gpt2 else cfg.num_attention_heads
        self.kv_heads = self.heads if self.gpt2 else cfg.num_key_value_heads
        self.head_dim = (
            cfg.hidden_size // self.heads
            if self.gpt2
            else getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        )

    def attention_module(self, layer: int) -> torch.nn.Module:
        block = self.ref.blocks[layer]
        return block.attn if self.gpt2 else block.self_attn

    def _qk(self, module: torch.nn.Module, hidden: torch.Tensor, pos_emb) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H, T, hd) queries and (1, H, T, hd) keys (kv heads repeated) of `hidden`."""
        B, T, _ = hidden.shape
        if self.gpt2:
            q, k, _ = module.c_attn(hidden).split(self.heads * self.head_dim, dim=2)
            q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(B, T, self.heads, self.head_dim).transpose(1, 2)
            return q, k
        q = module.q_proj(hidden).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = module.k_proj(hidden).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = pos_emb
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k.repeat_interleave(self.heads // self.kv_heads, dim=1)

    @torch.no_grad()
    def run(self, question: str, suffix: list[int]) -> dict:
        """Block outputs (calls, layers, d) and attention rows (calls, layers, heads, keys) of the last
        query of every call (question, K latents, suffix), and the K+1 prj outputs (K+1, d)."""
        ref = self.ref
        n_layers = len(ref.blocks)
        blocks: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        rows: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        keys: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

        def block_hook(i):
            def hook(mod, args, out):
                h = out[0] if isinstance(out, tuple) else out
                blocks[i].append(h[0, -1].clone())

            return hook

        def attn_hook(i):
            def hook(mod, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                q, k = self._qk(mod, hidden, kwargs.get("position_embeddings"))
                keys[i].append(k)
                k_all = torch.cat(keys[i], dim=2)
                scores = (q[:, :, -1:, :] @ k_all.transpose(-1, -2))[0, :, 0] * self.head_dim**-0.5
                rows[i].append(torch.softmax(scores, dim=-1))

            return hook

        handles = [ref.blocks[i].register_forward_hook(block_hook(i)) for i in range(n_layers)]
        handles += [
            self.attention_module(i).register_forward_pre_hook(attn_hook(i), with_kwargs=True) for i in range(n_layers)
        ]
        try:
            ids = torch.tensor([ref.tok(question).input_ids + [ref.bot]])
            cache = DynamicCache()
            out = ref._call(cache, input_ids=ids)
            prj = [ref.prj(out.hidden_states[-1][:, -1:, :])[0, 0]]
            for _ in range(ref.num_latent):
                out = ref._call(cache, inputs_embeds=prj[-1].reshape(1, 1, -1))
                prj.append(ref.prj(out.hidden_states[-1][:, -1:, :])[0, 0])
            out = ref._call(cache, inputs_embeds=ref.embed(torch.tensor([suffix])))
        finally:
            for h in handles:
                h.remove()
        return {
            "block": torch.stack([torch.stack(b) for b in blocks], 1),
            "attention": [[rows[i][c] for i in range(n_layers)] for c in range(ref.num_latent + 2)],
            "prj": torch.stack(prj),
            "logits": out.logits[0, -1],
            "n_prompt": ids.shape[1],
        }

    @torch.no_grad()
    def lens(self, h: torch.Tensor) -> torch.Tensor:
        """Lens logits: the LM head of the final norm of `h`."""
        return self.head(self.norm(h))
