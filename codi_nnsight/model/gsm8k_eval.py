"""GSM8K test accuracy measured the way the official CODI code measures it.

The protocol is the one of ``test.py`` in the official repository, zhenyi4/codi (read at commit
4fd88d4b76f7f7a4d912c07cfd4796ee9e0a0339, with ``scripts/test_gpt2.sh`` / ``test_llama1b.sh`` for
its settings). Reimplemented here from that reading, not copied:

* **Questions**: each question is stripped and every double space becomes one space before
  tokenizing. That is the model's ``question_normalization="official"`` (the default); another
  normalization is reported as a deviation from the protocol.
* **Gold answer** (:func:`parse_gold`): the text after the last ``####`` (or the whole answer when
  there is none), with every comma removed, read as a float. Where that fails the official code
  stores ``inf``. Here such a record is refused by name instead: it could never be scored
  correctly (and ``inf == inf`` would score it *right* whenever the model writes no number).
* **Prediction** (:func:`official_answer`): commas are removed from the generated text, every
  match of ``-?\\d+\\.?\\d*`` is collected, and the **last** one is read as a float. There is no
  "The answer is" anchoring for GSM8K. With no number the official code predicts ``inf``; here
  that is ``None``, which is equally never correct against a finite gold answer.
  This is :func:`codi_nnsight.model.answers.extract_answer_number`, the CODI method's
  ``parse_answer``. Other methods parse differently (Coconut's ``parse_answer`` reads the text
  after the last ``#``). This protocol always uses the CODI rule, whatever the method, because
  the figure it reproduces is CODI's.
* **Correctness** (:func:`is_correct`): float equality, so ``18.0`` equals ``18`` and ``18.5``
  does not.
* **Decoding**: greedy (``--greedy True`` in both scripts), at most 256 new tokens, stopping a row
  at eos. The thoughts are ``inf_latent_iterations`` = 6 (the checkpoints' ``num_latent``), and
  ``remove_eos`` is true (question, ``[bot]``, thoughts, ``[eot]``). Argmax runs over the ids
  below the last one, and the text is decoded with special tokens skipped. All of this is what
  :meth:`CODIModule._greedy` and :func:`codi_nnsight.model.inference.generate` already do, so the
  protocol reuses that loop (:func:`~codi_nnsight.model.inference.generate_batched`).
* **Batches**: the official scripts run 128 left-padded questions at a time. They pass the
  attention mask only on the question pass, so later steps attend to the pad positions, and an
  answer can depend a little on its batch. Here every step masks the padding, so the answers do
  not depend on ``batch_size``: they are the official code's answers at batch size 1. A real
  checkpoint can therefore land a fraction of a point from the published figure; the published
  figure is still the one to compare against.

The paper's figures (Shen et al. 2025, arXiv 2502.21074, Table 1, GSM8K test):
:data:`PAPER_ACCURACY`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .answers import extract_answer_number

if TYPE_CHECKING:  # pragma: no cover
    from .wrapper import CODIModel

__all__ = [
    "OFFICIAL_MAX_NEW_TOKENS",
    "OFFICIAL_SOURCE",
    "PAPER_ACCURACY",
    "PROTOCOL",
    "GSM8KAnswer",
    "GSM8KItem",
    "GSM8KResult",
    "evaluate_gsm8k",
    "is_correct",
    "load_gsm8k_items",
    "official_answer",
    "parse_gold",
    "source_label",
]

#: The protocol's name, printed with every figure and stored in `--out`.
PROTOCOL = "codi-official-gsm8k"
#: Where the protocol comes from.
OFFICIAL_SOURCE = "zhenyi4/codi test.py @ 4fd88d4"
#: `max_new_tokens` of the official test script.
OFFICIAL_MAX_NEW_TOKENS = 256
#: Accuracies (%) on the GSM8K test set (1319 questions) in the CODI paper, Table 1.
PAPER_ACCURACY = {"CODI GPT-2": 43.7, "CODI Llama-3.2-1B": 55.6}


def official_answer(text: str) -> float | None:
    """The model's answer as the official CODI test reads it: the last number in `text`.

    Commas go first (so "1,234" is 1234). Then the last match of ``-?\\d+\\.?\\d*`` is taken, which
    makes "5-3" read as -3 and "18." as 18.0. It returns None where the text holds no number (the
    official code uses ``inf``: never equal to a finite gold answer either). This is the CODI
    method's ``parse_answer`` (:func:`~codi_nnsight.model.answers.extract_answer_number`); it is
    named here so the protocol does not change with the model's method.
    """
    return extract_answer_number(text)


def is_correct(predicted: float | None, gold: float) -> bool:
    """The official correctness test: the parsed prediction equals the gold answer as floats."""
    return predicted is not None and predicted == gold


def parse_gold(answer: Any) -> float:
    """The gold number of a GSM8K ``answer`` field, as the official code reads it.

    That is the text after the last ``####`` (or all of it when there is none), commas removed,
    read with ``float``. A JSON number is taken as is.

    Raises:
        ValueError: with the reason, where the official code would store ``inf`` (or crash).
    """
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"expected text like '... #### 18', got {_json_type(answer)}")
    if isinstance(answer, str):
        tail = answer.split("####")[-1]
        try:
            value = float(tail.replace(",", ""))
        except ValueError:
            where = "after '####'" if "####" in answer else "(no '####' in the answer)"
            raise ValueError(f"no number {where}: {_short(tail.strip() or answer)}") from None
    else:
        try:
            value = float(answer)
        except OverflowError:
            raise ValueError(f"not a finite number: {answer}") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {_short(str(answer).split('####')[-1].strip())}")
    return value


@dataclass(frozen=True)
class GSM8KItem:
    """One test question: its text as written, its gold number and where it came from."""

    question: str
    gold: float
    #: "line 3" of a JSON Lines file, "record 3" of a JSON list or of the hub split (1-based).
    where: str


@dataclass(frozen=True)
class GSM8KAnswer:
    """One evaluated question."""

    item: GSM8KItem
    generated: str
    predicted: float | None

    @property
    def correct(self) -> bool:
        """Whether the prediction equals the gold answer (:func:`is_correct`)."""
        return is_correct(self.predicted, self.item.gold)

    def to_record(self) -> dict[str, Any]:
        """The per-question record of `--out`."""
        return {
            "where": self.item.where,
            "question": self.item.question,
            "gold": self.item.gold,
            "generated": self.generated,
            "predicted": self.predicted,
            "correct": self.correct,
        }


@dataclass
class GSM8KResult:
    """Accuracy of a model under the protocol, with every answer and the settings used."""

    model: str
    source: str
    answers: list[GSM8KAnswer]
    settings: dict[str, Any] = field(default_factory=dict)
    #: Each way this run differs from the official settings (empty: the protocol as published).
    deviations: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Questions scored."""
        return len(self.answers)

    @property
    def n_correct(self) -> int:
        """Questions answered correctly."""
        return sum(a.correct for a in self.answers)

    @property
    def accuracy(self) -> float:
        """Fraction correct (NaN with no questions)."""
        return self.n_correct / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        """Exact (Clopper–Pearson) 95% interval of the accuracy."""
        from ..analysis.stats import binomial_ci

        return binomial_ci(self.n_correct, self.n, 0.95)

    def summary(self) -> str:
        """One line: accuracy with its exact interval, n, the protocol and any deviation from it."""
        lo, hi = self.ci95
        line = (
            f"model {self.model}: GSM8K accuracy {self.accuracy:.1%} (95% CI {lo:.1%}–{hi:.1%}, exact binomial), "
            f"{self.n_correct}/{self.n} correct, n={self.n} — protocol {PROTOCOL} ({OFFICIAL_SOURCE}: greedy, "
            f"{self.settings.get('num_latent')} latents, at most {self.settings.get('max_new_tokens')} new "
            "tokens, last number in the text)"
        )
        return line + (f"; deviates: {'; '.join(self.deviations)}" if self.deviations else "")

    def to_json(self) -> dict[str, Any]:
        """The `--out` document: the summary figures, the settings and one record per question."""
        lo, hi = self.ci95
        return {
            "protocol": PROTOCOL,
            "official_source": OFFICIAL_SOURCE,
            "deviations": list(self.deviations),
            "model": self.model,
            "source": self.source,
            "settings": dict(self.settings),
            "n": self.n,
            "correct": self.n_correct,
            "accuracy": self.accuracy if self.n else None,
            "ci95": [lo, hi] if self.n else None,
            "paper_accuracy_percent": dict(PAPER_ACCURACY),
            "records": [a.to_record() for a in self.answers],
        }


def load_gsm8k_items(source: str | Path, limit: int | None = None) -> list[GSM8KItem]:
    """The first `limit` test questions of a local GSM8K-format file, or of the hub test split.

    `source` is a JSON Lines file of ``{"question": ..., "answer": "... #### 18"}`` records (a
    JSON list works too), or ``"hub"`` for the ``openai/gsm8k`` ``main`` test split (the optional
    ``datasets`` package, ``pip install -e ".[gsm8k]"``). Records past `limit` are not read.

    Raises:
        UserError: one line naming the file, the record (line number) and the field, for the
            first unusable record; or the file problem; or the missing ``datasets`` package.
    """
    from ..data.gsm8k import load_gsm8k_hub, read_gsm8k

    label = source_label(source)
    if str(source) == "hub":
        records = load_gsm8k_hub("test")
        where = [f"record {i}" for i in range(1, len(records) + 1)]
    else:
        records = read_gsm8k(source)  # the file-level errors (missing, not JSON, ...) in one line
        where = _record_locations(Path(source), len(records))
    if limit is not None:
        records = records[:limit]
    if not records:
        raise UserError(f"{label}: no GSM8K records")
    return [_item(record, label, loc) for record, loc in zip(records, where)]


def source_label(source: str | Path) -> str:
    """How messages and `--out` name a `source` of :func:`load_gsm8k_items`."""
    return "GSM8K hub test split" if str(source) == "hub" else str(source)


def evaluate_gsm8k(
    model: CODIModel,
    items: Sequence[GSM8KItem],
    max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS,
    batch_size: int = 16,
    progress: bool = False,
    remote: bool | str = False,
    source: str = "",
) -> GSM8KResult:
    """Greedy answers to `items` through the package's decode loop, scored by the official rule.

    Raises:
        UserError: a question that with the thoughts and `max_new_tokens` exceeds the model's
            context, naming its record (checked before any generation).
    """
    from .inference import generate_batched

    items = list(items)
    _check_context(model, items, max_new_tokens, source)
    texts = generate_batched(
        model, [it.question for it in items], max_new_tokens, batch_size, progress=progress, remote=remote, desc="GSM8K"
    )
    answers = [GSM8KAnswer(it, text, official_answer(text)) for it, text in zip(items, texts)]
    deviations = []
    if model.question_normalization != "official":
        deviations.append(f"question normalization {model.question_normalization!r} (official: strip, '  '→' ')")
    if max_new_tokens != OFFICIAL_MAX_NEW_TOKENS:
        deviations.append(f"max_new_tokens {max_new_tokens} (official {OFFICIAL_MAX_NEW_TOKENS})")
    settings = {
        "num_latent": model.num_latent,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "question_normalization": model.question_normalization,
        "dtype": str(model.dtype).removeprefix("torch."),
        "decoding": "greedy",
    }
    return GSM8KResult(model.name, source, answers, settings, deviations)


# -- helpers ----------------------------------------------------------------------------------
def _item(record: Any, label: str, where: str) -> GSM8KItem:
    def bad(fieldname: str, why: str) -> UserError:
        return UserError(f"{label}: {where}: field '{fieldname}': {why}")

    if not isinstance(record, dict):  # read_gsm8k guarantees objects; kept for hub rows
        raise UserError(f"{label}: {where}: expected an object with 'question' and 'answer'")
    if "question" not in record:
        raise bad("question", "missing")
    question = record["question"]
    if not isinstance(question, str):
        raise bad("question", f"expected text, got {_json_type(question)}")
    if not question.strip():
        raise bad("question", "empty")
    if "\x00" in question:
        raise bad("question", f"contains a NUL character at character {question.index(chr(0))}")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a JSON escape: no tokenizer takes it
        raise bad("question", f"not valid Unicode (lone surrogate at character {e.start})") from None
    if "answer" not in record:
        raise bad("answer", "missing")
    try:
        gold = parse_gold(record["answer"])
    except ValueError as e:
        raise bad("answer", str(e)) from None
    return GSM8KItem(question, gold, where)


def _record_locations(path: Path, n: int) -> list[str]:
    """Where each of the `n` records of `path` is: its line in JSON Lines, its index in a JSON list."""
    text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    lines = [i for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    try:
        whole = json.loads(text)
    except ValueError:  # JSON Lines: read_gsm8k kept the non-blank lines, in order
        return [f"line {i}" for i in lines[:n]]
    if isinstance(whole, dict):  # one object (a one-line JSON Lines file): where it starts
        return [f"line {lines[0]}"]
    return [f"record {i}" for i in range(1, n + 1)]


def _check_context(model: CODIModel, items: list[GSM8KItem], max_new_tokens: int, source: str) -> None:
    limit = model.context_length
    if not limit:
        return
    extra = model.num_latent + len(model.codi.eot_ids()) + max_new_tokens
    if extra >= limit:
        raise UserError(
            f"--max-new-tokens {max_new_tokens} with {model.num_latent} latents exceeds the model's context "
            f"of {limit}; pass a smaller --max-new-tokens"
        )
    for it in items:
        n = len(model.encode_question(it.question))
        if n + extra > limit:
            raise UserError(
                f"{source}: {it.where}: field 'question': {n} tokens; with {model.num_latent} latents and "
                f"--max-new-tokens {max_new_tokens} it exceeds the model's context of {limit}; "
                "pass a smaller --max-new-tokens"
            )


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__
    )


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 1] + "…")
