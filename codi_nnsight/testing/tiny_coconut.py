"""Tiny random Coconut checkpoints in both real formats, for tests and offline dry runs.

`write_tiny_coconut(out_dir, family="gpt2"|"llama"|"qwen2", fmt="meta"|"hf")` writes

    out_dir/coconut.json
    out_dir/base/{config.json, tokenizer files}
    out_dir/ckpt/checkpoint_<K>       (fmt="meta": torch.save of `base_causallm.*` + `embedding.weight`)
    out_dir/ckpt/model.safetensors    (fmt="hf": transformers keys; the base config holds the latent ids)

In Meta's format the base is the plain model (its tokenizer without the latent tokens, which the
loader adds, as the official `run.py` does). In the HF-native format the base folder is what
`save_pretrained` of the tokenizer with the tokens added and of the resized config would give.
The same `seed` gives the same weights in both formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..methods.coconut import COCONUT
from .tiny import byte_tokenizer, tiny_hf_config

FORMATS = ("meta", "hf")


def tiny_coconut_lm(family: str, vocab: int, seed: int, init_std: float, **shape: Any) -> torch.nn.Module:
    """A random causal LM of `family` with `vocab` + 3 ids (the resized Coconut vocabulary).

    Weights are drawn larger than transformers' init (`init_std`), biases included, so the
    predictions are sharp and varied rather than nearly uniform.
    """
    from transformers import AutoModelForCausalLM

    hf_config = tiny_hf_config(family, vocab=vocab + len(COCONUT.added_tokens), **shape)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in lm.named_parameters():
            if p.dim() >= 2 or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * init_std)
    return lm


def meta_state_dict(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict Meta's `Coconut` wrapper saves: `base_causallm.*` and the embedding again."""
    sd = {"base_causallm." + k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    sd["embedding.weight"] = lm.get_input_embeddings().weight.detach().clone().contiguous()
    return sd


def hf_state_dict(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes: transformers keys, a tied LM head stored once (as the embedding)."""
    sd = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    if getattr(lm.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def write_tiny_coconut(
    out_dir: str | Path,
    family: str = "gpt2",
    fmt: str = "meta",
    n_layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int | None = None,
    num_latent: int = 6,
    seed: int = 0,
    init_std: float = 0.2,
) -> Path:
    """Write a tiny random Coconut model in `fmt`; return the path of its `coconut.json`."""
    from safetensors.torch import save_file

    from ..model.coconut_checkpoint import CoconutConfig

    if fmt not in FORMATS:
        raise UserError(f"Coconut checkpoint format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    tok = byte_tokenizer(family)
    vocab = len(tok)  # V: the official run.py resizes to len(tokenizer) + 3
    shape = dict(n_layers=n_layers, hidden=hidden, heads=heads, kv_heads=kv_heads)
    base_config = tiny_hf_config(family, **shape)  # checked (heads, widths) before any folder is made
    lm = tiny_coconut_lm(family, vocab, seed, init_std, **shape)
    ckpt = Path("ckpt") / (f"checkpoint_{num_latent}" if fmt == "meta" else "model.safetensors")
    (out / "base").mkdir(parents=True, exist_ok=True)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    if fmt == "meta":
        base_config.save_pretrained(out / "base")
        tok.save_pretrained(out / "base")
        torch.save(meta_state_dict(lm), out / ckpt)
    else:
        config = lm.config
        start = vocab
        config.latent_start_id, config.latent_end_id, config.latent_id = start, start + 1, start + 2
        config.save_pretrained(out / "base")
        tok.add_tokens(list(COCONUT.added_tokens))
        tok.pad_token = tok.eos_token
        tok.save_pretrained(out / "base")
        save_file(hf_state_dict(lm), str(out / ckpt))
    cfg = CoconutConfig(base="base", checkpoint=str(ckpt), num_latent=num_latent, name=f"tiny-coconut-{family}")
    cfg.save(out / "coconut.json")
    return out / "coconut.json"
