"""Rows sharing a prompt's prefill, laid out in buckets of prompts with the same number of rows."""

from __future__ import annotations

import pytest
import torch

from codi_nnsight.model.module import ATTENTION, SharedPrefix

TOL = 1e-9
QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many?",
    "What is 7-2?",
    "A box holds 12 eggs; 5 break. How many are left?",
    "Sam reads 9 pages a day for 3 days. How many pages?",
    "What is 5+6?",
]
#: Prompt of every row: 1, 5, 2, 5 and 0 rows (the last prompt is continued by no row), interleaved.
ROWS = [1, 0, 1, 2, 1, 3, 3, 1, 3, 1, 2, 3, 3]


def _rows_of(layout: SharedPrefix) -> list[list[int]]:
    """Each bucket's grid as nested lists of row indices."""
    return [b.slot.tolist() for b in layout.buckets]


def test_buckets_hold_every_row_once_without_padding():
    rows = torch.tensor([0, 1, 1, 1, 2, 3, 3, 3, 4, 5, 5, 5])  # counts 1, 3, 1, 3, 1, 3: two values
    layout = SharedPrefix.of(rows, 6)
    assert [b.slot.shape for b in layout.buckets] == [(3, 1), (3, 3)]
    slots = [r for grid in _rows_of(layout) for prompt_rows in grid for r in prompt_rows]
    assert sorted(slots) == list(range(len(rows)))  # every row exactly once: no padding slot
    order = layout.order.tolist()
    assert order == [0, 2, 4, 1, 3, 5]
    for b in layout.buckets:
        assert [b.start, b.stop] == ([0, 3] if b.slot.shape[1] == 1 else [3, 6])
        for prompt, prompt_rows in zip(order[b.start : b.stop], b.slot.tolist()):
            assert rows[prompt_rows].tolist() == [prompt] * len(prompt_rows)
            assert prompt_rows == sorted(prompt_rows)  # a prompt's rows in their batch order


def test_bucket_order_is_identity_when_prompts_are_grouped_and_skips_unused_prompts():
    grouped = SharedPrefix.of(torch.tensor([0, 0, 1, 1, 2, 3]), 5)  # prompt 4: no row
    assert grouped.order is None  # the shared keys stay views: no gather at `share`
    assert _rows_of(grouped) == [[[0, 1], [2, 3]], [[4], [5]]]
    skipped = SharedPrefix.of(torch.tensor([2, 0, 2]), 3)  # prompt 1: no row, in the middle
    assert skipped.order.tolist() == [0, 2]
    assert _rows_of(skipped) == [[[1]], [[0, 2]]]
    with pytest.raises(ValueError, match="row 1 continues prompt 3"):
        SharedPrefix.of(torch.tensor([0, 3]), 3)


@pytest.mark.parametrize(("heads", "kv_heads", "q"), [(4, 4, 1), (4, 2, 3), (6, 1, 2)])
def test_bucketed_matmul_equals_one_row_at_a_time(heads, kv_heads, q):
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor(ROWS)
    layout = SharedPrefix.of(rows, 5)
    assert len(layout.buckets) == 3 and layout.order is not None
    x = torch.randn(len(rows), q, heads, 8, generator=g, dtype=torch.float64).transpose(1, 2)  # as attention's
    shared = torch.randn(5, kv_heads, 8, 7, generator=g, dtype=torch.float64)
    got = layout.matmul(x, shared[layout.order], kv_heads)
    groups = heads // kv_heads
    for r, p in enumerate(ROWS):
        for h in range(heads):
            assert (got[r, h] - x[r, h] @ shared[p, h // groups]).abs().max() < 1e-12


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_uneven_shared_rows_equal_each_row_with_its_own_prompt(family, tiny_models, monkeypatch):
    """Rows of prompts with 1, 5, 2, 5 and 0 rows equal the same rows each given its prompt."""
    model = tiny_models[family]  # llama: 4 query heads on 2 kv heads
    assert model.codi.lm.config._attn_implementation == ATTENTION  # the shared path runs
    layouts = []
    of = SharedPrefix.of.__func__
    monkeypatch.setattr(SharedPrefix, "of", classmethod(lambda cls, *a: layouts.append(of(cls, *a)) or layouts[-1]))
    rows = torch.tensor(ROWS)
    g = torch.Generator().manual_seed(1)
    candidates = torch.randint(ord("0"), ord("9") + 1, (len(ROWS), 3, 2), generator=g)
    candidates[:, 1, 1] = -1  # one shorter candidate, right-padded
    suffix = torch.tensor([model.codi.eot_id] + model.tokenizer(" The answer is:", add_special_tokens=False).input_ids)
    kw = {"suffix_ids": suffix, "candidates": candidates, "max_new_tokens": 4}
    shared = model.codi(**model.prepare(QUESTIONS), rows=rows, **kw)
    assert len(layouts) == 1 and len(layouts[0].buckets) == 3 and layouts[0].order is not None
    separate = model.codi(**model.prepare([QUESTIONS[p] for p in ROWS]), **kw)
    assert len(layouts) == 1  # no sharing without `rows`
    for key in ("logits", "latents", "candidate_logprobs"):
        assert shared[key].shape == separate[key].shape
        assert (shared[key] - separate[key]).abs().max() < TOL, key
    assert torch.equal(shared["generated"], separate["generated"])  # argmax top-2 gaps >= 4e-2 here, logits < TOL
