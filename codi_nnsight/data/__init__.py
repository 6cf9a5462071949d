"""Pairs: clean/corrupted question pairs, their files, and the generators that make them.

`pairs` loads and validates pairs files; `gsm8k` makes pairs from GSM8K by changing one number;
`synthetic` generates arithmetic word problems (including the bundled toy model's distribution).
"""

from .pairs import (
    Pair,
    PairSet,
    PairsFileProblem,
    Question,
    load_pairs,
    pair_coordinates,
    pair_warnings,
    validate_pairs,
)

__all__ = [
    "Pair",
    "PairSet",
    "PairsFileProblem",
    "Question",
    "load_pairs",
    "pair_coordinates",
    "pair_warnings",
    "validate_pairs",
]
