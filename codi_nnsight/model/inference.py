"""Greedy CODI inference and accuracy, run as nnsight traces (local or remote)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .answers import extract_answer_number, format_answer
from .remote import remote_errors, trace_kwargs
from .wrapper import CODIModel

# The answer helpers live in `answers` (the wrapper needs them too); re-exported here, where they were.
__all__ = [
    "accuracy_summary",
    "decode",
    "evaluate_pairs",
    "extract_answer_number",
    "format_answer",
    "generate",
    "generate_batched",
]


def decode(model: CODIModel, ids: Iterable[int]) -> str:
    """Decode generated ids (stopping at -1 padding; the method's added tokens, ids >= V, dropped)."""
    # Not `< pad_id`: Coconut pads with eos, which need not be the last base id (Llama-2's is 2).
    keep = [int(i) for i in ids if 0 <= int(i) < model.codi.vocab_size]
    return model.tokenizer.decode(keep, skip_special_tokens=True)


def generate(model: CODIModel, questions: list[str], max_new_tokens: int = 64, remote: bool | str = False) -> list[str]:
    """Greedy completions after `[eot]` for a batch of questions, in one trace."""
    inputs = model.prepare(questions, max_new_tokens=max_new_tokens)
    with remote_errors(remote), model.trace(**inputs, **trace_kwargs(remote)):
        generated = model.output["generated"].save()
    return [decode(model, row) for row in torch.as_tensor(generated).cpu().tolist()]


def generate_batched(
    model: CODIModel,
    questions: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    remote: bool | str = False,
    desc: str = "evaluate",
) -> list[str]:
    """:func:`generate` over `questions` in chunks of `batch_size` (one trace each), in order.

    The one decode loop every evaluation uses (pairs and the GSM8K protocol): the answers do not
    depend on `batch_size` (rows are left-padded and masked), only the speed does.
    """
    texts: list[str] = []
    bar = _progress(len(questions), desc, progress)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        texts.extend(generate(model, chunk, max_new_tokens, remote=remote))
        bar.update(len(chunk))
    bar.close()
    return texts


@dataclass
class Answer:
    """One evaluated question."""

    pair_id: int
    variant: str
    question: str
    answer: float
    completion: str
    predicted: float | None

    @property
    def correct(self) -> bool:
        """Whether the parsed prediction equals the true answer."""
        return self.predicted is not None and self.predicted == self.answer

    def to_record(self) -> dict[str, Any]:
        """The `--out` json record."""
        return {
            "pair_id": self.pair_id,
            "variant": self.variant,
            "question": self.question,
            "answer": self.answer,
            "completion": self.completion,
            "predicted": self.predicted,
            "correct": self.correct,
        }


def evaluate_pairs(
    model: CODIModel,
    pairs: Any,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    remote: bool | str = False,
) -> list[Answer]:
    """Greedy answers for the clean and corrupted variant of every pair."""
    model.check_fits(pairs, extra=model.num_latent + len(model.codi.eot_ids()) + max_new_tokens)
    items = [(p.pair_id, v, getattr(p, v)) for p in pairs for v in ("clean", "corrupted")]
    texts = generate_batched(
        model, [q.question for _, _, q in items], max_new_tokens, batch_size, progress=progress, remote=remote
    )
    return [
        Answer(pid, variant, q.question, float(q.answer), text, model.method.parse_answer(text))
        for (pid, variant, q), text in zip(items, texts)
    ]


def accuracy_summary(answers: list[Answer]) -> dict[str, float]:
    """Accuracy per variant and for pairs with both variants right."""
    out: dict[str, float] = {}
    for variant in ("clean", "corrupted"):
        sel = [a for a in answers if a.variant == variant]
        out[variant] = sum(a.correct for a in sel) / len(sel) if sel else float("nan")
    by_pair: dict[int, list[bool]] = {}
    for a in answers:
        by_pair.setdefault(a.pair_id, []).append(a.correct)
    out["both"] = (sum(all(v) for v in by_pair.values()) / len(by_pair)) if by_pair else float("nan")
    return out


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def filter_pairs(
    model: CODIModel,
    pairs: Any,
    require_different: bool = True,
    max_new_tokens: int = 32,
    progress: bool = False,
    remote: bool | str = False,
) -> tuple[Any, dict[str, int]]:
    """Pairs the model answers correctly in both variants (meta `baseline_correct` added to each question).

    Returns (the kept `PairSet`, counts of why pairs were dropped). With `require_different`, pairs
    whose clean and corrupted answers are equal are dropped too: they have no flip to measure.
    """
    from ..data.pairs import Pair, PairSet, Question

    answers = evaluate_pairs(model, pairs, max_new_tokens=max_new_tokens, progress=progress, remote=remote)
    by = {(a.pair_id, a.variant): a.correct for a in answers}
    kept, dropped = [], {"clean wrong": 0, "corrupted wrong": 0, "answers equal": 0}
    for p in pairs:
        ok = True
        for variant in ("clean", "corrupted"):
            if not by[(p.pair_id, variant)]:
                dropped[f"{variant} wrong"] += 1
                ok = False
        if require_different and p.clean.answer == p.corrupted.answer:
            dropped["answers equal"] += 1
            ok = False
        if ok:
            kept.append(
                Pair(
                    p.pair_id,
                    *(
                        Question(q.question, q.answer, {**q.meta, "baseline_correct": True})
                        for q in (p.clean, p.corrupted)
                    ),
                )
            )
    return PairSet.from_pairs(kept), dropped


def check_pairs_with_model(model: CODIModel, pairs: Any, max_new_tokens: int = 32) -> list[str]:
    """Lines about how a model sees a pairs file: token lengths and how many it answers correctly."""
    diffs = [
        len(model.encode_question(p.clean.question)) - len(model.encode_question(p.corrupted.question)) for p in pairs
    ]
    answers = evaluate_pairs(model, pairs, max_new_tokens=max_new_tokens)
    by = {(a.pair_id, a.variant): a.correct for a in answers}
    clean = sum(by[(p.pair_id, "clean")] for p in pairs)
    corrupted = sum(by[(p.pair_id, "corrupted")] for p in pairs)
    both = sum(by[(p.pair_id, "clean")] and by[(p.pair_id, "corrupted")] for p in pairs)
    return [
        f"token length clean - corrupted: equal for {sum(d == 0 for d in diffs)}/{len(diffs)} pairs, "
        f"range {min(diffs)}..{max(diffs)}",
        f"model {model.name} answers correctly: clean {clean}/{len(pairs)}, corrupted {corrupted}/{len(pairs)}, "
        f"both {both}",
    ]
