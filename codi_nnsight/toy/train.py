"""Train and evaluate the bundled toy CODI model (continuous chain-of-thought, arXiv 2502.21074).

One shared tiny Llama (8 layers, a byte-level BPE tokenizer with Llama 3's pre-tokenizer split,
trained from scratch) learns 3-5 step addition/subtraction word problems with multi-digit
numbers (`synthetic.make_toy_problem`) by CODI self-distillation:

* teacher: ``<s>question [bot] steps [eot] The answer is: X</s>`` with CE on everything after
  ``[bot]`` (the explicit chain of thought and the answer);
* student: ``<s>question [bot]``, ``num_latent`` latent steps feeding ``prj(last hidden)`` back
  as the next input embedding (gradients flow through the loop), then
  ``[eot] The answer is: X</s>`` with CE on the answer text;
* distillation: SmoothL1 between the student's and the detached teacher's hidden states at every
  layer, at the token that predicts the answer (the whitespace token after ``is:``), each layer
  divided by the teacher's std as in the official code;
* latent-step CE (a toy-scale addition): latent k's hidden state, read through the LM head,
  predicts the k-th intermediate result (the answer once the chain is done);
* curriculum: the first ``teacher_steps`` train the teacher alone (cheap, and it learns the
  arithmetic in a few hundred steps), then everything is trained jointly;
* data parallel: ``workers`` processes (one core and one torch thread each) split every batch
  and average their gradients, which is how the two cores of a small CPU machine both help.

The loss weights (distillation 5, latent CE 2) and the depth were chosen by held-out accuracy
within the 30-minute CPU budget (docs/toy-model.md lists the runs), never by a patching result.

``train_toy`` writes the official on-disk layout (``codi.json``, ``base/``,
``ckpt/model.safetensors`` with ``codi.<hf keys>`` and ``prj.*``) that
`codi_nnsight.model.load_model` reads; ``evaluate_toy`` measures greedy accuracy with real CODI
inference plus latent ablations (zeros, another problem's latents).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.synthetic import WordProblem, make_toy_problem, toy_words
from ..errors import UserError
from ..model.config import CODIConfig
from ..model.module import CODIModule, make_prj, register_attention

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
#: Llama-3's pre-tokenizer split: numbers of up to 3 digits stand alone, and the space before a
#: number is a token of its own (``" 18"`` -> ``"Ġ"``, ``"18"``), as in the real models.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<s>", "</s>"]
BOS, EOS = 0, 1  # `<s>` (prepended by the tokenizer), `</s>`
ANSWER_PREFIX = "The answer is: "
#: Merges the BPE trainer may learn on top of the 256 byte tokens and the specials.
BPE_MERGES = 260
#: Numbers that must be single tokens (every toy and `wide` result): checked when building.
SINGLE_TOKEN_NUMBERS = range(100)


def _bpe_corpus() -> list[str]:
    """The fixed text the toy BPE is trained on: toy and `wide` problems (questions, chains,
    answers), every template word and the numbers 0-99 (so each is one token)."""
    from ..data.synthetic import make_problems, make_toy_problems

    lines = []
    for p in make_toy_problems(1000, seed=20261128) + make_problems(300, seed=20261128):
        lines += [p.question, " ".join(p.steps), ANSWER_PREFIX + str(p.answer)]
    lines.append(" ".join(toy_words()))
    lines += [" ".join(str(n) for n in SINGLE_TOKEN_NUMBERS)] * 50
    return lines


@lru_cache(maxsize=1)
def toy_tokenizer() -> Any:
    """The toy model's byte-level BPE tokenizer (a `PreTrainedTokenizerFast`).

    Trained, deterministically, on `_bpe_corpus` with Llama-3's pre-tokenizer split: words get
    their leading space (``"Ġapples"``), a number is its own token after a whitespace-only token,
    so ``The answer is: 18`` ends in ``":", "Ġ", "18"`` and the answer position logic of the real
    models is exercised. `<s>` is prepended, `</s>` is eos; any byte string encodes (no unknown
    token). Cached: build once per process, then copy with `save_pretrained`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIALS) + len(alphabet) + BPE_MERGES,
        special_tokens=SPECIALS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_bpe_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    split = [n for n in SINGLE_TOKEN_NUMBERS if len(tok.encode(str(n), add_special_tokens=False).ids) != 1]
    if split:  # pragma: no cover - a property of the fixed corpus, checked in the tests
        raise RuntimeError(f"toy BPE splits the numbers {split[:5]}")
    return fast


def encode(text: str) -> list[int]:
    """Token ids of `text` under `toy_tokenizer` (without `<s>`)."""
    return toy_tokenizer()(text, add_special_tokens=False).input_ids


def decode(ids: list[int]) -> str:
    """Text of token ids; specials and CODI's extra ids (>= `BASE_VOCAB`) are dropped."""
    return toy_tokenizer().decode([i for i in ids if len(SPECIALS) <= i < BASE_VOCAB])


BASE_VOCAB = len(toy_tokenizer())
PAD, BOT, EOT = BASE_VOCAB, BASE_VOCAB + 1, BASE_VOCAB + 2
#: Problems whose arithmetic chain hashes into this bucket (of HOLDOUT_MOD) never appear in
#: training, so evaluation measures generalization to unseen number/operator chains.
HOLDOUT_MOD = 10


@dataclass
class ToyConfig:
    """Hyper-parameters of a toy CODI run (the defaults are the shipped model's)."""

    seed: int = 0
    steps: int = 4600
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    n_layers: int = 8
    hidden: int = 128
    heads: int = 4
    intermediate: int = 256
    prj_dim: int = 128
    num_latent: int = 6
    min_steps: int = 3
    max_steps: int = 5
    max_start: int = 29
    max_operand: int = 9
    max_result: int = 39
    distill_factor: float = 5.0
    #: Divide each layer's distillation loss by the teacher's std (as the official code does).
    distill_std: bool = True
    #: Weight of the latent-step CE: latent k's last hidden state, read through the LM head, must
    #: predict the k-th intermediate result (the answer from the last step on). 0 disables it.
    latent_ce_factor: float = 2.0
    #: Curriculum: the first `teacher_steps` of `steps` train the teacher (explicit CoT) only,
    #: cheaper per step than a CODI step (no latent loop), and the teacher learns the arithmetic
    #: much faster alone than jointly; then everything is trained.
    #: Each phase has its own warmup and cosine schedule.
    teacher_steps: int = 800
    #: Train a "no latent" baseline instead: num_latent 0, student CE only, no teacher.
    baseline: bool = False
    #: Data-parallel training processes, one torch thread each: every process draws the same
    #: batch, takes every `workers`-th problem of it and the gradients are averaged, so one step
    #: sees `batch_size` problems whatever the count. The toy's small matrix products do not
    #: speed up with threads (0.64 vs 0.82 s per step on one vs two), but two processes on two
    #: cores nearly halve a step. The result depends on the count only through float rounding
    #: and the per-share token means of the losses.
    workers: int = 2
    #: The latent method trained (a key of `RECIPES`): how the model is built, trained and saved.
    method: str = "codi"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def is_held_out(problem: WordProblem) -> bool:
    """Whether the problem's arithmetic chain is reserved for evaluation."""
    return zlib.crc32(" ".join(problem.steps).encode()) % HOLDOUT_MOD == 0


def sample_problems(rng: random.Random, n: int, cfg: ToyConfig, held_out: bool) -> list[WordProblem]:
    """`n` problems from the training (or held-out) side of the chain split."""
    out: list[WordProblem] = []
    while len(out) < n:
        n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
        p = make_toy_problem(rng, n_steps, cfg.max_operand, cfg.max_result, cfg.max_start)
        if is_held_out(p) == held_out:
            out.append(p)
    return out


def eval_problems(n: int, seed: int, cfg: ToyConfig | None = None) -> list[WordProblem]:
    """The fixed held-out evaluation set: `n` problems from chains never used in training."""
    return sample_problems(random.Random(seed), n, cfg or ToyConfig(), held_out=True)


def _pad(seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def make_batch(problems: list[WordProblem]) -> dict[str, torch.Tensor]:
    """Tensors for one training batch.

    Questions are left-padded like inference prompts; the student suffix
    ``[eot] The answer is: X</s>`` and the teacher continuation
    ``steps [eot] The answer is: X</s>`` (both run after the shared question prefix) are
    right-padded. ``*_labels`` hold the target of each position (-100 = no loss);
    ``*_distill`` index the position predicting the answer number (the whitespace token before it).
    """
    question = [[BOS, *encode(p.question), BOT] for p in problems]
    answer = [encode(ANSWER_PREFIX + str(p.answer)) + [EOS] for p in problems]
    q_ids, q_mask = _pad(question, left=True)
    s_ids, s_mask = _pad([[EOT, *a] for a in answer], left=False)
    s_labels = torch.full_like(s_ids, -100)
    s_labels[:, :-1] = torch.where(s_mask[:, 1:].bool(), s_ids[:, 1:], -100)
    # Teacher continuation after the shared `question [bot]` prefix: steps [eot] answer </s>.
    cont = [encode(" ".join(p.steps)) + [EOT] + a for p, a in zip(problems, answer)]
    t_ids, t_mask = _pad(cont, left=False)
    # Target of the prefix's last ([bot]) position, then of each continuation position.
    t_labels = torch.full((len(problems), t_ids.shape[1] + 1), -100, dtype=torch.long)
    t_labels[:, :-1] = torch.where(t_mask.bool(), t_ids, -100)
    # In the continuation the token predicting the answer number (the whitespace token after
    # `is:`, the prefix's last token) sits len(prefix) - 1 tokens into the answer.
    n_prefix = len(encode(ANSWER_PREFIX))
    t_distill = torch.tensor([len(c) - len(a) + n_prefix - 1 for c, a in zip(cont, answer)])
    # In the student suffix [eot] + answer the same token is at index len(prefix).
    s_distill = torch.full((len(problems),), n_prefix, dtype=torch.long)
    # Token id of each step's result; rows padded with the answer (the last result).
    width = max(len(p.steps) for p in problems)
    res = [[encode(s.split("=")[1])[0] for s in p.steps] for p in problems]
    results = torch.tensor([r + [r[-1]] * (width - len(r)) for r in res], dtype=torch.long)
    return {
        "q_ids": q_ids,
        "q_mask": q_mask,
        "s_ids": s_ids,
        "s_mask": s_mask,
        "results": results,
        "s_labels": s_labels,
        "t_ids": t_ids,
        "t_mask": t_mask,
        "t_labels": t_labels,
        "t_distill": t_distill,
        "s_distill": s_distill,
    }


# ---------------------------------------------------------------------------------------------
# Model and losses
# ---------------------------------------------------------------------------------------------
def toy_lm(cfg: ToyConfig, n_added: int) -> tuple[nn.Module, Any]:
    """A freshly initialized (seeded) toy Llama with `n_added` ids after the toy vocabulary, and the
    HF config of its base (the vocabulary without them): the shape every toy method shares."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(cfg.seed)
    hf_config = LlamaConfig(
        vocab_size=BASE_VOCAB,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=256,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    big = type(hf_config).from_dict(hf_config.to_dict())
    big.vocab_size = BASE_VOCAB + n_added
    return AutoModelForCausalLM.from_config(big, attn_implementation=register_attention()), hf_config


def build_model(cfg: ToyConfig) -> tuple[CODIModule, Any]:
    """A freshly initialized CODI module (tiny Llama + prj) and its HF base config."""
    lm, hf_config = toy_lm(cfg, 3)  # pad, bot, eot
    prj = make_prj(cfg.hidden, cfg.prj_dim, True, False)
    num_latent = 0 if cfg.baseline else cfg.num_latent
    module = CODIModule(lm, prj, num_latent=num_latent, vocab_size=BASE_VOCAB, eos_token_id=EOS, remove_eos=True)
    return module, hf_config


def _base(module: CODIModule, mask: torch.Tensor, pos: torch.Tensor, cache: Any = None, **inputs: torch.Tensor) -> Any:
    """One decoder pass with CODI's own additive mask (same as inference), all hidden states."""
    q = next(iter(inputs.values())).shape[1]
    kw = {module.cache_kw: cache} if cache is not None else {}
    return module.base(
        **inputs,
        attention_mask=module.additive_mask(mask, q),
        position_ids=pos,
        use_cache=cache is not None,
        output_hidden_states=True,
        **kw,
    )


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def compute_losses(
    module: CODIModule, batch: dict[str, torch.Tensor], cfg: ToyConfig, teacher_only: bool = False
) -> dict[str, torch.Tensor]:
    """Teacher CE, student CE, distillation loss and their weighted total for one batch.

    `teacher_only` (curriculum phase 1): the teacher CE alone.
    """
    from transformers import DynamicCache

    rows = torch.arange(batch["q_ids"].shape[0])
    # Shared prefill of `question [bot]`: teacher and student continue from the same KV cache,
    # which saves a second pass over the (long) question.
    mask = batch["q_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    prefix = _base(module, mask, pos, cache, input_ids=batch["q_ids"]).last_hidden_state[:, -1:]
    q_mask, next_pos = mask, pos[:, -1:] + 1
    t_cache = None
    if teacher_only:
        t_cache = cache
    elif not cfg.baseline:
        t_cache = DynamicCache()
        for i, layer in enumerate(cache.layers):
            t_cache.update(layer.keys, layer.values, i)
    if teacher_only:
        t_ids, t_mask = batch["t_ids"], torch.cat([q_mask, batch["t_mask"]], dim=1)
        t_pos = q_mask.sum(1, keepdim=True) + torch.arange(t_ids.shape[1])
        t_out = _base(module, t_mask, t_pos, t_cache, input_ids=t_ids)
        t_hidden = torch.cat([prefix, t_out.last_hidden_state], dim=1)
        teacher_ce = _ce(module.lm.lm_head(t_hidden), batch["t_labels"])
        return {"teacher_ce": teacher_ce, "total": teacher_ce}
    # Student: latent loop with gradients, then the answer suffix.
    last = prefix
    ones = torch.ones_like(mask[:, :1])
    latent_hidden = []
    for _ in range(module.num_latent):
        emb = module.prj(last)
        mask = torch.cat([mask, ones], dim=1)
        last = _base(module, mask, next_pos, cache, inputs_embeds=emb).last_hidden_state
        latent_hidden.append(last)
        next_pos = next_pos + 1
    s_ids = batch["s_ids"]
    mask = torch.cat([mask, batch["s_mask"]], dim=1)
    spos = next_pos + torch.arange(s_ids.shape[1])
    out = _base(module, mask, spos, cache, inputs_embeds=module.embed(s_ids))
    student_ce = _ce(module.lm.lm_head(out.last_hidden_state), batch["s_labels"])
    losses = {"student_ce": student_ce}
    if cfg.baseline:
        losses["total"] = student_ce
        return losses
    # Teacher: the explicit chain of thought after the same prefix.
    t_ids, t_mask = batch["t_ids"], torch.cat([q_mask, batch["t_mask"]], dim=1)
    t_pos = q_mask.sum(1, keepdim=True) + torch.arange(t_ids.shape[1])
    t_out = _base(module, t_mask, t_pos, t_cache, input_ids=t_ids)
    t_hidden = torch.cat([prefix, t_out.last_hidden_state], dim=1)
    teacher_ce = _ce(module.lm.lm_head(t_hidden), batch["t_labels"])
    distill = student_ce.new_zeros(())
    # hidden_states[0] is the embedding (identical for both); the rest are the layers' outputs.
    layers = list(zip(out.hidden_states[1:], t_out.hidden_states[1:]))
    for s_h, t_h in layers:
        s_vec = s_h[rows, batch["s_distill"]]
        t_vec = t_h[rows, batch["t_distill"]].detach()
        term = nn.functional.smooth_l1_loss(s_vec, t_vec)
        distill = distill + (term / t_vec.std() if cfg.distill_std else term)
    distill = distill / len(layers)
    total = teacher_ce + student_ce + cfg.distill_factor * distill
    losses.update(teacher_ce=teacher_ce, distill=distill)
    if cfg.latent_ce_factor and latent_hidden:
        res = batch["results"]
        idx = torch.arange(len(latent_hidden)).clamp(max=res.shape[1] - 1)
        latent_ce = _ce(module.lm.lm_head(torch.cat(latent_hidden, dim=1)), res[:, idx])
        losses["latent_ce"] = latent_ce
        total = total + cfg.latent_ce_factor * latent_ce
    losses["total"] = total
    return losses


# ---------------------------------------------------------------------------------------------
# Recipes: one row per latent method the toy can be trained with
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How one latent method's toy model is built, trained and saved (a row of `RECIPES`).

    `losses(module, problems, cfg, step)` returns the named losses of one step's share of the
    batch (with `total`, the one back-propagated); `phase_starts(cfg)` lists the first step of
    each curriculum phase, each with its own warmup and cosine schedule; `reset_optimizer`: a new
    optimizer at each phase start (Coconut's stages), or one for the whole run (CODI's).
    """

    name: str
    config: type
    build: Callable[[Any], tuple[CODIModule, Any]]
    losses: Callable[[CODIModule, list[WordProblem], Any, int], dict[str, torch.Tensor]]
    phase_starts: Callable[[Any], list[int]]
    save: Callable[[CODIModule, Any, Any, Any], Path]
    reset_optimizer: bool = False


def _codi_losses(module: CODIModule, problems: list[WordProblem], cfg: ToyConfig, step: int) -> dict[str, torch.Tensor]:
    teacher_only = step < cfg.teacher_steps and not cfg.baseline
    return compute_losses(module, make_batch(problems), cfg, teacher_only=teacher_only)


def _codi_phases(cfg: ToyConfig) -> list[int]:
    return [0, cfg.teacher_steps] if cfg.teacher_steps > 0 and not cfg.baseline else [0]


def _codi_save(module: CODIModule, hf_config: Any, cfg: ToyConfig, out_dir: Any) -> Path:
    return save_toy(module, hf_config, cfg, out_dir, name="toy-codi-baseline" if cfg.baseline else "toy-codi")


#: Each trainable method's recipe, as "module:attribute" (imported when used: the Coconut recipe
#: builds on this module).
RECIPES = {
    "codi": "codi_nnsight.toy.train:CODI_RECIPE",
    "coconut": "codi_nnsight.toy.coconut:COCONUT_RECIPE",
}


def recipe_named(method: str) -> Recipe:
    """The `Recipe` of `method`; a one-line error naming the known ones otherwise."""
    import importlib

    if method not in RECIPES:
        raise UserError(f"train-toy: no recipe for method {method!r}; known: {', '.join(RECIPES)}")
    module, _, name = RECIPES[method].partition(":")
    return getattr(importlib.import_module(module), name)


def recipe_for(cfg: ToyConfig) -> Recipe:
    """The recipe of the method `cfg` trains."""
    return recipe_named(cfg.method)


def config_class(method: str) -> type:
    """The config dataclass of `method`'s toy (`ToyConfig` for CODI)."""
    return recipe_named(method).config


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def save_toy(module: CODIModule, hf_config: Any, cfg: ToyConfig, out_dir: str | Path, name: str = "toy-codi") -> Path:
    """Write the official layout (`codi.json`, `base/`, `ckpt/model.safetensors`).

    Returns the path of `codi.json`.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    (out / "base").mkdir(parents=True, exist_ok=True)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out / "base")
    toy_tokenizer().save_pretrained(out / "base")
    sd = {
        "codi." + k: v.detach().clone().contiguous() for k, v in module.lm.state_dict().items() if k != "lm_head.weight"
    }  # tied to embed
    sd.update({"prj." + k: v.detach().clone().contiguous() for k, v in module.prj.state_dict().items()})
    save_file(sd, str(out / "ckpt" / "model.safetensors"))
    codi_cfg = CODIConfig(
        base="base",
        checkpoint="ckpt/model.safetensors",
        num_latent=module.num_latent,
        lora_r=0,
        prj_dim=cfg.prj_dim,
        use_prj=True,
        prj_no_ln=False,
        remove_eos=True,
        name=name,
    )
    codi_cfg.save(out / "codi.json")
    return out / "codi.json"


CODI_RECIPE = Recipe(
    name="codi",
    config=ToyConfig,
    build=build_model,
    losses=_codi_losses,
    phase_starts=_codi_phases,
    save=_codi_save,
)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def phase_starts(cfg: ToyConfig) -> list[int]:
    """First step of each curriculum phase (each has its own warmup and cosine schedule).

    CODI: the teacher-only phase, then joint training; the Coconut recipe: one phase per stage.
    """
    return recipe_for(cfg).phase_starts(cfg)


def _lr_factor(step: int, cfg: ToyConfig) -> float:
    """Linear warmup then cosine decay to 10%, separately in each curriculum phase."""
    starts = phase_starts(cfg)  # a phase may end after `steps` (short runs): its schedule is kept
    start = max(s for s in starts if s <= step)
    later = [s for s in starts if s > start]
    end = later[0] if later else cfg.steps
    step, n = step - start, end - start
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, n - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def train_toy(
    out_dir: str | Path,
    seed: int = 0,
    steps: int | None = None,
    evaluate: bool = True,
    eval_n: int = 200,
    log_every: int = 100,
    verbose: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a toy model into `out_dir`: CODI (default), its no-latent baseline (`baseline=True`),
    or Coconut (`method="coconut"`, its stage curriculum; see `codi_nnsight.toy.coconut`).

    Deterministic for a seed and `workers` count on CPU. `overrides` set fields of the method's
    config (`ToyConfig`, `CoconutToyConfig`). Returns the training log (also written to
    `out_dir/train_log.json`): config, loss history, wall time and, when `evaluate`, the
    `evaluate_toy` metrics on `eval_n` held-out problems.
    """
    cfg = config_class(overrides.pop("method", "codi"))(seed=seed, **overrides)
    if steps is not None:
        cfg.steps = steps
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, not {cfg.workers}")
    if cfg.batch_size % cfg.workers:
        raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over {cfg.workers} workers")
    if cfg.workers == 1:
        return _train(out_dir, cfg, evaluate, eval_n, log_every, verbose)
    import tempfile

    import torch.multiprocessing as mp

    # Each worker is a fresh process (spawn), one torch thread each; they meet through a file.
    with tempfile.TemporaryDirectory() as rendezvous:
        context = mp.start_processes(
            _train_worker,
            args=(cfg, str(out_dir), evaluate, eval_n, log_every, verbose, str(Path(rendezvous, "init"))),
            nprocs=cfg.workers,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join():
                pass
        except BaseException:
            # A signal to this process alone (a scheduler's SIGINT) must not leave the workers
            # training on: multiprocessing would then wait for them at exit.
            _stop_workers(context.processes)
            raise
    return json.loads(Path(out_dir, "train_log.json").read_text(encoding="utf-8"))


#: Seconds a worker gets to end after SIGTERM before it is killed.
_WORKER_STOP_GRACE_S = 5.0


def _stop_workers(processes: list[Any]) -> None:
    """Terminate the still-running worker processes, then kill those that ignore it."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.time() + _WORKER_STOP_GRACE_S
    for proc in processes:
        proc.join(max(0.0, deadline - time.time()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the main process dies (even by SIGKILL); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the main process still stops its workers itself
        return
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        # The main process died while this worker was still importing, before the request above.
        raise SystemExit(1)


def _train_worker(
    rank: int,
    cfg: ToyConfig,
    out_dir: str,
    evaluate: bool,
    eval_n: int,
    log_every: int,
    verbose: bool,
    init_file: str,
) -> None:
    """One data-parallel training process (`torch.multiprocessing.spawn` target)."""
    import torch.distributed as dist

    _die_with_parent()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cfg.workers)
    try:
        _train(out_dir, cfg, evaluate, eval_n, log_every, verbose and rank == 0, rank=rank)
        # Leave together: a worker that exits while rank 0 still saves and evaluates closes its
        # gloo connections under rank 0's feet, which can abort rank 0 ("terminate called ...").
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Everything is written (rank 0 saved before the barrier). Tearing gloo down now races with
    # the peer doing the same: a rank whose peer has already closed its connections aborts in
    # gloo's destructor ("terminate called without an active exception", seen once in CI). So the
    # worker leaves without running destructors; the OS closes its sockets.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _average_over_workers(params: list[nn.Parameter], losses: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Average gradients (and the logged losses) over the workers, in one all-reduce; losses as floats."""
    import torch.distributed as dist

    # Parameters without a gradient (prj in the teacher-only phase) are the same in every worker
    # and stay without one, so the optimizer skips them as it does in one process.
    have = [p for p in params if p.grad is not None]
    names = sorted(losses)
    flat = torch.cat([p.grad.reshape(-1) for p in have] + [torch.stack([losses[k].detach() for k in names])])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in have:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    return {k: float(v) for k, v in zip(names, flat[offset:])}


def _train(
    out_dir: str | Path,
    cfg: ToyConfig,
    evaluate: bool,
    eval_n: int,
    log_every: int,
    verbose: bool,
    rank: int = 0,
) -> dict[str, Any]:
    """The training loop of one process (`rank` of `cfg.workers`); rank 0 saves and evaluates."""
    world = cfg.workers
    recipe = recipe_for(cfg)
    module, hf_config = recipe.build(cfg)  # seeded: every worker starts from the same weights
    module.train()
    params = list(module.parameters())
    opt, sched = _optimizer(module, cfg, 0)
    resets = set(recipe.phase_starts(cfg)[1:]) if recipe.reset_optimizer else set()
    rng = random.Random(cfg.seed)  # the same stream in every worker: the same batches
    history: list[dict[str, float]] = []
    running: dict[str, float] = {}
    t0 = time.time()
    for step in range(cfg.steps):
        if step in resets:  # a new stage starts with fresh optimizer state, as the official Coconut does
            opt, sched = _optimizer(module, cfg, step)
        problems = sample_problems(rng, cfg.batch_size, cfg, held_out=False)
        losses = recipe.losses(module, problems[rank::world], cfg, step)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        if world > 1:
            values = _average_over_workers(params, losses, world)
        else:
            values = {k: float(v.detach()) for k, v in losses.items()}
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for k, v in values.items():
            running[k] = running.get(k, 0.0) + v
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            n = (step % log_every) + 1
            entry = {
                "step": step + 1,
                "time_s": round(time.time() - t0, 1),
                **{k: round(v / n, 5) for k, v in running.items()},
            }
            history.append(entry)
            running = {}
            if verbose:
                print(json.dumps(entry), flush=True)
    train_time = time.time() - t0
    if rank != 0:
        return {}
    module.eval()
    recipe.save(module, hf_config, cfg, out_dir)
    log: dict[str, Any] = {
        "config": asdict(cfg),
        "train_time_s": round(train_time, 1),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    if evaluate:
        log["eval"] = evaluate_toy(out_dir, n=eval_n, teacher=not cfg.baseline, cfg=cfg)
    Path(out_dir, "train_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    return log


def _optimizer(module: nn.Module, cfg: ToyConfig, first_step: int) -> tuple[Any, Any]:
    """AdamW (no decay on vectors) and its schedule, starting at global step `first_step`."""
    decay = [p for n, p in module.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in module.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s + first_step, cfg))


def describe_training(log: dict[str, Any]) -> str:
    """One line about a `train_toy` log: steps, time, final loss and, if evaluated, held-out accuracy."""
    last = log["history"][-1] if log.get("history") else {}
    text = (
        f"{last.get('step', 0)} steps in {log.get('train_time_s', 0):.1f} s "
        f"({log.get('torch_threads', '?')} threads), final loss {last.get('total', float('nan')):.4f}"
    )
    ev = log.get("eval")
    if ev:
        text += f"; held-out accuracy {ev['accuracy']:.1%} on {ev['n']} problems"
        if "zero_latent" in ev:
            text += f" (zeroed latents {ev['zero_latent']:.1%}, another problem's latents {ev['other_latent']:.1%})"
    return text


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
class _ReplacePrj:
    """Forward hook on the feedback module (CODI's `prj`, Coconut's identity) replacing its k-th
    call's output with `latents[:, k:k+1]`."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        k = self.calls
        self.calls += 1
        return self.latents[:, k : k + 1, :].to(output.dtype).expand_as(output).clone()


def _accuracy(texts: list[str], problems: list[WordProblem], parse: Callable[[str], Any] | None = None) -> float:
    """Share of `texts` whose answer (read by `parse`, default CODI's) is the problem's."""
    from ..model.inference import extract_answer_number

    parse = parse or extract_answer_number
    right = sum(parse(t) == float(p.answer) for t, p in zip(texts, problems))
    return right / len(problems)


def teacher_generate(module: CODIModule, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Explicit-CoT greedy decoding after `question [bot]` (no latents); text after `[eot]`."""
    ids, mask = _pad([[BOS, *encode(q), BOT] for q in questions], left=True)
    done = torch.zeros(len(questions), dtype=torch.bool)
    gen: list[torch.Tensor] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            h = module.base(
                input_ids=ids, attention_mask=module.additive_mask(mask, ids.shape[1]), position_ids=pos
            ).last_hidden_state[:, -1]
            logits = module.lm.lm_head(h)
            logits[:, [PAD, BOT]] = -math.inf  # only text, eos and [eot] can follow
            nxt = torch.where(done, torch.full_like(done, PAD, dtype=torch.long), logits.argmax(-1))
            gen.append(nxt)
            done = done | (nxt == EOS)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, (~done | (nxt == EOS)).long()[:, None]], dim=1)
            if bool(done.all()):
                break
    texts = []
    for row in torch.stack(gen, dim=1).tolist():
        after = row[row.index(EOT) + 1 :] if EOT in row else []
        texts.append(decode(after))
    return texts


def evaluate_toy(
    model_dir: str | Path,
    n: int = 200,
    seed: int = 12345,
    batch_size: int = 100,
    teacher: bool = True,
    max_new_tokens: int = 24,
    cfg: ToyConfig | None = None,
) -> dict[str, Any]:
    """Held-out accuracy of a toy model with real CODI inference, and latent ablations.

    Problems come from `eval_problems(n, seed)` (chains never seen in training; the default seed
    differs from any training seed). Returns `accuracy` (greedy student), `zero_latent`
    (every latent input embedding replaced by zeros), `other_latent` (each problem run with the
    latents of the next problem in the set, whose answer differs), `teacher` (explicit CoT) and
    the per-problem completions. `cfg` (default: the model's `train_log.json`) sets the
    problem distribution.
    """
    from ..model.inference import generate
    from ..model.wrapper import load_model

    model = load_model(str(model_dir), dtype="float32", device="cpu")  # the folder's codi.json or coconut.json
    codi = model.codi
    parse = codi.method.parse_answer
    log_path = Path(model_dir, "train_log.json")
    if cfg is None:  # evaluate on the training distribution of this model
        saved = json.loads(log_path.read_text())["config"] if log_path.exists() else {}
        cfg = config_class(saved.get("method", "codi"))(**saved)
    problems = eval_problems(n, seed, cfg)
    questions = [p.question for p in problems]
    # "Other" problem: the next one with a different answer, so copying its latents is detectable.
    other = []
    for i, p in enumerate(problems):
        j = next(((i + d) % n for d in range(1, n) if problems[(i + d) % n].answer != p.answer), i)
        other.append(j)

    def run(qs: list[str], latents: torch.Tensor | None = None) -> list[str]:
        hook = None
        if latents is not None:
            hook = codi.feedback.register_forward_hook(_ReplacePrj(latents))
        try:
            return generate(model, qs, max_new_tokens=max_new_tokens)
        finally:
            if hook is not None:
                hook.remove()

    texts, zero, swapped = [], [], []
    K, d = codi.num_latent, codi.lm.config.hidden_size
    for start in range(0, n, batch_size):
        qs = questions[start : start + batch_size]
        texts += run(qs)
        if K:
            zero += run(qs, torch.zeros(len(qs), K, d))
            idx = other[start : start + batch_size]
            with torch.inference_mode():
                lat = codi(**model.prepare([questions[j] for j in idx]))["latents"]
            swapped += run(qs, lat)
    out: dict[str, Any] = {"n": n, "seed": seed, "num_latent": K, "accuracy": _accuracy(texts, problems, parse)}
    if K:
        out["zero_latent"] = _accuracy(zero, problems, parse)
        out["other_latent"] = _accuracy(swapped, problems, parse)
        out["other_latent_copies_other"] = _accuracy(swapped, [problems[j] for j in other], parse)
    if teacher and K and cfg.method == "codi":  # Coconut's final stage has no explicit-CoT mode
        t_texts = []
        for start in range(0, n, batch_size):
            t_texts += teacher_generate(codi, questions[start : start + batch_size])
        out["teacher"] = _accuracy(t_texts, problems)
    out["examples"] = [
        {"question": p.question, "answer": p.answer, "completion": t} for p, t in zip(problems[:5], texts[:5])
    ]
    return out
