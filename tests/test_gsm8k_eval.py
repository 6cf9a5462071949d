"""`evaluate --gsm8k`: the official CODI GSM8K accuracy protocol (zhenyi4/codi test.py).

The expected values below were worked out by hand from the official rules (docs/evaluate.md):
the prediction is the last match of `-?\\d+\\.?\\d*` after removing commas, the gold answer is the
float after the last `####` with commas removed, and an answer is right when the two are equal
as floats.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from codi_nnsight.cli import main
from codi_nnsight.errors import UserError
from codi_nnsight.model.gsm8k_eval import (
    GSM8KItem,
    evaluate_gsm8k,
    is_correct,
    load_gsm8k_items,
    official_answer,
    parse_gold,
)

# GSM8K-format test records (question, worked answer ending in "#### N"). The first three are
# GSM8K-style word problems (one with a double space and one with a thousands comma); the last two
# are in the bundled toy model's distribution, so the toy answers them (and only them) correctly.
RECORDS = [
    {
        "question": "A baker makes 24 muffins in the morning and 18 muffins in the afternoon. "
        "He sells 30 muffins. How many muffins does he have left?",
        "answer": "He makes 24 + 18 = <<24+18=42>>42 muffins.\nHe has 42 - 30 = <<42-30=12>>12 muffins left.\n#### 12",
    },
    {
        "question": "Sara reads 15 pages a day for 4 days and then 20 pages on the fifth day.  "
        "How many pages has she read in total?",
        "answer": "In 4 days she reads 15 * 4 = <<15*4=60>>60 pages.\nIn total she reads 60 + 20 = <<60+20=80>>80 "
        "pages.\n#### 80",
    },
    {
        "question": "A school orders 1,200 pencils and gives 35 pencils to each of 20 classes. "
        "How many pencils are left?",
        "answer": "The classes get 35 * 20 = <<35*20=700>>700 pencils.\nThere are 1,200 - 700 = <<1200-700=500>>500 "
        "pencils left.\n#### 500",
    },
    {
        "question": "Mia has 10 apples. She gives 9 apples away. Then she gets 5 more apples. She buys 7 more "
        "apples. Then she loses 4 apples. How many apples does she have now?",
        "answer": "10 - 9 = <<10-9=1>>1\n1 + 5 = <<1+5=6>>6\n6 + 7 = <<6+7=13>>13\n13 - 4 = <<13-4=9>>9\n#### 9",
    },
    {
        "question": "Tom has 3 pens. He buys 4 more pens. How many pens does he have now?",
        "answer": "3 + 4 = <<3+4=7>>7\n#### 7",
    },
]
GOLD = [12.0, 80.0, 500.0, 9.0, 7.0]


def write_jsonl(path: Path, records: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def gsm8k_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "test.jsonl", RECORDS)


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


# -- the official answer extraction ------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is: 1,234", 1234.0),  # commas go before matching
        ("$1,000,000.", 1000000.0),  # a trailing point belongs to the number
        ("1,2,3", 123.0),  # every comma goes, even between single digits
        ("The answer is: -7", -7.0),
        ("The answer is: 18.0", 18.0),
        ("18.", 18.0),
        ("The answer is: 2.5", 2.5),
        ("3 apples and 4 pears make 7", 7.0),  # the last number, not the first
        ("10-3=7", 7.0),
        ("The answer is 7-2", -2.0),  # "-2" is a number of its own
        ("1.2.3", 3.0),  # "1.2" then "3"
        ("The answer is: 12 dollars and 50 cents", 50.0),  # no "The answer is" anchoring
        ("no number here", None),  # official: inf, never equal to a gold answer
        ("", None),
    ],
)
def test_official_answer_is_the_last_number_without_commas(text, expected):
    assert official_answer(text) == expected


def test_correct_is_float_equality():
    assert is_correct(official_answer("The answer is: 18.0"), 18.0)
    assert is_correct(official_answer("18.00"), parse_gold("#### 18"))
    assert not is_correct(official_answer("18.5"), 18.0)
    assert not is_correct(official_answer("eighteen"), 18.0)
    assert is_correct(official_answer("-3"), parse_gold("#### -3"))


# -- the gold answer ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer,expected",
    [
        ("She has 6 * 12 = <<6*12=72>>72.\n#### 72", 72.0),
        ("#### 1,234", 1234.0),
        ("#### -5", -5.0),
        ("#### 2.5", 2.5),
        ("#### 18\n", 18.0),
        ("work #### 3 #### 4", 4.0),  # after the last ####
        ("18", 18.0),  # no ####: the whole text, as the official code reads it
        (18, 18.0),
    ],
)
def test_parse_gold(answer, expected):
    assert parse_gold(answer) == expected


@pytest.mark.parametrize(
    "answer,message",
    [
        ("#### seventy", "no number after '####': 'seventy'"),
        ("The total is 18", "no number (no '####' in the answer): 'The total is 18'"),
        ("#### nan", "not a finite number: 'nan'"),
        (True, "expected text like '... #### 18', got true/false"),
        (None, "expected text like '... #### 18', got null"),
    ],
)
def test_parse_gold_refuses_what_the_official_code_would_score_as_inf(answer, message):
    with pytest.raises(ValueError) as e:
        parse_gold(answer)
    assert str(e.value) == message


def test_load_reads_questions_gold_and_lines(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS, blank_after=1)
    items = load_gsm8k_items(path)
    assert [it.gold for it in items] == GOLD
    assert [it.where for it in items] == ["line 1", "line 3", "line 4", "line 5", "line 6"]
    assert items[1].question == RECORDS[1]["question"]  # as written: the model normalizes it
    assert [it.where for it in load_gsm8k_items(path, limit=2)] == ["line 1", "line 3"]
    listed = tmp_path / "t.json"
    listed.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert [it.where for it in load_gsm8k_items(listed)] == [f"record {i}" for i in range(1, 6)]


# -- the command, end to end on the bundled toy model ------------------------------------------------
def test_cli_end_to_end_on_toy_model(gsm8k_file, tmp_path):
    out = tmp_path / "answers.json"
    args = ["evaluate", "--model", "toy-codi", "--gsm8k", str(gsm8k_file), "--max-new-tokens", "64"]
    r = cli(*args, "--out", str(out))
    assert r.exit_code == 0, r.output
    line = r.output.strip()
    assert line.startswith(
        "model toy-codi: GSM8K accuracy 40.0% (95% CI 5.3%–85.3%, exact binomial), 2/5 correct, n=5 — "
        "protocol codi-official-gsm8k (zhenyi4/codi test.py @ 4fd88d4: greedy, 6 latents, at most 64 new tokens"
    ), line
    assert line.endswith("; deviates: max_new_tokens 64 (official 256)")
    doc = json.loads(out.read_text())
    assert (doc["protocol"], doc["n"], doc["correct"], doc["accuracy"]) == ("codi-official-gsm8k", 5, 2, 0.4)
    assert doc["ci95"] == pytest.approx([0.0527, 0.8534], abs=1e-4)
    assert doc["settings"]["max_new_tokens"] == 64 and doc["settings"]["num_latent"] == 6
    recs = doc["records"]
    assert [r["gold"] for r in recs] == GOLD and [r["where"] for r in recs] == [f"line {i}" for i in range(1, 6)]
    assert [r["correct"] for r in recs] == [False, False, False, True, True]
    for rec in recs:  # every record is scored by the official rule on its own generated text
        assert rec["predicted"] == official_answer(rec["generated"])
        assert rec["correct"] == is_correct(rec["predicted"], rec["gold"])
    assert recs[3]["generated"] == "The answer is: 9"

    r = cli(*args, "--out", str(out))  # an existing file is not overwritten without --force
    assert r.exit_code == 2 and r.output.strip() == f"error: {out}: file exists; add --force to overwrite it"
    r = cli(*args, "--out", str(out), "--force", "--limit", "2")
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["n"] == 2


def test_default_is_the_official_256_tokens(gsm8k_file):
    # The toy model's context (256) cannot hold 256 new tokens: refused in one line, not truncated.
    r = cli("evaluate", "--model", "toy-codi", "--gsm8k", str(gsm8k_file))
    assert r.exit_code == 2
    assert r.output.strip() == (
        "error: --max-new-tokens 256 with 6 latents exceeds the model's context of 256; pass a smaller --max-new-tokens"
    )


@pytest.fixture(scope="module")
def toy():
    from codi_nnsight.model.wrapper import load_model

    return load_model("toy-codi")


def test_answers_do_not_depend_on_batch_size(toy):
    items = [GSM8KItem(r["question"], g, f"line {i}") for i, (r, g) in enumerate(zip(RECORDS, GOLD), 1)]
    one = evaluate_gsm8k(toy, items, max_new_tokens=48, batch_size=1)
    five = evaluate_gsm8k(toy, items, max_new_tokens=48, batch_size=5)
    assert [a.generated for a in one.answers] == [a.generated for a in five.answers]
    assert one.n_correct == five.n_correct == 2


def test_question_too_long_for_context_is_named(toy):
    long_q = "Tom has 3 pens and " + "then he buys 4 more pens and " * 8 + "how many pens does he have?"
    items = [GSM8KItem("Tom has 3 pens. How many pens?", 3.0, "line 1"), GSM8KItem(long_q, 35.0, "line 2")]
    n = len(toy.encode_question(long_q))
    m = 256 - n - 6 - 1 + 1  # one token more than question + 6 latents + [eot] + answer can hold
    with pytest.raises(UserError) as e:
        evaluate_gsm8k(toy, items, max_new_tokens=m, source="t.jsonl")
    assert str(e.value) == (
        f"t.jsonl: line 2: field 'question': {n} tokens; with 6 latents and --max-new-tokens {m} "
        "it exceeds the model's context of 256; pass a smaller --max-new-tokens"
    )


# -- bad input: one line, exit 2, before the model is loaded -------------------------------------
@pytest.mark.parametrize(
    "records,blank_after,message",
    [
        ([RECORDS[0], {"question": "How many?"}], None, "line 2: field 'answer': missing"),
        ([{"answer": "#### 3"}], None, "line 1: field 'question': missing"),
        (
            [RECORDS[0], {"question": 7, "answer": "#### 3"}],
            None,
            "line 2: field 'question': expected text, got a number",
        ),
        ([RECORDS[0], {"question": "  ", "answer": "#### 3"}], None, "line 2: field 'question': empty"),
        (
            [RECORDS[0], RECORDS[1], {"question": "How many?", "answer": "#### seventy"}],
            1,
            "line 4: field 'answer': no number after '####': 'seventy'",
        ),
        ([{"question": "How many?", "answer": "#### inf"}], None, "line 1: field 'answer': not a finite number: 'inf'"),
    ],
)
def test_bad_record_is_one_line_naming_file_line_and_field(tmp_path, records, blank_after, message):
    path = write_jsonl(tmp_path / "bad.jsonl", records, blank_after)
    # A model that does not exist: the records must be refused before any model is looked for.
    r = cli("evaluate", "--model", str(tmp_path / "no-such-model"), "--gsm8k", str(path))
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {path}: {message}"


def test_bad_record_past_limit_is_not_read(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [RECORDS[4], {"question": "How many?"}])
    assert len(load_gsm8k_items(path, limit=1)) == 1
    with pytest.raises(UserError, match=r"line 2: field 'answer': missing"):
        load_gsm8k_items(path)


def test_bad_record_in_json_list_is_named_by_index(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([RECORDS[0], {"question": "How many?", "answer": ""}]), encoding="utf-8")
    r = cli("evaluate", "--model", str(tmp_path / "nope"), "--gsm8k", str(path))
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {path}: record 2: field 'answer': no number (no '####' in the answer): ''"


def test_file_problems_and_flag_clash(tmp_path, gsm8k_file):
    r = cli("evaluate", "--gsm8k", str(tmp_path / "missing.jsonl"))
    assert r.exit_code == 2 and r.output.strip() == f"error: {tmp_path / 'missing.jsonl'}: file not found"
    r = cli("evaluate", "--gsm8k", str(gsm8k_file), "--pairs", str(gsm8k_file))
    assert r.exit_code == 2 and r.output.strip() == "error: give --pairs FILE or --gsm8k FILE|hub, not both"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    r = cli("evaluate", "--gsm8k", str(empty))
    assert r.exit_code == 2 and r.output.strip() == f"error: {empty}: no GSM8K records"


def test_hub_without_datasets_gives_the_install_hint(monkeypatch):
    # The [gsm8k] extra is optional: without `datasets` (absent here, or hidden), one line says how to get it.
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    r = cli("evaluate", "--gsm8k", "hub")
    assert r.exit_code == 2
    assert r.output.strip() == (
        "error: --gsm8k hub: loading GSM8K from the Hugging Face Hub needs the 'datasets' package: "
        'pip install -e ".[gsm8k]" (or pip install datasets)'
    )
