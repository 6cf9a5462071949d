"""The toy Coconut: the toy CODI's problems, tokenizer and size, trained with Coconut's own recipe.

Coconut (Hao et al. 2024, arXiv 2412.06769; `facebookresearch/coconut`, `dataset.py` and `run.py`)
learns its thoughts by a stage curriculum rather than by distillation:

* a sequence is ``<s>question\\n <|start-latent|> [latent] x n <|end-latent|> steps[s:] ### answer</s>``,
  each step written ``step\\n``;
* stage 0 is the plain chain of thought (``n = 0``: the markers, then every step); stage
  ``s <= max_latent_stage`` replaces the first ``s`` steps by ``s * c_thought`` thoughts; the final
  stage drops every step and runs ``max_latent_stage * c_thought`` thoughts (the official
  ``pad_latent_to_max``), which is what inference runs;
* thought k is the final-norm state at the position before latent slot k, fed back unchanged as
  that slot's input embedding; gradients flow through the whole loop;
* the loss is the cross-entropy of the tokens after ``<|end-latent|>`` (remaining steps and the
  answer); the question, markers and latent slots carry none;
* each stage starts with a fresh optimizer (the official ``reset_optimizer``).

Toy-scale departures, stated: a warmup-and-cosine schedule per stage instead of the official
constant rate (the toy's rate is 20x the official 1e-4), steps per stage instead of epochs, and
the data-parallel worker processes of the toy CODI. No auxiliary loss is added: the thoughts are
shaped by the curriculum alone.

``train_toy(out, method="coconut")`` writes Meta's checkpoint format (``ckpt/checkpoint_<K>``:
``base_causallm.*`` and the embedding again) with a ``coconut.json``, as the official code saves
and `codi_nnsight.model.load_model` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.synthetic import WordProblem
from ..methods.coconut import ANSWER_DELIMITER, COCONUT, QUESTION_SUFFIX
from ..model.module import CODIModule
from .train import BASE_VOCAB, BOS, EOS, Recipe, ToyConfig, _base, _ce, _pad, encode, toy_lm, toy_tokenizer

#: Ids of the three added tokens in the official order (`<|start-latent|>`, `<|end-latent|>`, `<|latent|>`).
START, END, LATENT = BASE_VOCAB, BASE_VOCAB + 1, BASE_VOCAB + 2


@dataclass
class CoconutToyConfig(ToyConfig):
    """Hyper-parameters of a toy Coconut run (defaults: the shipped `toy-coconut`).

    The shape, data and optimizer fields are the toy CODI's (`ToyConfig`); its distillation
    fields are unused. `stage_steps[s]` is the number of steps of stage s (0: plain chain of
    thought; 1..`max_latent_stage`: s steps replaced by s * `c_thought` thoughts; the last: every
    step replaced, `max_latent_stage * c_thought` thoughts). `steps` is their sum unless a shorter
    run is asked for.
    """

    method: str = "coconut"
    c_thought: int = 1
    max_latent_stage: int = 6
    stage_steps: tuple[int, ...] = (800, 500, 500, 500, 500, 500, 500, 1700)
    lr: float = 2e-3
    steps: int = -1  # -1: sum(stage_steps)

    def __post_init__(self) -> None:
        self.stage_steps = tuple(int(n) for n in self.stage_steps)  # a json list when read back
        if len(self.stage_steps) != self.max_latent_stage + 2:
            raise ValueError(
                f"stage_steps has {len(self.stage_steps)} entries; stages 0..{self.max_latent_stage} "
                f"and the final one need {self.max_latent_stage + 2}"
            )
        if self.steps < 0:
            self.steps = sum(self.stage_steps)
        self.num_latent = self.max_latent_stage * self.c_thought


def stage_starts(cfg: CoconutToyConfig) -> list[int]:
    """The first step of every stage."""
    starts, at = [], 0
    for n in cfg.stage_steps:
        starts.append(at)
        at += n
    return starts


def stage_at(cfg: CoconutToyConfig, step: int) -> int:
    """The stage training step `step` belongs to (steps past the schedule stay in the last)."""
    return max(i for i, s in enumerate(stage_starts(cfg)) if s <= step)


def stage_plan(cfg: CoconutToyConfig, stage: int) -> tuple[int, int]:
    """(thoughts, steps replaced) of `stage`; the final stage replaces every step (a large count)."""
    if stage > cfg.max_latent_stage:
        return cfg.max_latent_stage * cfg.c_thought, 10_000
    return stage * cfg.c_thought, stage


def make_coconut_batch(problems: list[WordProblem], n_skip: int) -> dict[str, torch.Tensor]:
    """Tensors of one batch: the left-padded prefix up to `<|start-latent|>` and the right-padded
    suffix from `<|end-latent|>`, with its next-token labels (-100: no loss)."""
    prefix = [[BOS, *encode(p.question + QUESTION_SUFFIX), START] for p in problems]
    suffix = []
    for p in problems:
        steps = [t for step in p.steps[n_skip:] for t in encode(step + "\n")]
        suffix.append([END, *steps, *encode(f"{ANSWER_DELIMITER} {p.answer}"), EOS])
    p_ids, p_mask = _pad(prefix, left=True)
    s_ids, s_mask = _pad(suffix, left=False)
    s_labels = torch.full_like(s_ids, -100)
    s_labels[:, :-1] = torch.where(s_mask[:, 1:].bool(), s_ids[:, 1:], -100)
    return {"p_ids": p_ids, "p_mask": p_mask, "s_ids": s_ids, "s_mask": s_mask, "s_labels": s_labels}


def coconut_logits(module: CODIModule, batch: dict[str, torch.Tensor], n_latent: int) -> torch.Tensor:
    """Logits at every suffix position of `batch` after `n_latent` thoughts (the loop runs with
    gradients: thought k is the final-norm state before slot k, fed back unchanged)."""
    from transformers import DynamicCache

    mask = batch["p_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    last = _base(module, mask, pos, cache, input_ids=batch["p_ids"]).last_hidden_state[:, -1:]
    next_pos = pos[:, -1:] + 1
    ones = torch.ones_like(mask[:, :1])
    for _ in range(n_latent):
        mask = torch.cat([mask, ones], dim=1)
        last = _base(module, mask, next_pos, cache, inputs_embeds=module.feedback(last)).last_hidden_state
        next_pos = next_pos + 1
    s_ids = batch["s_ids"]
    mask = torch.cat([mask, batch["s_mask"]], dim=1)
    spos = next_pos + torch.arange(s_ids.shape[1])
    out = _base(module, mask, spos, cache, inputs_embeds=module.embed(s_ids))
    return module.lm.lm_head(out.last_hidden_state)


def coconut_losses(
    module: CODIModule, problems: list[WordProblem], cfg: CoconutToyConfig, step: int
) -> dict[str, torch.Tensor]:
    """The stage's cross-entropy for one share of a batch."""
    stage = stage_at(cfg, step)
    n_latent, n_skip = stage_plan(cfg, stage)
    batch = make_coconut_batch(problems, n_skip)
    ce = _ce(coconut_logits(module, batch, n_latent), batch["s_labels"])
    return {"ce": ce, "stage": ce.new_tensor(float(stage)), "total": ce}


def build_coconut_toy(cfg: CoconutToyConfig) -> tuple[CODIModule, Any]:
    """A freshly initialized toy Coconut (the toy CODI's Llama, three added ids, no projection)
    and the HF config of its base (the vocabulary without the added tokens)."""
    lm, hf_config = toy_lm(cfg, len(COCONUT.added_tokens))
    module = CODIModule(
        lm,
        nn.Identity(),
        num_latent=cfg.num_latent,
        vocab_size=BASE_VOCAB,
        eos_token_id=EOS,
        remove_eos=True,
        method=COCONUT,
    )
    return module, hf_config


def save_coconut_toy(module: CODIModule, hf_config: Any, cfg: CoconutToyConfig, out_dir: Any) -> Path:
    """Write Meta's layout: `coconut.json`, `base/` (config and tokenizer without the added
    tokens, which the loader adds) and `ckpt/checkpoint_<K>`. Returns the json's path."""
    from ..model.coconut_checkpoint import CoconutConfig
    from ..testing.tiny_coconut import meta_state_dict

    out = Path(out_dir)
    (out / "base").mkdir(parents=True, exist_ok=True)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out / "base")
    toy_tokenizer().save_pretrained(out / "base")
    ckpt = Path("ckpt") / f"checkpoint_{module.num_latent}"
    torch.save(meta_state_dict(module.lm), out / ckpt)
    CoconutConfig(base="base", checkpoint=str(ckpt), num_latent=module.num_latent, name="toy-coconut").save(
        out / "coconut.json"
    )
    return out / "coconut.json"


COCONUT_RECIPE = Recipe(
    name="coconut",
    config=CoconutToyConfig,
    build=build_coconut_toy,
    losses=coconut_losses,
    phase_starts=stage_starts,
    save=save_coconut_toy,
    reset_optimizer=True,
)
