"""Edges of the pairs data: warnings for pairs that cannot measure a flip, the one pair -> coordinates
builder, GSM8K files given where a pairs file is expected, and the renamed classes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from codi_nnsight.data import pairs as pairs_mod
from codi_nnsight.data import synthetic
from codi_nnsight.data.pairs import (
    Pair,
    PairsError,
    PairSet,
    PairsFileProblem,
    Question,
    load_pairs,
    pair_coordinates,
    pair_warnings,
    validate_pairs,
)


def rec(pid: int, variant: str, question: str, answer: Any, **meta: Any) -> dict[str, Any]:
    return {"pair_id": pid, "variant": variant, "question": question, "answer": answer, **meta}


def write(tmp_path: Path, content: Any, name: str = "pairs.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def q(text: str, answer: float, **meta: Any) -> Question:
    return Question(text, answer, meta)


# ------------------------------------------------------------------------------------------
# 1. pairs that cannot measure a flip
# ------------------------------------------------------------------------------------------


def test_pair_warnings_flat_file_names_both_records(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            rec(3, "clean", "Tom has 3 pens?", 3),
            rec(5, "clean", "Ann has 2 pens?", 2),
            rec(5, "corrupted", "Ann has 5 pens?", 2),  # equal answers
            rec(9, "corrupted", "Sam has 6 pens?", 18),
            rec(3, "corrupted", "Tom has 4 pens?", 4),  # fine
            rec(9, "clean", "Sam has 9 pens?", 18),  # equal answers, corrupted record first
        ],
    )
    equal = "clean and corrupted answers are equal"
    assert pair_warnings(load_pairs(path)) == [
        f"{path}: records 1 and 2 (pair_id 5): {equal} (2), so a flip cannot be measured",
        f"{path}: records 5 and 3 (pair_id 9): {equal} (18), so a flip cannot be measured",
    ]


def test_pair_warnings_nested_file_and_subsets(tmp_path: Path) -> None:
    data = [
        {"pair_id": 0, "clean": {"question": "a?", "answer": 1}, "corrupted": {"question": "b?", "answer": 2}},
        {"pair_id": 4, "clean": {"question": "c?", "answer": 2.5}, "corrupted": {"question": "d?", "answer": "2.5"}},
    ]
    path = write(tmp_path, "".join(json.dumps(r) + "\n" for r in data), "p.jsonl")
    ps = load_pairs(path)
    expected = [
        f"{path}: record 1 (pair_id 4): clean and corrupted answers are equal (2.5), so a flip cannot be measured"
    ]
    assert pair_warnings(ps) == expected
    # Subsets keep pointing at the records of the file they came from.
    assert pair_warnings(ps[1:]) == expected
    assert pair_warnings(ps.limit(1)) == []


def test_pair_warnings_in_memory_use_the_records_save_writes(tmp_path: Path) -> None:
    ps = PairSet.from_pairs([Pair(7, q("a?", 1), q("b?", 2)), Pair(8, q("same?", 1), q("same?", 3))])
    expected_tail = "(pair_id 8): clean and corrupted questions are identical, so patching does nothing"
    assert pair_warnings(ps) == [f"<in memory>: records 2 and 3 {expected_tail}"]
    # Written to a file, the pair is refused when read back, naming the same records.
    saved = ps.save(tmp_path / "s.json")
    with pytest.raises(PairsError) as e:
        load_pairs(saved)
    assert str(e.value) == (
        f"{saved}: record 3 (pair_id 8), field 'question': clean and corrupted questions are identical, so "
        "patching does nothing (as record 2)"
    )


def test_pair_warnings_none_for_good_pairs() -> None:
    assert pair_warnings(synthetic.make_synthetic_pairs(20, seed=1)) == []


def test_equal_answers_warn_but_identical_questions_make_a_file_invalid(tmp_path: Path) -> None:
    path = write(tmp_path, [rec(0, "clean", "a?", 1), rec(0, "corrupted", "b?", 1)])
    pairset, problems = validate_pairs(path)
    assert problems == [] and pairset is not None and len(pair_warnings(pairset)) == 1
    # Identical questions: every patch is a no-op and a sweep reported 100% "flipped" with KL 6e-14.
    flat = write(tmp_path, [rec(0, "clean", "a?", 1), rec(0, "corrupted", "a?", 2)], "flat.json")
    nested = write(
        tmp_path,
        [{"pair_id": 4, "clean": {"question": "a?", "answer": 1}, "corrupted": {"question": "a?", "answer": 2}}],
        "nested.json",
    )
    same = "clean and corrupted questions are identical, so patching does nothing"
    assert [str(p) for p in validate_pairs(flat)[1]] == [
        f"{flat}: record 1 (pair_id 0), field 'question': {same} (as record 0)"
    ]
    assert [str(p) for p in validate_pairs(nested)[1]] == [
        f"{nested}: record 0 (pair_id 4), field 'corrupted.question': {same} (as clean.question)"
    ]


# ------------------------------------------------------------------------------------------
# 2. one pair -> coordinates builder
# ------------------------------------------------------------------------------------------

MIXED = [
    Pair(
        10,
        q("a?", 1, reasoning_steps=3, source_index=4, flag=True, score=0.5, note="x", answer_clean=1),
        q("b?", 2.5, reasoning_steps=5, source_index=4, flag=False, score=0.5, note="y", answer_clean=1),
    ),
    Pair(
        11,
        q("c?", -3, source_index=7, flag=True, x=1),
        q("d?", 4, reasoning_steps=2, source_index=7, flag=True, score=2, x=1, x_clean=9),
    ),
    Pair(12, q("e?", 0, reasoning_steps=None, source_index=8, flag=True), q("f?", 1, source_index=8, flag=False)),
]


def coords_as_lists(coords: dict[str, tuple[str, np.ndarray]]) -> dict[str, tuple[str, str, list]]:
    """name -> (dim, dtype, values) with NaN shown as None, so whole dicts compare with ==."""
    return {
        k: (dim, str(v.dtype), [None if isinstance(x, float) and math.isnan(x) else x for x in v.tolist()])
        for k, (dim, v) in coords.items()
    }


def test_pair_coordinates_values_dtypes_and_names() -> None:
    got = coords_as_lists(pair_coordinates(MIXED))
    assert got == {
        "question_clean": ("pair", "object", ["a?", "c?", "e?"]),
        "question_corrupted": ("pair", "object", ["b?", "d?", "f?"]),
        "answer_clean": ("pair", "float64", [1.0, -3.0, 0.0]),
        "answer_corrupted": ("pair", "float64", [2.5, 4.0, 1.0]),
        # clean wins when it has the key (pair 10: 3, not 5); else corrupted (11); None = unknown (12)
        "reasoning_steps": ("pair", "int64", [3, 2, -1]),
        # same in both variants of every pair: one plain int64 column
        "source_index": ("pair", "int64", [4, 7, 8]),
        # differs somewhere: split; complete bools are int64 0/1
        "flag_clean": ("pair", "int64", [1, 1, 1]),
        "flag_corrupted": ("pair", "int64", [0, 1, 0]),
        # missing somewhere: float64 with NaN
        "score_clean": ("pair", "float64", [0.5, None, None]),
        "score_corrupted": ("pair", "float64", [0.5, 2.0, None]),
        # a meta key named like a fixed coordinate is moved aside, not merged with it
        "meta_answer_clean": ("pair", "float64", [1.0, None, None]),
        "x": ("pair", "float64", [None, 1.0, None]),
        # "x" is plain, so the key "x_clean" (9 vs missing) splits without a clash; its clean side has
        # no value at all and is left out
        "x_clean_corrupted": ("pair", "float64", [None, 9.0, None]),
    }
    assert list(got)[:5] == list(pairs_mod.PAIR_COORDINATES)  # strings ("note") are not coordinates


def test_pair_coordinates_collisions_are_prefixed_in_order() -> None:
    # "x" differs -> x_clean / x_corrupted; the key "x_clean" then finds its name taken.
    pairs = [Pair(0, q("a?", 1, x=1, x_clean=5, pair=3), q("b?", 2, x=2, x_clean=5, pair=3))]
    names = list(pair_coordinates(pairs))[5:]
    assert names == ["x_clean", "x_corrupted", "meta_x_clean", "meta_pair"]
    assert pair_coordinates(pairs)["meta_x_clean"][1].tolist() == [5]
    # names the target Dataset already uses are avoided too, repeatedly if need be
    reserved = {"x_clean", "meta_x_clean", "kl"}
    names = list(pair_coordinates(pairs, reserved=reserved))[5:]
    assert names == ["meta_meta_x_clean", "x_corrupted", "meta_meta_meta_x_clean", "meta_pair"]


def test_pair_coordinates_skips_values_it_cannot_store() -> None:
    pairs = [
        Pair(0, q("a?", 1, big=10**400, wide=2**63, lst=[1]), q("b?", 2, big=10**400, wide=2**63, lst=[1])),
        Pair(1, q("c?", 1, nan=math.nan), q("d?", 2, nan=math.nan)),
    ]
    got = pair_coordinates(pairs)
    assert "big" not in got and "lst" not in got  # beyond float64 / not a scalar
    assert str(got["wide"][1].dtype) == "float64" and got["wide"][1][0] == 2.0**63  # beyond int64
    assert np.isnan(got["nan"][1]).all()  # NaN == NaN counts as agreeing: one plain column


@pytest.mark.parametrize(
    ("value", "shown"), [(2.7, "2.7"), (-1, "-1"), (True, "True"), ("3", "'3'"), (2**63, "9223372036854775808")]
)
def test_pair_coordinates_refuses_bad_steps_built_in_code(value: Any, shown: str) -> None:
    pairs = [Pair(4, q("a?", 1, reasoning_steps=value), q("b?", 2, reasoning_steps=2))]
    with pytest.raises(ValueError, match=rf"^pair_id 4: reasoning_steps {shown} is not a non-negative integer$"):
        pair_coordinates(pairs)


def test_pair_coordinates_accepts_integral_float_steps(tmp_path: Path) -> None:
    path = write(tmp_path, [rec(0, "clean", "a?", 1, reasoning_steps=3.0), rec(0, "corrupted", "b?", 2)])
    assert pair_coordinates(load_pairs(path))["reasoning_steps"][1].tolist() == [3]


def test_to_xarray_is_pair_coordinates() -> None:
    ps = PairSet.from_pairs(MIXED)
    ds = ps.to_xarray()
    coords = pair_coordinates(ps)
    assert list(ds.data_vars) == list(coords)
    for name, (dim, values) in coords.items():
        assert ds[name].dims == (dim,)
        assert ds[name].dtype == values.dtype
        np.testing.assert_array_equal(ds[name].values, values)
    assert ds["pair"].values.tolist() == [10, 11, 12]


def test_patch_sweep_coordinates_are_pair_coordinates(tiny_models: dict) -> None:
    from codi_nnsight.patching.sweep import patch_sweep

    base = synthetic.make_synthetic_pairs(2, seed=3)
    # Meta the old builder dropped (source_index) or read differently (reasoning_steps on one side).
    pairs = PairSet.from_pairs(
        [
            Pair(
                p.pair_id,
                Question(p.clean.question, p.clean.answer, {"source_index": 5 + i, "flag": True, "kl": 0.5}),
                Question(p.corrupted.question, p.corrupted.answer, {"reasoning_steps": 3, "flag": i == 0, "kl": 0.5}),
            )
            for i, p in enumerate(base)
        ]
    )
    ds = patch_sweep(tiny_models["gpt2"], pairs, layers=[0], batch_size=1)
    # the meta key "kl" must not clobber (or clash with) the metric of that name
    assert ds["kl"].dims == ("pair", "layer")
    for name, (dim, values) in pair_coordinates(pairs, reserved={"kl"}).items():
        assert name in ds.coords, name
        assert ds[name].dims == (dim,) and ds[name].dtype == values.dtype, name
        np.testing.assert_array_equal(ds[name].values, values)


# ------------------------------------------------------------------------------------------
# 4. a GSM8K file where a pairs file is expected
# ------------------------------------------------------------------------------------------

GSM8K = [
    {"question": "Tom has 3 bags of 6 pens. How many pens?", "answer": "3*6=<<3*6=18>>18\n#### 18"},
    {"question": "Ann has 2 pens and buys 5. How many?", "answer": "<<2+5=7>>7\n#### 7"},
]


def gsm8k_message(path: Path) -> str:
    return (
        f'{path}: a GSM8K file (records with "question" and an "answer" ending in "#### N"), not a pairs file; '
        f"make pairs from it with: codi-nnsight pairs make --gsm8k {path} --out pairs.json"
    )


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("test.jsonl", "".join(json.dumps(r) + "\n" for r in GSM8K)),
        ("test.json", json.dumps(GSM8K, indent=2)),
        ("one.json", json.dumps(GSM8K[0], indent=2)),  # a single pretty-printed record
        ("extra.jsonl", json.dumps({**GSM8K[0], "id": 3}) + "\n"),
    ],
)
def test_gsm8k_file_names_the_command(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path, text, name)
    pairset, problems = validate_pairs(path)
    assert pairset is None and [str(p) for p in problems] == [gsm8k_message(path)]
    with pytest.raises(PairsError) as exc:
        load_pairs(path)
    assert str(exc.value) == gsm8k_message(path)


def test_gsm8k_command_quotes_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(GSM8K), "my test.json")
    (problem,) = validate_pairs(path)[1]
    assert problem.message.endswith(f"codi-nnsight pairs make --gsm8k '{path}' --out pairs.json")


def test_pairs_file_with_gsm8k_answers_is_not_mistaken(tmp_path: Path) -> None:
    records = [{**GSM8K[0], "pair_id": 0, "variant": "clean"}, {**GSM8K[1]}]
    msgs = [str(p) for p in validate_pairs(write(tmp_path, records))[1]]
    where = f"{tmp_path / 'pairs.json'}: record 0 (pair_id 0), field 'answer'"
    assert msgs[0] == where + ': not a number: "3*6=<<3*6=18>>18\\n#### 18"'
    assert not any("GSM8K" in m for m in msgs)


# ------------------------------------------------------------------------------------------
# 5. class names
# ------------------------------------------------------------------------------------------


def test_renamed_classes_keep_their_old_names() -> None:
    assert pairs_mod.Problem is PairsFileProblem
    assert synthetic.Problem is synthetic.WordProblem
    assert isinstance(synthetic.make_problems(1, seed=0)[0], synthetic.WordProblem)
    assert "PairsFileProblem" in pairs_mod.__all__ and "WordProblem" in synthetic.__all__
