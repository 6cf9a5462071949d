"""Model families as data: where each architecture keeps the parts CODI and patching need.

One row per family, keyed by the Hugging Face `model_type`. Everything that differs between
GPT-2, Llama and Qwen2 — module paths, LoRA targets, GPT-2's transposed `Conv1D` weights, the
tiny test config and the special tokens of its test tokenizer — lives here, so a new family is
one entry in `FAMILIES` plus its tests, not a branch in every module (pyvene keeps per-family
component tables for the same reason).

Paths are attribute paths: `base` from the causal LM to the decoder stack, `layers`,
`final_norm` and `embedding` from the stack, `attention`, `attention_out` and `mlp` from one
decoder block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its parts, and how to build a tiny one of it."""

    name: str
    model_types: tuple[str, ...]
    base: str
    layers: str
    attention: str
    attention_out: str  # the attention output projection; its *input* holds the per-head outputs
    mlp: str
    final_norm: str
    embedding: str
    lora_targets: tuple[str, ...]
    conv1d: bool  # Linear weights stored (in, out), as GPT-2's Conv1D does
    config_class: str  # transformers config class of `tiny_config`
    tokenizer_style: str  # "gpt2": one <|endoftext|> bos/eos, nothing prepended; "llama": <s> prepended, </s> eos

    # -- module lookup ------------------------------------------------------------------------
    def decoder(self, lm: Any) -> Any:
        """The decoder stack without the LM head (a module or an nnsight envoy)."""
        return resolve(lm, self.base)

    def blocks(self, lm: Any) -> Any:
        """The list of decoder blocks."""
        return resolve(self.decoder(lm), self.layers)

    def part(self, block: Any, which: str) -> Any:
        """`attention`, `attention_out` or `mlp` of one decoder block."""
        return resolve(block, getattr(self, which))

    @property
    def embedding_key(self) -> str:
        """State-dict key of the input embedding (tied embeddings may be stored under it)."""
        return f"{self.base}.{self.embedding}.weight"

    # -- tiny models for tests ----------------------------------------------------------------
    def tiny_config(
        self,
        vocab: int,
        n_layers: int,
        hidden: int,
        heads: int,
        kv_heads: int | None,
        intermediate: int | None,
        max_positions: int,
        bos: int,
        eos: int,
    ) -> Any:
        """A small transformers config of this family (vocab before CODI's +3 tokens)."""
        import transformers

        cls = getattr(transformers, self.config_class)
        if self.name == "gpt2":
            return cls(
                vocab_size=vocab,
                n_positions=max_positions,
                n_embd=hidden,
                n_layer=n_layers,
                n_head=heads,
                bos_token_id=bos,
                eos_token_id=eos,
                tie_word_embeddings=True,
            )
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate or hidden * 2,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads,
            max_position_embeddings=max_positions,
            bos_token_id=bos,
            eos_token_id=eos,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        )


_LLAMA_LIKE = dict(
    base="model",
    layers="layers",
    attention="self_attn",
    attention_out="self_attn.o_proj",
    mlp="mlp",
    final_norm="norm",
    embedding="embed_tokens",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"),
    conv1d=False,
)

#: Supported families by name. Qwen2 is Llama's layout with biased q/k/v projections; Qwen3 adds q/k norms.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "gpt2",
            ("gpt2",),
            base="transformer",
            layers="h",
            attention="attn",
            attention_out="attn.c_proj",
            mlp="mlp",
            final_norm="ln_f",
            embedding="wte",
            lora_targets=("c_attn", "c_proj", "c_fc"),
            conv1d=True,
            config_class="GPT2Config",
            tokenizer_style="gpt2",
        ),
        Family("llama", ("llama",), config_class="LlamaConfig", tokenizer_style="llama", **_LLAMA_LIKE),
        Family("qwen2", ("qwen2",), config_class="Qwen2Config", tokenizer_style="gpt2", **_LLAMA_LIKE),
        # Qwen3: Llama's layout with RMSNorm on each head's queries and keys (inside self_attn, before
        # the attention kernel), as CODI-Qwen3-8B-style checkpoints use.
        Family("qwen3", ("qwen3",), config_class="Qwen3Config", tokenizer_style="gpt2", **_LLAMA_LIKE),
    )
}


def resolve(obj: Any, path: str) -> Any:
    """Follow a dotted attribute path (works on modules and nnsight envoys alike)."""
    return functools.reduce(getattr, path.split("."), obj)


def family_named(name: str) -> Family:
    """The family called `name`; a one-line error naming the choices otherwise."""
    if name not in FAMILIES:
        raise UserError(f"unknown family {name!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for(hf_config: Any) -> Family:
    """The family of a transformers config, by its `model_type`."""
    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise UserError(f"unsupported model_type {model_type!r}: CODI models are supported for {known}")


def check_shape(hf_config: Any, source: str) -> None:
    """Refuse attention shapes the model cannot be built with, in one line naming ``source``.

    The width must split evenly over the heads (unless the config gives an explicit ``head_dim``),
    and the heads over the key/value heads; transformers would fail deep in the build, or (Qwen2)
    build a model whose heads silently drop part of the width.
    """
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", None)
    heads = getattr(hf_config, "num_attention_heads", None) or getattr(hf_config, "n_head", None)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if not isinstance(hidden, int) or not isinstance(heads, int) or hidden <= 0 or heads <= 0:
        raise UserError(f"{source}: hidden size {hidden!r} and attention heads {heads!r} must be positive integers")
    head_dim = getattr(hf_config, "head_dim", None)
    explicit = isinstance(head_dim, int) and head_dim > 0 and head_dim != hidden // heads
    if hidden % heads and not explicit:
        raise UserError(f"{source}: hidden size {hidden} does not split evenly over {heads} attention heads")
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise UserError(f"{source}: {heads} attention heads do not split evenly over {kv_heads} key/value heads")
