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
    with pytest.raises(UserError) as e:
        load_gsm8k_hub()
    assert str(e.value) == (
        "--gsm8k hub: loading GSM8K from the Hugging Face Hub needs the 'datasets' package: "
        'pip install -e ".[gsm8k]" (or pip install datasets)'
    )


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


# ------------------------------------------------------------------------------------------------
# Real GSM8K records (test split, verbatim): a chain literal changes only where it can only come
# from the changed number, never where a word ("twice", "half") or a unit also gives its value.
# ------------------------------------------------------------------------------------------------

JAMES = {
    "question": "James writes a 3-page letter to 2 different friends twice a week.  How many pages does he "
    "write a year?",
    "answer": "He writes each friend\n3*2=<<3*2=6>>6 pages a week\nSo he writes\n6*2=<<6*2=12>>12 pages every "
    "week\nThat means he writes\n12*52=<<12*52=624>>624 pages a year\n#### 624",
}
ROBE = {
    "question": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total "
    "does it take?",
    "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 "
    "bolts of fabric\n#### 3",
}
JANET = {
    "question": "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
    "muffins for her friends every day with four. She sells the remainder at the farmers' market daily for "
    "$2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
    "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every "
    "day at the farmer\u2019s market.\n#### 18",
}
SPRINTS = {
    "question": "James decides to run 3 sprints 3 times a week.  He runs 60 meters each sprint.  How many "
    "total meters does he run a week?",
    "answer": "He sprints 3*3=<<3*3=9>>9 times\nSo he runs 9*60=<<9*60=540>>540 meters\n#### 540",
}
ELIZA = {
    "question": "Eliza's rate per hour for the first 40 hours she works each week is $10. She also receives an "
    "overtime pay of 1.2 times her regular hourly rate. If Eliza worked for 45 hours this week, how much are "
    "her earnings for this week?",
    "answer": "Eliza is entitled to 45 -40 = <<45-40=5>>5 hours overtime pay.\nHer hourly rate for the "
    "overtime pay is $10 x 1.2 = $<<10*1.2=12>>12.\nSo, Eliza will receive $12 x 5 =$<<12*5=60>>60 for "
    "overtime pay.\nHer regular weekly earning is $10 x 40 = $<<10*40=400>>400.\nThus, Eliza will receive a "
    "total of $400 + $60 = $<<400+60=460>>460 for this week.\n#### 460",
}
# Written for the percentage rule: the 20% also reaches the chain as 0.8 (1 - 20/100).
COAT = {
    "question": "A coat costs $100 and is on sale at 20% off. A scarf costs 3 times the discount. How much do "
    "the sale coat and the scarf cost together?",
    "answer": "Discount: <<100*20/100=20>>20. Sale price: <<100*0.8=80>>80. Scarf: <<3*20=60>>60. Total: "
    "<<80+60=140>>140\n#### 140",
}


def outcomes(record: dict, seeds: int = 30) -> set:
    """Every result make_pair gives over `seeds` seeds: reasons, or (changed, answer, intermediates)."""
    out = set()
    for seed in range(seeds):
        r = make_pair(record, random.Random(seed))
        out.add(r if isinstance(r, str) else (r[1]["changed"], r[1]["answer"], tuple(r[1]["intermediates"])))
    return out


def test_a_literal_that_is_also_a_word_number_is_not_changed() -> None:
    # Before: 2 -> 1 friend gave 156 with [3, 3, 156] (the "twice" 2 changed too); right: 312, [6, 6, 312].
    assert outcomes(JAMES) == {gsm8k.REJECT_WORD_NUMBER, gsm8k.REJECT_UNIT}
    _, _, lines = gsm8k.explain_pairs([JAMES], seed=2)
    assert (
        "  refused 2->1: value also from a word-number (chain literal 2 in step 1 may be the changed '2' or "
        "'twice' (2))" in lines
    )
    # 3 -> 4 pages would be right (832), but step 2's 12 is also a year's 12 months: refused, not guessed.
    assert (
        "  refused 3->4: value also from a unit or constant (chain literal 12 in step 3 may be 'year' (12) or "
        "step 2's result)" in lines
    )
    # "half" 2: before, 2 -> 1 bolt gave 2 (1/1 + 1) and 2 -> 3 gave 4; the truths 1.5 and 4.5 are no pairs.
    assert outcomes(ROBE) == {gsm8k.REJECT_WORD_NUMBER}


def test_real_records_that_are_provable_give_hand_computed_pairs() -> None:
    assert outcomes(JANET) == {
        ("16->15", 16, (8, 16)),
        ("16->17", 20, (10, 20)),
        ("2->1", 9, (9, 9)),
        ("2->3", 27, (9, 27)),
    }
    assert outcomes(SPRINTS) == {("60->59", 531, (9, 531)), ("60->61", 549, (9, 549))}
    # 45 -> 46 hours would be 472, but step 5's 60 is step 3's result and also an hour's minutes.
    assert outcomes(ELIZA) == {gsm8k.REJECT_UNIT}


def test_a_percentage_that_also_reaches_the_chain_as_a_fraction_is_not_changed() -> None:
    # Before: 20% -> 21% gave 143 (0.8 kept); right: 79 + 63 = 142.
    assert outcomes(COAT) == {("3->2", 120, (20, 80, 40, 120)), ("3->4", 160, (20, 80, 80, 160))}
    lines = {line for seed in range(10) for line in gsm8k.explain_pairs([COAT], seed=seed)[2]}
    assert (
        "  refused 20->21: value also from a unit or constant (the changed 20% also reaches the chain as 0.8)" in lines
    )
    assert (
        "  refused 100->101: value also from a unit or constant (chain literal 100 in step 1 may be the changed "
        "'100' or '%' (100))" in lines
    )


def test_explain_pairs_audits_what_make_pairs_makes() -> None:
    records = [JANET, JAMES, "not a record"]
    pairs, rejected, lines = gsm8k.explain_pairs(records, seed=0)
    assert (pairs, rejected) == make_pairs(records, seed=0)
    changed = pairs[0].corrupted.meta["changed"]
    assert lines[:4] == [
        "record 0: pair 0",
        f"  changed {changed} at character {JANET['question'].index(changed.split('->')[0] + ' ')}",
        "    clean chain:     16 - 3 - 4 = 9; 9 * 2 = 18 -> 18",
        "    corrupted chain: "
        + {
            "16->15": "15 - 3 - 4 = 8; 8 * 2 = 16 -> 16",
            "16->17": "17 - 3 - 4 = 10; 10 * 2 = 20 -> 20",
            "2->1": "16 - 3 - 4 = 9; 9 * 1 = 9 -> 9",
            "2->3": "16 - 3 - 4 = 9; 9 * 3 = 27 -> 27",
        }[changed],
    ]
    assert lines[4].startswith("record 1: no pair (value also from ")
    assert lines[-1] == "record 2: no pair (bad record)"


def test_implied_values() -> None:
    v = gsm8k.implied_values("Twice a week, twenty-five kids eat half a dozen eggs.")
    assert {Fraction(2), Fraction(7), Fraction(52), Fraction(25), Fraction(6), Fraction(12), Fraction(1, 2)} <= set(v)
    assert ("word", "'twice' (2)") in v[Fraction(2)] and ("unit", "'week' (7)") in v[Fraction(7)]
    assert v[Fraction(1)] == [("unit", "the constant 1")]
    assert Fraction(3) not in gsm8k.implied_values("Tom has 5 pens.")
