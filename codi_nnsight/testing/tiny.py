"""Tiny CODI models in exactly the official layout, for tests and offline dry runs.

`write_tiny_codi(out_dir, family="gpt2"|"llama"|"qwen2")` writes (any family of `model.families`):

    out_dir/codi.json
    out_dir/base/{config.json, tokenizer.json, tokenizer_config.json, ...}
    out_dir/ckpt/model.safetensors      (keys `codi.base_model.model.*` with peft LoRA, `prj.*`)

The tokenizer is byte-level (every byte one token), so it encodes any text with a tiny vocab.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..model.config import CODIConfig
from ..model.families import family_named

BYTE_VOCAB = 256


def _byte_chars() -> list[str]:
    """The printable stand-in character of each byte, as in GPT-2's byte-level BPE."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer(family: str) -> Any:
    """A byte-level fast tokenizer: ids 0-255 are bytes, then the family's special tokens.

    GPT-2 style (GPT-2, Qwen2): `<|endoftext|>` (id 256) is bos/eos and nothing is added to a text.
    Llama style: `<s>` (256) is prepended to every text, `</s>` (257) is eos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    style = family_named(family).tokenizer_style
    vocab = {c: i for i, c in enumerate(_byte_chars())}
    specials = ["<|endoftext|>"] if style == "gpt2" else ["<s>", "</s>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if style == "gpt2":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=specials[0], eos_token=specials[0], unk_token=specials[0]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="</s>")
    return fast


def bpe_tokenizer(family: str, vocab_size: int = 1000, seed: int = 1) -> Any:
    """A small byte-level BPE trained on our synthetic word problems (GPT-2-like segmentation).

    Realistic token counts for benchmarks: `The answer is: 18` is 5 tokens, a question ~30.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data.synthetic import make_problems

    texts = [f"{p.question} The answer is: {p.answer}" for p in make_problems(2000, seed=seed)]
    eos = "<|endoftext|>" if family_named(family).tokenizer_style == "gpt2" else "</s>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[eos],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos)


def tiny_hf_config(
    family: str,
    n_layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = BYTE_VOCAB + 2,
    max_positions: int = 512,
) -> Any:
    """A small transformers config of the given family (vocab before CODI's +3).

    Raises :class:`UserError` (one line) for heads that do not divide the width, or key/value
    heads that do not divide the heads: transformers would fail deep inside, or build a model
    whose heads silently drop part of the width.
    """
    fam = family_named(family)
    if heads < 1 or hidden % heads:
        raise UserError(
            f"hidden size {hidden} does not split evenly over {heads} attention heads (use a multiple of {heads})"
        )
    if kv_heads is not None and (kv_heads < 1 or heads % kv_heads):
        raise UserError(f"{heads} attention heads do not split evenly over {kv_heads} key/value heads")
    eos = BYTE_VOCAB if fam.tokenizer_style == "gpt2" else BYTE_VOCAB + 1
    return fam.tiny_config(
        vocab=vocab,
        n_layers=n_layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        max_positions=max_positions,
        bos=BYTE_VOCAB,
        eos=eos,
    )


def official_state_dict(
    lm: torch.nn.Module,
    prj: torch.nn.Module,
    family: str,
    lora_r: int,
    lora_alpha: int,
    targets: list[str],
    seed: int = 0,
    tied_key: str = "both",
) -> dict[str, torch.Tensor]:
    """The state_dict an official `CODI` module would save: peft-wrapped LM under `codi.`, `prj.`.

    LoRA weights are random (not peft's zero-B default) so that merging really matters.
    `tied_key` chooses how a tied embedding is stored: `both`, `lm_head` or `embedding`.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed + 1)
    peft_lm = get_peft_model(
        copy.deepcopy(lm),
        LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            init_lora_weights=False,
            fan_in_fan_out=family_named(family).conv1d,
        ),
    )
    with torch.no_grad():
        for name, p in peft_lm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sd = {"codi." + k: v.detach().clone().contiguous() for k, v in peft_lm.state_dict().items()}
    emb = "codi.base_model.model." + family_named(family).embedding_key
    head = "codi.base_model.model.lm_head.weight"
    if tied_key == "lm_head":
        sd[head] = sd.pop(emb) if emb in sd else sd[head]
    elif tied_key == "embedding":
        sd.pop(head, None)
    else:
        sd.setdefault(head, sd[emb].clone())
    sd.update({"prj." + k: v.detach().clone().contiguous() for k, v in prj.state_dict().items()})
    return sd


def write_tiny_codi(
    out_dir: str | Path,
    family: str = "gpt2",
    n_layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int | None = None,
    num_latent: int = 3,
    lora_r: int = 4,
    lora_alpha: int = 8,
    prj_dim: int | None = None,
    seed: int = 0,
    remove_eos: bool = True,
    checkpoint_format: str = "safetensors",
    tied_key: str = "both",
    init_std: float = 0.2,
) -> Path:
    """Write a tiny random CODI model in the official layout; return the path of its `codi.json`.

    `init_std` scales the random weights: larger values give sharper, more varied predictions
    (a default-initialized tiny model predicts almost uniformly, which tests nothing).
    """
    from transformers import AutoModelForCausalLM

    from ..model.module import make_prj

    out = Path(out_dir)
    # The configs first: a bad shape or value is refused before any folder is made.
    hf_config = tiny_hf_config(family, n_layers=n_layers, hidden=hidden, heads=heads, kv_heads=kv_heads)
    targets = list(family_named(family).lora_targets)
    ckpt = Path("ckpt/model.safetensors" if checkpoint_format == "safetensors" else "ckpt/pytorch_model.bin")
    cfg = CODIConfig(
        base="base",
        checkpoint=str(ckpt),
        num_latent=num_latent,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_target_modules=targets,
        prj_dim=prj_dim or hidden,
        remove_eos=remove_eos,
        name=f"tiny-{family}",
    )
    (out / "base").mkdir(parents=True, exist_ok=True)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    hf_config.save_pretrained(out / "base")
    byte_tokenizer(family).save_pretrained(out / "base")
    vocab = hf_config.vocab_size
    big = type(hf_config).from_dict(hf_config.to_dict())
    big.vocab_size = vocab + 3
    lm = AutoModelForCausalLM.from_config(big, attn_implementation="eager")
    with torch.no_grad():  # larger random weights than HF's init so outputs are not uniform
        g = torch.Generator().manual_seed(seed)
        for name, p in lm.named_parameters():
            if p.dim() >= 2 or name.endswith(".bias"):  # biases too: Qwen2's q/k/v biases must matter
                p.copy_(torch.randn(p.shape, generator=g) * init_std)
    prj = make_prj(hidden, prj_dim or hidden, True, False)
    sd = official_state_dict(lm, prj, family, lora_r, lora_alpha, targets, seed=seed, tied_key=tied_key)
    if checkpoint_format == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out / ckpt))
    else:
        torch.save(sd, out / ckpt)
    cfg.save(out / "codi.json")
    return out / "codi.json"


SHAPES: dict[str, dict[str, Any]] = {
    "toy": {"family": "llama", "n_layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": BYTE_VOCAB + 2},
    "gpt2-small": {"family": "gpt2", "n_layers": 12, "hidden": 768, "heads": 12, "vocab": 50257},
    "llama-1b": {
        "family": "llama",
        "n_layers": 16,
        "hidden": 2048,
        "heads": 32,
        "kv_heads": 8,
        "intermediate": 8192,
        "vocab": 128256,
    },
}


def random_codi(
    shape: str = "toy",
    num_latent: int = 6,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tokenizer: str = "byte",
) -> Any:
    """A random-weight `CODIModel` of a named shape, built in memory (benchmarks, no checkpoint).

    The tokenizer (`byte`, or a small `bpe` for realistic token counts) encodes any text whatever
    the vocabulary size; the output layer still spans the full vocabulary of the shape
    (e.g. 128256 + 3 for `llama-1b`).
    """
    from transformers import AutoModelForCausalLM

    from ..model.module import CODIModule, make_prj, register_attention
    from ..model.wrapper import CODIModel

    if shape not in SHAPES:
        raise UserError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    s = dict(SHAPES[shape])
    family, vocab = s.pop("family"), s.pop("vocab")
    tok = byte_tokenizer(family) if tokenizer == "byte" else bpe_tokenizer(family)
    vocab = max(vocab, len(tok))  # the toy shape's vocab is sized for bytes
    torch.manual_seed(seed)
    hf_config = tiny_hf_config(family, vocab=vocab, max_positions=1024, **s)
    big = type(hf_config).from_dict(hf_config.to_dict())
    big.vocab_size = vocab + 3
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(big, attn_implementation=register_attention(), dtype=dtype)
        prj = make_prj(big.hidden_size, big.hidden_size, True, False).to(dtype)
    module = CODIModule(lm, prj, num_latent=num_latent, vocab_size=vocab, eos_token_id=tok.eos_token_id)
    module.eval()
    cfg = CODIConfig(base=f"random:{shape}", checkpoint="", num_latent=num_latent, name=f"random-{shape}")
    return CODIModel(module, tokenizer=tok, config=cfg)
