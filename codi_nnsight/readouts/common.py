"""What every readout shares: the questions of a pairs file, their token layout and the step axis.

Readouts run every question of every pair (clean and corrupted) through the real CODI loop with
one prefill call (no shared prefixes), so decoder call 0 is the question (its last position is
`[bot]`), calls 1..K the latent tokens and call K+1 the suffix `[eot] The answer is:` (+ any
whitespace tokens before the number), whose last position is the answer position.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..errors import UserError
from .gold import gold_intermediates

__all__ = [
    "QuestionInfo",
    "ReadoutBatch",
    "batches",
    "question_infos",
    "step_labels",
    "value_first_token",
    "write_dataset",
]

VARIANTS = ("clean", "corrupted")


def step_labels(num_latent: int) -> list[str]:
    """The step coordinate: "bot", "0" … "K-1", "answer"."""
    return ["bot", *(str(k) for k in range(num_latent)), "answer"]


def value_first_token(model: Any, value: float) -> int:
    """First non-whitespace token of " <value>" after the answer prompt (-1 if it has none).

    The rule `patching.plan.answer_tokens` uses for answers (`patching.plan.value_first_token`,
    which the sweep's gold metric uses too), so lens ranks of intermediate values and of the
    answer are measured the same way ("-" for negative values).
    """
    from ..patching.plan import value_first_token as first_token

    return first_token(model, value)


@dataclass
class QuestionInfo:
    """One question of a pair, with the token layout the readouts need."""

    pair_index: int  # index into the pairs (not the pair id)
    variant: int  # 0 clean, 1 corrupted
    question: str
    answer: float
    ids: list[int]  # what the model is fed: [specials] question text tokens, bot ids
    suffix: tuple[int, ...]  # [eot] + answer prompt (+ whitespace tokens)
    answer_token: int
    gold: list[float]
    gold_tokens: list[int]
    n_special: int  # tokens the tokenizer puts before the text (BOS)
    n_text: int  # question text tokens
    n_bot: int  # [bot] (or [eos, bot])
    text_tokens: list[str] = field(default_factory=list)

    @property
    def text_positions(self) -> range:
        """Positions of the question text tokens within `ids`."""
        return range(self.n_special, self.n_special + self.n_text)


def question_infos(model: Any, pairs: Sequence[Any]) -> list[QuestionInfo]:
    """Clean then corrupted question of every pair, in pair order, with their token layout."""
    from ..patching.plan import answer_tokens

    # Questions past the context would run on positions the model never saw; text the tokenizer
    # would change is refused too (as `patch` and `evaluate` do), before any trace.
    model.check_fits(pairs, extra=model.num_latent + 16)
    model.check_text(pairs)
    tok = model.tokenizer
    out = []
    for i, pair in enumerate(pairs):
        for v, name in enumerate(VARIANTS):
            q = getattr(pair, name)
            text = model.normalize_question(q.question) + model.method.question_suffix
            ids = model.encode_question(q.question)
            plain = list(tok(text, add_special_tokens=False).input_ids)
            full = list(tok(text).input_ids)
            n_special = next((s for s in range(len(full) - len(plain) + 1) if full[s : s + len(plain)] == plain), 0)
            n_bot = len(model.codi.bot_ids())
            # Specials the tokenizer appends (rare) count with the bot marker tokens.
            n_bot += len(full) - n_special - len(plain)
            toks = answer_tokens(model, q.answer, q.answer)
            gold = [float(g) for g in gold_intermediates(q)]
            out.append(
                QuestionInfo(
                    i,
                    v,
                    q.question,
                    float(q.answer),
                    ids,
                    tuple(toks.suffix),
                    int(toks.clean[0]),
                    gold,
                    [value_first_token(model, g) for g in gold],
                    n_special,
                    len(plain),
                    n_bot,
                    [tok.decode([t]) for t in plain],
                )
            )
    return out


@dataclass
class ReadoutBatch:
    """One traced batch: its questions (indices into the info list) and forward inputs."""

    index: list[int]
    inputs: dict[str, Any]
    width: int  # padded prompt length T: latent k sits at key position T + k


def batches(model: Any, infos: Sequence[QuestionInfo], batch_size: int) -> Iterator[ReadoutBatch]:
    """Batches of questions that share one suffix (one forward call needs one suffix length)."""
    from ..model.wrapper import left_pad

    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: expected at least 1")
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, info in enumerate(infos):
        groups.setdefault(info.suffix, []).append(j)
    for suffix, members in groups.items():
        for s in range(0, len(members), batch_size):
            idx = members[s : s + batch_size]
            enc = left_pad([infos[j].ids for j in idx], model.codi.pad_id)
            yield ReadoutBatch(idx, {**enc, "suffix_ids": torch.tensor(suffix)}, enc["input_ids"].shape[1])


def padded(
    rows: Sequence[Sequence[float]], width: int | None = None, fill: float = math.nan, dtype: Any = np.float64
) -> np.ndarray:
    """Rows of unequal length as one array, right-padded with `fill`."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def to_pair_variant(flat: np.ndarray, infos: Sequence[QuestionInfo], n_pairs: int) -> np.ndarray:
    """(questions, ...) in info order -> (pair, variant, ...)."""
    out = np.empty((n_pairs, 2) + flat.shape[1:], dtype=flat.dtype)
    for j, info in enumerate(infos):
        out[info.pair_index, info.variant] = flat[j]
    return out


def base_coords(
    model: Any, pairs: Sequence[Any], infos: Sequence[QuestionInfo], taken: Collection[str] = ()
) -> dict[str, Any]:
    """Coordinates every readout Dataset has: pair (+ pair metadata), variant, step, layer.

    ``taken``: the Dataset's variable names and any coordinate added later; a pair metadata field
    of such a name (a pairs file with a numeric ``top_ids``) gets a ``meta_`` prefix instead of
    clashing with it.
    """
    from ..data.pairs import pair_coordinates

    K = model.num_latent
    n_gold = max((len(i.gold) for i in infos), default=0)
    coords: dict[str, Any] = {
        "pair": np.array([p.pair_id for p in pairs], dtype=np.int64),
        "variant": np.array(VARIANTS, dtype=object),
        "step": (
            "step",
            np.array(step_labels(K), dtype=object),
            {
                "long_name": "position read: bot = last question position ([bot]), 0..K-1 = latent token k, "
                "answer = last position of the answer prompt"
            },
        ),
        "layer": ("layer", np.arange(model.n_layers, dtype=np.int64), {"long_name": "decoder block (its output)"}),
        "intermediate": (
            "intermediate",
            np.arange(n_gold, dtype=np.int64),
            {"long_name": "reasoning step whose result is the gold intermediate value"},
        ),
    }
    reserved = set(coords) | {"gold_value", "gold_token", "answer_token"} | set(taken)
    coords.update(pair_coordinates(pairs, reserved=reserved))
    return coords


def gold_variables(infos: Sequence[QuestionInfo], n_pairs: int) -> dict[str, Any]:
    """Per-question gold values and their first tokens: (pair, variant, intermediate)."""
    n_gold = max((len(i.gold) for i in infos), default=0)
    values = to_pair_variant(padded([i.gold for i in infos], n_gold), infos, n_pairs)
    tokens = to_pair_variant(padded([i.gold_tokens for i in infos], n_gold, fill=-1, dtype=np.int64), infos, n_pairs)
    answer = to_pair_variant(np.array([i.answer_token for i in infos], dtype=np.int64), infos, n_pairs)
    return {
        "gold_value": (
            ("pair", "variant", "intermediate"),
            values,
            {"long_name": "gold intermediate value (result of each reasoning step; NaN: unknown)", "units": "value"},
        ),
        "gold_token": (
            ("pair", "variant", "intermediate"),
            tokens,
            {
                "long_name": "first non-whitespace token of ' <gold value>' after the answer prompt (-1: none)",
                "units": "token id",
            },
        ),
        "answer_token": (
            ("pair", "variant"),
            answer,
            {"long_name": "first non-whitespace token of the question's true answer", "units": "token id"},
        ),
    }


def provenance(model: Any, pairs: Any, schema: str, run: Any = None, **extra: Any) -> dict[str, Any]:
    """Attrs every readout Dataset carries (netCDF-safe types only).

    With `run` (the command's `codi_nnsight.run.Run`), its provenance is added: what computed the
    numbers (`computed_on`, the server's dtype and weights, `remote`, versions, command).
    """
    import codi_nnsight

    attrs = {
        "codi_nnsight_schema": schema,
        "model": model.name,
        "family": model.family.name,
        "num_latent": int(model.num_latent),
        "n_layers": int(model.n_layers),
        "dtype": str(model.dtype),
        "question_normalization": model.question_normalization,
        "package_version": getattr(codi_nnsight, "__version__", "unknown"),
        "pairs_source": str(getattr(pairs, "source", None) or ""),
        "pairs_sha256": str(getattr(pairs, "sha256", "") or ""),
    }
    if run is not None:
        attrs.update(run.provenance())
    for k, v in extra.items():
        attrs[k] = int(v) if isinstance(v, bool) else ("" if v is None else v)
    return attrs


def write_dataset(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write `ds` as netCDF atomically: the run layer's one writer (`codi_nnsight.run.write_results`)."""
    from ..run import write_results

    return write_results(ds, path)
