"""Tests for codi_nnsight.pairs: formats, exact problem messages, exports, robustness."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codi_nnsight.data.pairs import (
    Pair,
    PairsError,
    PairSet,
    PairsFileProblem,
    Question,
    load_pairs,
    pair_coordinates,
    pair_warnings,
    pairs_summary,
    validate_pairs,
)

VALID: list[dict[str, Any]] = [
    {
        "pair_id": 0,
        "variant": "clean",
        "question": "Tom has 3 apples?",
        "answer": 3,
        "reasoning_steps": 2,
        "baseline_correct": True,
    },
    {
        "pair_id": 0,
        "variant": "corrupted",
        "question": "Tom has 4 apples?",
        "answer": 4,
        "reasoning_steps": 2,
        "baseline_correct": False,
    },
    {"pair_id": 7, "variant": "clean", "question": "Big number?", "answer": "1,234"},
    {"pair_id": 7, "variant": "corrupted", "question": "Bigger number?", "answer": 1235.5},
]


def records() -> list[dict[str, Any]]:
    return copy.deepcopy(VALID)


def nested(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for r in recs:
        r = dict(r)
        pid, variant = r.pop("pair_id"), r.pop("variant")
        out.setdefault(pid, {"pair_id": pid})[variant] = r
    return list(out.values())


def write(tmp_path: Path, content: Any, name: str = "pairs.json") -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content, encoding="utf-8")
    else:
        p.write_text(json.dumps(content, indent=1), encoding="utf-8")
    return p


def jsonl(recs: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in recs)


def messages(path: Path) -> list[str]:
    pairset, problems = validate_pairs(path)
    assert pairset is None
    with pytest.raises(PairsError) as exc:
        load_pairs(path)
    assert exc.value.problems == problems
    return [str(p).replace(str(path), "F") for p in problems]


# ------------------------------------------------------------------------------------------
# valid files
# ------------------------------------------------------------------------------------------


def test_load_flat_json(tmp_path: Path) -> None:
    path = write(tmp_path, records())
    ps = load_pairs(path)
    assert len(ps) == 2
    assert ps.ids == [0, 7]
    assert ps.source == str(path)
    assert ps.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ps[0].clean == Question("Tom has 3 apples?", 3.0, {"reasoning_steps": 2, "baseline_correct": True})
    assert ps[1].clean.answer == 1234.0
    assert ps[1].corrupted.answer == 1235.5
    assert [p.pair_id for p in ps] == [0, 7]
    assert validate_pairs(path) == (ps, [])


@pytest.mark.parametrize("layout", ["jsonl", "nested_json", "nested_jsonl", "reordered"])
def test_layouts_load_equal(tmp_path: Path, layout: str) -> None:
    ref = load_pairs(write(tmp_path, records(), "ref.json"))
    if layout == "jsonl":
        path = write(tmp_path, jsonl(records()), "p.jsonl")
    elif layout == "nested_json":
        path = write(tmp_path, nested(records()), "p.json")
    elif layout == "nested_jsonl":
        path = write(tmp_path, jsonl(nested(records())), "p.jsonl")
    else:  # corrupted before clean, records interleaved: still the same pairs
        recs = records()
        path = write(tmp_path, [recs[1], recs[2], recs[0], recs[3]])
    assert load_pairs(path) == ref


def test_jsonl_without_extension_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "\n" + jsonl(records()) + "\n\n", "pairs.txt")
    assert load_pairs(path) == load_pairs(write(tmp_path, records()))


def test_single_nested_pair_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path, jsonl(nested(records())[:1]), "one.jsonl")
    assert load_pairs(path).ids == [0]


def test_nested_shared_meta(tmp_path: Path) -> None:
    data = nested(records())
    data[0]["source"] = "gsm8k"
    data[0]["clean"]["variant"] = "clean"  # redundant variant inside nested objects is dropped
    ps = load_pairs(write(tmp_path, data))
    assert ps[0].clean.meta == {"source": "gsm8k", "reasoning_steps": 2, "baseline_correct": True}
    assert ps[0].corrupted.meta["source"] == "gsm8k"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_save_round_trip(tmp_path: Path, suffix: str) -> None:
    ps = load_pairs(write(tmp_path, nested(records())))
    out = ps.save(tmp_path / f"out{suffix}")
    again = load_pairs(out)
    assert again == ps
    assert again.to_records() == ps.to_records()
    if suffix == ".jsonl":
        assert len(out.read_text().splitlines()) == 4


def test_to_records_flat_order_and_int_answers(tmp_path: Path) -> None:
    ps = load_pairs(write(tmp_path, records()))
    recs = ps.to_records()
    assert [(r["pair_id"], r["variant"]) for r in recs] == [
        (0, "clean"),
        (0, "corrupted"),
        (7, "clean"),
        (7, "corrupted"),
    ]
    assert recs[0] == {**VALID[0]}
    assert recs[2]["answer"] == 1234 and isinstance(recs[2]["answer"], int)
    assert recs[3]["answer"] == 1235.5


def test_from_pairs_sha_and_duplicates() -> None:
    q = Question("a?", 1.0, {})
    ps = PairSet.from_pairs([Pair(3, q, Question("b?", 2.0, {}))])
    assert ps.source is None
    canonical = json.dumps(ps.to_records(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert ps.sha256 == hashlib.sha256(canonical).hexdigest()
    with pytest.raises(ValueError, match="duplicate pair_id 3"):
        PairSet.from_pairs([Pair(3, q, q), Pair(3, q, q)])


def test_limit_and_slicing(tmp_path: Path) -> None:
    ps = load_pairs(write(tmp_path, records()))
    assert ps.limit(None) is ps and ps.limit(5) is ps
    one = ps.limit(1)
    assert one.ids == [0] and one.source == ps.source
    assert one.sha256 != ps.sha256
    assert ps[0:1] == one
    assert ps[-1].pair_id == 7


def test_to_pandas(tmp_path: Path) -> None:
    df = load_pairs(write(tmp_path, records())).to_pandas()
    assert list(df.columns) == [
        "pair_id",
        "question_clean",
        "question_corrupted",
        "answer_clean",
        "answer_corrupted",
        "reasoning_steps",
        "baseline_correct_clean",
        "baseline_correct_corrupted",
    ]
    assert df["pair_id"].tolist() == [0, 7]
    assert df["question_corrupted"].tolist() == ["Tom has 4 apples?", "Bigger number?"]
    assert df["answer_clean"].tolist() == [3.0, 1234.0]
    assert df["baseline_correct_clean"].tolist() == [True, None]
    assert df["baseline_correct_corrupted"].tolist() == [False, None]
    # missing in both variants of pair 7 does not count as a difference
    assert df["reasoning_steps"].tolist()[0] == 2 and df["reasoning_steps"].isna().tolist()[1]


def test_to_pandas_meta_split_rule(tmp_path: Path) -> None:
    recs = records()
    for r in recs[2:]:
        r["reasoning_steps"] = 5
    df = load_pairs(write(tmp_path, recs)).to_pandas()
    assert df["reasoning_steps"].tolist() == [2, 5]  # same in both variants: one plain column
    assert "reasoning_steps_clean" not in df.columns


def test_to_xarray(tmp_path: Path) -> None:
    ds = load_pairs(write(tmp_path, records())).to_xarray()
    assert ds.sizes == {"pair": 2}
    assert ds["pair"].values.tolist() == [0, 7]
    assert str(ds["pair"].dtype) == "int64"
    assert ds["question_clean"].values.tolist() == ["Tom has 3 apples?", "Big number?"]
    assert ds["answer_corrupted"].values.tolist() == [4.0, 1235.5]
    assert str(ds["answer_clean"].dtype) == "float64"
    assert ds["reasoning_steps"].values.tolist() == [2, -1]
    assert str(ds["reasoning_steps"].dtype) == "int64"
    # bool meta becomes 0/1 float with NaN where missing
    bc = ds["baseline_correct_clean"].values
    assert bc[0] == 1.0 and math.isnan(bc[1])
    assert ds.attrs["pairs_sha256"] == hashlib.sha256((tmp_path / "pairs.json").read_bytes()).hexdigest()


def test_pairs_summary(tmp_path: Path) -> None:
    recs = records()
    recs[3]["answer"] = 1234
    ps = load_pairs(write(tmp_path, recs))
    # Identical questions only arise in code: a file holding them is refused.
    first = ps[0]
    ps = PairSet(
        [Pair(first.pair_id, first.clean, Question(first.clean.question, first.corrupted.answer, {}))] + list(ps)[1:],
        source=ps.source,
        sha256=ps.sha256,
    )
    text = pairs_summary(ps)
    lines = text.splitlines()
    assert lines[0] == f"2 pairs from {tmp_path / 'pairs.json'}"
    assert "reasoning steps histogram: 2: 1 (unknown: 1)" in lines
    assert lines[-2:] == [
        "1 pair with identical clean and corrupted questions (nothing to patch): 0",
        "1 pair with equal clean and corrupted answers (flip not measurable, logit-difference metrics undefined): 7",
    ]


def test_pairs_summary_no_steps() -> None:
    q = Question("a?", 1.0, {})
    text = pairs_summary(PairSet.from_pairs([Pair(0, q, Question("b?", 2.0, {}))]))
    assert "reasoning steps: unknown" in text
    assert text.splitlines()[-2:] == [
        "no pairs with identical clean and corrupted questions",
        "no pairs with equal clean and corrupted answers",
    ]


def test_pairs_summary_counts_several() -> None:
    same = Question("a?", 1.0, {})
    pairs = [Pair(i, same, Question("b?" if i == 2 else "a?", 1.0, {})) for i in range(3)]
    lines = pairs_summary(PairSet.from_pairs(pairs)).splitlines()
    assert lines[-2:] == [
        "2 pairs with identical clean and corrupted questions (nothing to patch): 0, 1",
        "3 pairs with equal clean and corrupted answers (flip not measurable, logit-difference metrics undefined): "
        "0, 1, 2",
    ]


# ------------------------------------------------------------------------------------------
# problems: exact messages
# ------------------------------------------------------------------------------------------


def mutate(fn: Any) -> list[dict[str, Any]]:
    recs = records()
    fn(recs)
    return recs


FLAT_CASES = {
    "missing pair_id": (
        lambda r: r[0].pop("pair_id"),
        [
            "F: record 0, field 'pair_id': missing required field",
            'F: record 1 (pair_id 0): no "clean" record for this pair',
        ],
    ),
    "missing variant": (
        lambda r: r[1].pop("variant"),
        [
            "F: record 1 (pair_id 0), field 'variant': missing required field",
            'F: record 0 (pair_id 0): no "corrupted" record for this pair',
        ],
    ),
    "missing question": (
        lambda r: r[2].pop("question"),
        ["F: record 2 (pair_id 7), field 'question': missing required field"],
    ),
    "missing answer": (
        lambda r: r[3].pop("answer"),
        ["F: record 3 (pair_id 7), field 'answer': missing required field"],
    ),
    "unknown variant": (
        lambda r: r[1].update(variant="dirty"),
        [
            ('F: record 1 (pair_id 0), field \'variant\': unknown variant "dirty" (expected "clean" or "corrupted")'),
            'F: record 0 (pair_id 0): no "corrupted" record for this pair',
        ],
    ),
    "non-numeric answer": (
        lambda r: r[0].update(answer="twelve"),
        ["F: record 0 (pair_id 0), field 'answer': not a number: \"twelve\""],
    ),
    "bool answer": (
        lambda r: r[0].update(answer=True),
        ["F: record 0 (pair_id 0), field 'answer': not a number: true"],
    ),
    "null answer": (
        lambda r: r[0].update(answer=None),
        ["F: record 0 (pair_id 0), field 'answer': not a number: null"],
    ),
    "badly grouped commas": (
        lambda r: r[0].update(answer="12,34"),
        ["F: record 0 (pair_id 0), field 'answer': not a number: \"12,34\""],
    ),
    "inf answer": (
        lambda r: r[3].update(answer=math.inf),
        ["F: record 3 (pair_id 7), field 'answer': not a finite number: inf"],
    ),
    "nan answer": (
        lambda r: r[3].update(answer=math.nan),
        ["F: record 3 (pair_id 7), field 'answer': not a finite number: nan"],
    ),
    "overflowing string answer": (
        lambda r: r[3].update(answer="1e999"),
        ["F: record 3 (pair_id 7), field 'answer': not a finite number: 1e999"],
    ),
    "huge integer answer": (
        lambda r: r[3].update(answer=10**400),
        [("F: record 3 (pair_id 7), field 'answer': not a finite number: 1000000000000000000000000000000000000...")],
    ),
    "string pair_id": (
        lambda r: r[0].update(pair_id="0"),
        [
            "F: record 0, field 'pair_id': not an integer: \"0\"",
            'F: record 1 (pair_id 0): no "clean" record for this pair',
        ],
    ),
    "float pair_id": (
        lambda r: r[2].update(pair_id=7.5),
        [
            "F: record 2, field 'pair_id': not an integer: 7.5",
            'F: record 3 (pair_id 7): no "clean" record for this pair',
        ],
    ),
    "bool pair_id": (
        lambda r: r[2].update(pair_id=True),
        [
            "F: record 2, field 'pair_id': not an integer: true",
            'F: record 3 (pair_id 7): no "clean" record for this pair',
        ],
    ),
    "pair_id out of range": (
        lambda r: r[2].update(pair_id=2**63),
        [
            "F: record 2, field 'pair_id': integer out of range: 9223372036854775808",
            'F: record 3 (pair_id 7): no "clean" record for this pair',
        ],
    ),
    "duplicate variant": (
        lambda r: r[3].update(variant="clean"),
        [
            ("F: record 3 (pair_id 7), field 'variant': duplicate \"clean\" record (first at record 2)"),
            'F: record 2 (pair_id 7): no "corrupted" record for this pair',
        ],
    ),
    "pair without partner": (
        lambda r: r.pop(1),
        ['F: record 0 (pair_id 0): no "corrupted" record for this pair'],
    ),
    "empty question": (
        lambda r: r[0].update(question=""),
        ["F: record 0 (pair_id 0), field 'question': empty question"],
    ),
    "whitespace question": (
        lambda r: r[1].update(question=" \n\t"),
        ["F: record 1 (pair_id 0), field 'question': empty question"],
    ),
    "question not a string": (
        lambda r: r[1].update(question=["a"]),
        ["F: record 1 (pair_id 0), field 'question': not a string (got list)"],
    ),
    "record not an object": (
        lambda r: r.append([1, 2]),
        ["F: record 4: record is not an object (got list)"],
    ),
    "several problems in one record": (
        lambda r: r[0].update(question=3, answer="x"),
        [
            "F: record 0 (pair_id 0), field 'question': not a string (got number)",
            "F: record 0 (pair_id 0), field 'answer': not a number: \"x\"",
        ],
    ),
    # Refused at load: these used to crash a later step (tokenizer, save, netCDF) or change data.
    "lone surrogate in question": (
        lambda r: r[2].update(question="Big \ud800number?"),
        [
            "F: record 2 (pair_id 7), field 'question': contains a lone surrogate U+D800 (not encodable as UTF-8) "
            "at character 4"
        ],
    ),
    "NUL in question": (
        lambda r: r[1].update(question="Tom has\x00 4 apples?"),
        ["F: record 1 (pair_id 0), field 'question': contains a NUL character at character 7"],
    ),
    "lone surrogate in meta": (
        lambda r: r[0].update(note=["ok", {"k": "\udfff"}]),
        ["F: record 0 (pair_id 0), field 'note': contains a lone surrogate U+DFFF (not encodable as UTF-8)"],
    ),
    "lone surrogate in a meta key": (
        lambda r: r[0].update({"n\ud801": 1}),
        ["F: record 0 (pair_id 0), field 'n\\ud801': contains a lone surrogate U+D801 (not encodable as UTF-8)"],
    ),
    "fractional reasoning_steps": (
        lambda r: r[0].update(reasoning_steps=2.7),
        ["F: record 0 (pair_id 0), field 'reasoning_steps': not a non-negative integer: 2.7"],
    ),
    "huge reasoning_steps": (
        lambda r: r[1].update(reasoning_steps=10**30),
        ["F: record 1 (pair_id 0), field 'reasoning_steps': integer out of range: 1000000000000000000000000000000"],
    ),
    "huge float reasoning_steps": (
        lambda r: r[1].update(reasoning_steps=1e30),
        ["F: record 1 (pair_id 0), field 'reasoning_steps': integer out of range: 1e+30"],
    ),
    "negative reasoning_steps": (
        lambda r: r[2].update(reasoning_steps=-1),
        ["F: record 2 (pair_id 7), field 'reasoning_steps': not a non-negative integer: -1"],
    ),
    "bool reasoning_steps": (
        lambda r: r[2].update(reasoning_steps=True),
        ["F: record 2 (pair_id 7), field 'reasoning_steps': not a non-negative integer: true"],
    ),
    "string reasoning_steps": (
        lambda r: r[2].update(reasoning_steps="3"),
        ["F: record 2 (pair_id 7), field 'reasoning_steps': not a non-negative integer: \"3\""],
    ),
    "null reasoning_steps": (
        lambda r: r[2].update(reasoning_steps=None),
        ["F: record 2 (pair_id 7), field 'reasoning_steps': not a non-negative integer: null"],
    ),
    "nan reasoning_steps": (
        lambda r: r[2].update(reasoning_steps=math.nan),
        ["F: record 2 (pair_id 7), field 'reasoning_steps': not a non-negative integer: nan"],
    ),
    "surrogate in a bad answer is escaped in the message": (
        lambda r: r[3].update(answer="\udc80"),
        ["F: record 3 (pair_id 7), field 'answer': not a number: \"\\udc80\""],
    ),
}


@pytest.mark.parametrize("case", list(FLAT_CASES))
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_flat_problems(tmp_path: Path, case: str, fmt: str) -> None:
    fn, expected = FLAT_CASES[case]
    recs = mutate(fn)
    if fmt == "json":
        path = write(tmp_path, json.dumps(recs), "pairs.json")
    else:
        path = write(tmp_path, jsonl(recs), "pairs.jsonl")
    assert messages(path) == expected


NESTED_CASES = {
    "missing clean": (
        lambda r: r[0].pop("clean"),
        ["F: record 0 (pair_id 0), field 'clean': missing required field"],
    ),
    "corrupted not an object": (
        lambda r: r[1].update(corrupted="x"),
        ["F: record 1 (pair_id 7), field 'corrupted': not an object (got string)"],
    ),
    "missing nested question": (
        lambda r: r[1]["corrupted"].pop("question"),
        ["F: record 1 (pair_id 7), field 'corrupted.question': missing required field"],
    ),
    "missing nested answer": (
        lambda r: r[0]["clean"].pop("answer"),
        ["F: record 0 (pair_id 0), field 'clean.answer': missing required field"],
    ),
    "bad nested answer": (
        lambda r: r[0]["clean"].update(answer="1/2"),
        ["F: record 0 (pair_id 0), field 'clean.answer': not a number: \"1/2\""],
    ),
    "missing pair_id": (
        lambda r: r[0].pop("pair_id"),
        ["F: record 0, field 'pair_id': missing required field"],
    ),
    "duplicate pair id": (
        lambda r: r.append(copy.deepcopy(r[0])),
        ["F: record 2 (pair_id 0), field 'pair_id': duplicate pair_id (first at record 0)"],
    ),
    "empty nested question": (
        lambda r: r[1]["clean"].update(question="  "),
        ["F: record 1 (pair_id 7), field 'clean.question': empty question"],
    ),
    "NUL in nested question": (
        lambda r: r[1]["corrupted"].update(question="\x00"),
        ["F: record 1 (pair_id 7), field 'corrupted.question': contains a NUL character at character 0"],
    ),
    "bad shared reasoning_steps (reported once)": (
        lambda r: r[1].update(reasoning_steps=2.5),
        ["F: record 1 (pair_id 7), field 'reasoning_steps': not a non-negative integer: 2.5"],
    ),
    "bad nested reasoning_steps": (
        lambda r: r[0]["corrupted"].update(reasoning_steps=10**30),
        [
            "F: record 0 (pair_id 0), field 'corrupted.reasoning_steps': integer out of range: "
            "1000000000000000000000000000000"
        ],
    ),
    "surrogate in shared meta": (
        lambda r: r[1].update(source="\ud800"),
        ["F: record 1 (pair_id 7), field 'source': contains a lone surrogate U+D800 (not encodable as UTF-8)"],
    ),
    "top-level question in a nested record": (
        lambda r: r[0].update(question=None),
        ['F: record 0 (pair_id 0), field \'question\': belongs inside "clean" and "corrupted" in a nested record'],
    ),
    "contradicting inner variant": (
        lambda r: r[0]["clean"].update(variant="corrupted"),
        ['F: record 0 (pair_id 0), field \'clean.variant\': is "corrupted" inside "clean"'],
    ),
    "contradicting inner pair_id": (
        lambda r: r[1]["corrupted"].update(pair_id=8),
        ["F: record 1 (pair_id 7), field 'corrupted.pair_id': 8 differs from the record's pair_id"],
    ),
}


@pytest.mark.parametrize("case", list(NESTED_CASES))
def test_nested_problems(tmp_path: Path, case: str) -> None:
    fn, expected = NESTED_CASES[case]
    recs = nested(records())
    fn(recs)
    assert messages(write(tmp_path, recs)) == expected


FILE_CASES = {
    "empty file": (b"", ["F: file is empty"]),
    "whitespace file": (b" \n\n ", ["F: file is empty"]),
    "empty list": (b"[]", ["F: no records (empty list)"]),
    "top level object": (
        b'{\n"pair_id": 0\n,"x": 1}\n',
        ["F: top level must be a list of records, got object"],
    ),
    "top level number": (b"42", ["F: top level must be a list of records, got number"]),
    "invalid json": (
        b'[\n  {"pair_id": 0,\n   "variant": "clean"\n   "question": "q"}\n]',
        ["F: invalid JSON at line 4, column 4: Expecting ',' delimiter"],
    ),
    "truncated json": (
        b'[{"pair_id": 0',
        ["F: invalid JSON at line 1, column 15: Expecting ',' delimiter"],
    ),
    "not utf-8": (b'[{"question": "caf\xe9"}]', ["F: not valid UTF-8 at byte 18"]),
    "deeply nested": (b"[" * 100000, ["F: invalid JSON: nesting too deep"]),
    # JSON keeps only the last of repeated keys; the first answer would vanish silently.
    "duplicate key": (
        b'[{"pair_id": 0, "variant": "clean", "question": "a?", "answer": 1, "answer": 2},'
        b' {"pair_id": 0, "variant": "corrupted", "question": "b?", "answer": 3}]',
        [
            "F: record 0 (pair_id 0), field 'answer': duplicate key in one JSON object "
            "(only the last value would be kept)"
        ],
    ),
    "duplicate key in nested variant": (
        b'[{"pair_id": 0, "clean": {"question": "a?", "question": "c?", "answer": 1},'
        b' "corrupted": {"question": "b?", "answer": 3}}]',
        [
            "F: record 0 (pair_id 0), field 'clean.question': duplicate key in one JSON object "
            "(only the last value would be kept)"
        ],
    ),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_file_problems(tmp_path: Path, case: str) -> None:
    content, expected = FILE_CASES[case]
    assert messages(write(tmp_path, content)) == expected


def test_jsonl_bad_lines_reported_with_line_numbers(tmp_path: Path) -> None:
    lines = jsonl(records()).splitlines()
    lines.insert(1, "")
    lines[3] = '{"pair_id": 0, "x" 1}'  # file line 4
    lines[4] = "[1, 2"
    path = write(tmp_path, "\n".join(lines) + "\n", "pairs.jsonl")
    assert messages(path) == [
        "F: invalid JSON at line 4, column 20: Expecting ':' delimiter",
        "F: invalid JSON at line 5, column 6: Expecting ',' delimiter",
    ]


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    path = write(tmp_path, jsonl([*records(), "oops"]), "pairs.jsonl")
    assert messages(path) == ["F: record 4: record is not an object (got string)"]


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    assert messages(path) == ["F: file not found"]


def test_directory(tmp_path: Path) -> None:
    assert messages(tmp_path) == ["F: is a directory, not a file"]


def test_problem_str_formats() -> None:
    assert str(PairsFileProblem("pairs.json", 3, 1, "answer", "not a finite number: inf")) == (
        "pairs.json: record 3 (pair_id 1), field 'answer': not a finite number: inf"
    )
    assert str(
        PairsFileProblem(
            "pairs.json",
            None,
            None,
            None,
            "invalid JSON at line 4, column 7: Expecting ',' delimiter",
        )
    ) == ("pairs.json: invalid JSON at line 4, column 7: Expecting ',' delimiter")
    assert str(PairsFileProblem("p.json", None, 2, None, "m")) == "p.json: pair_id 2: m"
    assert str(PairsFileProblem("p.json", None, None, "x", "m")) == "p.json: field 'x': m"
    assert str(PairsFileProblem("p.json", 1, None, None, "m")) == "p.json: record 1: m"


def test_pairs_error_is_value_error(tmp_path: Path) -> None:
    path = write(tmp_path, mutate(lambda r: (r[0].pop("answer"), r[2].pop("question"))))
    with pytest.raises(ValueError) as exc:
        load_pairs(path)
    assert isinstance(exc.value, PairsError)
    assert len(exc.value.problems) == 2
    assert str(exc.value).splitlines()[0] == "2 problems found:"
    single = write(tmp_path, b"", "empty.json")
    with pytest.raises(PairsError, match=r"empty\.json: file is empty$"):
        load_pairs(single)


def test_utf8_bom_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xef\xbb\xbf" + json.dumps(records()).encode())
    assert len(load_pairs(path)) == 2


# ------------------------------------------------------------------------------------------
# robustness (hypothesis)
# ------------------------------------------------------------------------------------------

_SETTINGS = settings(
    max_examples=150,
    database=None,  # keep the repository free of .hypothesis/ state
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["clean", "corrupted", "NaN", "inf", "-Infinity", "1,234", "", " ", "1e999"]),
    # Strings that crash later steps if let through: lone surrogates (not UTF-8), NUL.
    st.sampled_from(["\ud800", "a\udfffb", "x\x00y", "\x00"]),
    st.sampled_from([2.7, 10**30, 1e30, -1, 3.0, 2**63, 2**63 - 1, 10**400]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
KEYS = ["pair_id", "variant", "question", "answer", "clean", "corrupted", "reasoning_steps", "note", "score"]


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    """A valid flat or nested document with random structural damage."""
    doc: list[Any] = records() if draw(st.booleans()) else nested(records())
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(["drop", "set", "dup", "remove", "replace", "wrap"]))
        i = draw(st.integers(0, len(doc) - 1)) if doc else 0
        if not doc:
            doc.append(draw(json_values))
        elif action == "drop" and isinstance(doc[i], dict):
            doc[i].pop(draw(st.sampled_from(KEYS)), None)
        elif action == "set" and isinstance(doc[i], dict):
            target = doc[i]
            if "clean" in target and isinstance(target["clean"], dict) and draw(st.booleans()):
                target = target["clean"]
            target[draw(st.sampled_from(KEYS))] = draw(json_values)
        elif action == "dup":
            doc.append(copy.deepcopy(doc[i]))
        elif action == "remove":
            doc.pop(i)
        elif action == "replace":
            doc[i] = draw(json_values)
        else:
            doc = draw(st.sampled_from([{"records": doc}, doc[0], "x"]))
            break
    return doc


def _check_file(path: Path) -> None:
    pairset, problems = validate_pairs(path)  # must never raise
    assert (pairset is None) == bool(problems)
    assert all(isinstance(p, PairsFileProblem) and "\n" not in str(p) for p in problems)
    try:
        ps = load_pairs(path)
    except PairsError as e:
        assert e.problems
        assert all("internal error" not in p.message for p in e.problems)
    else:
        assert isinstance(ps, PairSet) and len(ps) > 0
        ds = ps.to_xarray()
        assert set(ds.data_vars) == set(pair_coordinates(ps))
        ps.to_pandas()
        pairs_summary(ps).encode("utf-8")
        assert all("\n" not in w for w in pair_warnings(ps))
        # What loads can be written back and reloaded unchanged (pairs filter / make do this).
        again = load_pairs(ps.save(path.with_name("again.json")))
        assert again == ps
    for p in problems:
        str(p).encode("utf-8")  # printable: the CLI echoes every problem


@_SETTINGS
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_bytes_never_crash(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    _check_file(path)


@_SETTINGS
@given(
    doc=mutated_documents(),
    as_jsonl=st.booleans(),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
)
def test_mutated_documents_never_crash(tmp_path: Path, doc: Any, as_jsonl: bool, cut: int | None) -> None:
    if as_jsonl and isinstance(doc, list):
        text = "".join(json.dumps(r) + "\n" for r in doc)
    else:
        text = json.dumps(doc)
    raw = text.encode("utf-8")
    if cut is not None:
        raw = raw[:cut]  # truncation, possibly in the middle of a multi-byte character
    path = tmp_path / ("m.jsonl" if as_jsonl else "m.json")
    path.write_bytes(raw)
    _check_file(path)


HOSTILE = st.one_of(
    json_values,
    st.text(alphabet=st.characters(codec=None, categories=["Cs", "Cc", "Lu"]), max_size=4),
    st.sampled_from([2.7, 3.0, -1, 0, 10**30, 1e30, 2**63 - 1, 2**63, math.nan, math.inf, True, None, "3"]),
)


@_SETTINGS
@given(
    nested_layout=st.booleans(),
    index=st.integers(0, 3),
    key=st.sampled_from(["question", "answer", "reasoning_steps", "note", "pair_id"]),
    value=HOSTILE,
    as_jsonl=st.booleans(),
)
def test_one_hostile_field(
    tmp_path: Path, nested_layout: bool, index: int, key: str, value: Any, as_jsonl: bool
) -> None:
    """One field of a valid file set to a hostile value: either a one-line problem, or a file whose
    content survives every later step unchanged (save/reload, coordinates, printing)."""
    recs = records()
    recs[index][key] = value
    doc = nested(recs) if nested_layout and key != "pair_id" else recs
    text = "".join(json.dumps(r) + "\n" for r in doc) if as_jsonl else json.dumps(doc)
    path = write(tmp_path, text, "h.jsonl" if as_jsonl else "h.json")
    _check_file(path)
    pairset, _ = validate_pairs(path)
    if pairset is None:
        return
    coords = pair_coordinates(pairset)
    for k, pair in enumerate(pairset):
        for variant in ("clean", "corrupted"):
            question = getattr(pair, variant).question
            assert "\x00" not in question  # netCDF would cut the string there
            assert coords[f"question_{variant}"][1][k] == question
        # reasoning_steps is stored exactly, never rounded or dropped
        raw = pair.clean.meta.get("reasoning_steps", pair.corrupted.meta.get("reasoning_steps"))
        assert coords["reasoning_steps"][1][k] == (-1 if raw is None else raw)
