"""Tests for codi_nnsight.gsm8k: chain parsing, safe evaluation, pair generation."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from codi_nnsight.data import gsm8k
from codi_nnsight.data.gsm8k import (
    EvalError,
    load_gsm8k_hub,
    make_pair,
    make_pairs,
    parse_chain,
    question_numbers,
    read_gsm8k,
    safe_eval,
)
from codi_nnsight.data.pairs import load_pairs
from codi_nnsight.errors import UserError

# Every possible corruption of these records was computed by hand: changed -> new answer.
BAKER = {
    "question": "A baker makes 12 cakes each day for 5 days. He sells 40 cakes. How many cakes are left?",
    "answer": "He makes 12*5=<<12*5=60>>60 cakes.\nHe has 60-40=<<60-40=20>>20 left.\n#### 20",
}
BAKER_OUTCOMES = {
    "12->11": 15,
    "12->13": 25,
    "5->4": 8,
    "5->6": 32,
    "40->39": 21,
    "40->41": 19,
}

MARBLES = {
    "question": "Sara has 3 bags with 7 marbles each. She gives away 4 marbles and then "
    "doubles what is left. How many marbles does she have?",
    "answer": "3*7=<<3*7=21>>21\n21-4=<<21-4=17>>17\n17*2=<<17*2=34>>34\n#### 34",
}
# 3->4 and 4->3 are impossible: the new number would already be in the question.
# The literal 2 ("doubles") is a hidden constant and stays.
MARBLES_OUTCOMES = {"3->2": 20, "7->6": 28, "7->8": 40, "4->5": 32}

SHOP = {
    "question": "A shop sells 1,200 pens for $3 each and pays a $100 fee. How much money does it keep?",
    "answer": "Sales: <<1200*3=3600>>3,600.\nKept: <<3600+100=3700>>3,700\n#### 3,700",
}
SHOP_OUTCOMES = {
    "1,200->1,199": 3697,
    "1,200->1,201": 3703,
    "3->2": 2500,
    "3->4": 4900,
    "100->99": 3699,
    "100->101": 3701,
}

NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
    "many clips in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
    "<<48+24=72>>72 clips altogether in April and May.\n#### 72",
}

REJECTS = {
    "chain inconsistent": {
        "question": "Tom has 5 bags with 4 balls each. How many balls?",
        "answer": "<<5*4=21>>21\n#### 21",
    },
    "no annotations": {"question": "Tom has 5 balls. How many?", "answer": "He has 5.\n#### 5"},
    "no final answer": {"question": "Tom has 5 bags of 4.", "answer": "<<5*4=20>>20"},
    "no unique operand": {
        "question": "Tom has 5 red and 5 blue balls. How many balls?",
        "answer": "<<5+5=10>>10\n#### 10",
    },
    "final answer not in chain": {
        "question": "Tom has 2 and 3 balls.",
        "answer": "<<2+3=5>>5\n#### 6",
    },
    "answer unchanged": {
        "question": "Ann has 2 boxes with 5 pens each. How many days are in a week?",
        "answer": "<<2*5=10>>10 pens. <<8-1=7>>7 days.\n#### 7",
    },
    "ambiguous operand": {
        # 15 is both the result of 5*3 and the number of pencils, so step 2's 15s are ambiguous
        "question": "Ann has 5 boxes with 3 pens each. She also has 15 pencils. How many items?",
        "answer": "<<5*3=15>>15 pens\n<<15+15=30>>30 items\n#### 30",
    },
    "unparseable chain": {
        "question": "Tom has 5 balls.",
        "answer": "<<__import__('os').getcwd()=5>>\n#### 5",
    },
    "non-integer result": NATALIA,
    "bad record": {"question": 5, "answer": "#### 5"},
}


@pytest.mark.parametrize(
    ("record", "outcomes"),
    [(BAKER, BAKER_OUTCOMES), (MARBLES, MARBLES_OUTCOMES), (SHOP, SHOP_OUTCOMES)],
)
def test_make_pair_matches_hand_computed(record: dict, outcomes: dict) -> None:
    seen = set()
    for seed in range(40):
        result = make_pair(record, random.Random(seed))
        assert not isinstance(result, str), result
        clean, corrupted = result
        assert clean["question"] == record["question"]
        assert clean["answer"] == int(record["answer"].split("####")[1].replace(",", ""))
        changed = corrupted["changed"]
        assert clean["changed"] == changed
        assert corrupted["answer"] == outcomes[changed]
        assert isinstance(corrupted["answer"], int)
        # exactly one number token differs, and only that token's text changed
        old, new = changed.split("->")
        a = [t[2] for t in question_numbers(clean["question"])]
        b = [t[2] for t in question_numbers(corrupted["question"])]
        assert [(x, y) for x, y in zip(a, b) if x != y] == [(old, new)]
        assert b.count(new) == 1
        assert len(corrupted["question"]) == len(clean["question"]) + len(new) - len(old)
        assert corrupted["reasoning_steps"] == record["answer"].count("<<")
        # each variant carries its own chain's results; the corrupted chain ends in its new answer
        assert len(clean["intermediates"]) == len(corrupted["intermediates"]) == corrupted["reasoning_steps"]
        assert clean["answer"] in clean["intermediates"] and corrupted["answer"] in corrupted["intermediates"]
        from codi_nnsight.readouts.gold import gold_intermediates

        assert gold_intermediates(corrupted) == [float(v) for v in corrupted["intermediates"]]
        seen.add(changed)
    assert seen == set(outcomes)  # every admissible corruption is reachable


def test_make_pair_single_offset() -> None:
    _clean, corrupted = make_pair(SHOP, random.Random(0), offsets=(1,))
    assert corrupted["changed"] in {"1,200->1,201", "3->4", "100->101"}


@pytest.mark.parametrize("reason", list(REJECTS))
def test_rejection_reasons(reason: str) -> None:
    for seed in range(10):
        assert make_pair(REJECTS[reason], random.Random(seed)) == reason


def test_make_pairs_counts_and_format(tmp_path: Path) -> None:
    records = [BAKER, *REJECTS.values(), MARBLES, "not a dict", SHOP]
    pairs, rejected = make_pairs(records, seed=1)
    assert len(pairs) == 3
    assert pairs.ids == [0, 1, 2]
    expected = Counter(list(REJECTS))
    expected["bad record"] += 1
    assert rejected == expected
    recs = pairs.to_records()
    assert set(recs[0]) == {
        "pair_id",
        "variant",
        "question",
        "answer",
        "reasoning_steps",
        "changed",
        "intermediates",
        "source_index",
    }
    assert [r["source_index"] for r in recs] == [0, 0, 11, 11, 13, 13]
    assert recs[1]["answer"] == BAKER_OUTCOMES[recs[1]["changed"]]
    assert recs[5]["answer"] == SHOP_OUTCOMES[recs[5]["changed"]]
    # the generated pairs are a valid pairs file
    assert load_pairs(pairs.save(tmp_path / "g.json")) == pairs


def test_make_pairs_deterministic_and_limit() -> None:
    records = [BAKER, MARBLES, SHOP, NATALIA] * 5
    a, ca = make_pairs(records, seed=7)
    b, cb = make_pairs(records, seed=7)
    assert a == b and a.sha256 == b.sha256 and ca == cb
    assert any(make_pairs(records, seed=s)[0] != a for s in range(8, 12))
    limited, cl = make_pairs(records, seed=7, limit=4)
    assert limited == a.limit(4)
    assert cl == Counter({"non-integer result": 1})  # stopped after the 4th accepted pair


def test_parse_chain() -> None:
    steps, final = parse_chain(SHOP["answer"])
    assert steps == [("1200*3", "3600"), ("3600+100", "3700")]
    assert final == "3700"
    assert parse_chain("no steps here") == ([], None)
    assert parse_chain("<<1,000*2=2,000>> <<oops>>\n#### 2,000") == (
        [("1,000*2", "2000"), ("oops", "")],
        "2000",
    )


def test_safe_eval() -> None:
    assert safe_eval("(1+2)*.5") == Fraction(3, 2)
    assert safe_eval("10/3*3") == 10  # exact rational arithmetic
    assert safe_eval("0.1+0.2") == Fraction(3, 10)
    assert safe_eval("-(4-6)") == 2
    assert safe_eval("1,000*2") == 2000
    for bad in [
        "2**3",
        "a+1",
        "__import__('os')",
        "1e999",
        "[1]",
        "",
        "1 if 1 else 2",
        "2%3",
        "True+1",
        "'a'",
    ]:
        with pytest.raises(EvalError):
            safe_eval(bad)
    with pytest.raises(ZeroDivisionError):
        safe_eval("1/(2-2)")


def test_question_numbers() -> None:
    toks = question_numbers("He paid $1,200 for 3.5 kg, 2nd time 7 items, x5 and 10.")
    assert [(t[2], t[3]) for t in toks] == [
        ("1,200", 1200),
        ("3.5", Fraction(7, 2)),
        ("7", 7),
        ("10", 10),
    ]


def test_read_gsm8k(tmp_path: Path) -> None:
    data = [BAKER, MARBLES]
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    assert read_gsm8k(tmp_path / "a.json") == data
    assert read_gsm8k(tmp_path / "b.jsonl") == data
    (tmp_path / "c.jsonl").write_text(json.dumps(BAKER) + "\n{oops\n")
    with pytest.raises(ValueError, match="invalid JSON at line 2"):
        read_gsm8k(tmp_path / "c.jsonl")
    (tmp_path / "d.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a list of objects"):
        read_gsm8k(tmp_path / "d.json")


def test_load_gsm8k_hub_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match="pip install datasets"):
        load_gsm8k_hub()


def test_reason_constants_exported() -> None:
    reasons = {v for k, v in vars(gsm8k).items() if k.startswith("REJECT_")}
    assert set(REJECTS) <= reasons


@pytest.mark.parametrize(
    "question",
    ["Tom has 5 bags\x00 of 4. How many?", "Tom has 5 bags \ud800of 4. How many?", "  "],
)
def test_make_pair_rejects_questions_a_pairs_file_refuses(question: str) -> None:
    # NUL or a lone surrogate would make a pairs file that cannot be saved or loaded again.
    record = {"question": question, "answer": "<<5*4=20>>20\n#### 20"}
    assert make_pair(record, random.Random(0)) == "bad record"
    assert make_pair({**record, "question": "Tom has 5 bags of 4. How many?"}, random.Random(0)) != "bad record"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "{p}: file not found"),
        (".", None, "{p}: is a directory, not a file"),
        ("latin1.json", b'[{"question": "caf\xe9"}]', "{p}: not valid UTF-8 at byte 18"),
        ("deep.json", b"[" * 100000, "{p}: invalid JSON: nesting too deep"),
        ("number.json", b"1", "{p}: expected a list of objects with 'question' and 'answer'"),
    ],
    ids=["missing", "directory", "latin1", "deep", "number"],
)
def test_read_gsm8k_errors_are_one_line(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as exc:  # a UserError is a ValueError: the CLI prints one line
        read_gsm8k(path)
    assert str(exc.value) == message.format(p=path)


def test_read_gsm8k_accepts_a_bom(tmp_path: Path) -> None:
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([BAKER]).encode())
    assert read_gsm8k(tmp_path / "bom.json") == [BAKER]


def test_gsm8k_file_given_as_pairs_names_the_conversion(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (BAKER, MARBLES)))
    with pytest.raises(ValueError) as exc:
        load_pairs(path)
    assert str(exc.value).endswith(f"make pairs from it with: codi-nnsight pairs make --gsm8k {path} --out pairs.json")
    # and that command's own code path turns it into a loadable pairs file
    pairs, _ = make_pairs(read_gsm8k(path), seed=0)
    assert load_pairs(pairs.save(tmp_path / "pairs.json")) == pairs
