"""Patching at every token (`positions="sequence"`): question tokens, [bot], thoughts and the answer
prompt, each equal to an independent plain-hook computation on the official-style loop
(tests/reference.py), plus the axis's labels, its invariants and its refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from codi_nnsight.data.pairs import Pair, PairSet, Question
from codi_nnsight.errors import UserError
from codi_nnsight.patching.plan import answer_tokens
from codi_nnsight.patching.sweep import patch_sweep

TOL = 1e-9


def pairs_of(*numbers: tuple[int, int], tail: str = "and 4 dogs. How many pets?") -> PairSet:
    rows = []
    for i, (a, b) in enumerate(numbers):
        clean = Question(f"Sam has {a} cats {tail}", a + 4, {})
        corrupted = Question(f"Sam has {b} cats {tail}", b + 4, {})
        rows.append(Pair(i, clean, corrupted))
    return PairSet.from_pairs(rows)


@torch.no_grad()
def reference_logits(ref, question: str, suffix: list[int], layer: int, patch: dict | None = None, keep=None):
    """Answer-position logits of the official loop; `patch` = {(call, token): vector} replaces block
    `layer`'s output there (call 0 = the question, 1..K the thoughts, K+1 the suffix); `keep`
    (a dict) receives every call's full block output."""
    call = {"n": 0}

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if keep is not None:
            keep[call["n"]] = h[0].clone()
        for (c, t), v in (patch or {}).items():
            if c == call["n"]:
                h = h.clone()
                h[0, t] = v
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handle = ref.site(layer, "resid").register_forward_hook(hook)
    try:
        ids = torch.tensor([ref.tok(question).input_ids + [ref.bot]])
        cache = DynamicCache()
        out = ref._call(cache, input_ids=ids)
        for _ in range(ref.num_latent):
            call["n"] += 1
            out = ref._call(cache, inputs_embeds=ref.prj(out.hidden_states[-1][:, -1:, :]))
        call["n"] += 1
        out = ref._call(cache, inputs_embeds=ref.embed(torch.tensor([suffix])))
    finally:
        handle.remove()
    return out.logits[0, -1]


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((lp.exp() * (lp - lq)).sum())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_kind_of_position_equals_a_plain_hook_patch(tiny_models, references, family):
    model, ref = tiny_models[family], references[family]
    pairs = pairs_of((3, 5))
    ds = patch_sweep(model, pairs, layers=[0, 1], positions="sequence", batch_size=1)
    pair = pairs[0]
    suffix = answer_tokens(model, pair.clean.answer, pair.corrupted.answer).suffix
    n_q = len(ref.tok(pair.clean.question).input_ids) + 1
    K = model.num_latent
    clean = {}
    for layer in (0, 1):
        reference_logits(ref, pair.clean.question, suffix, layer, keep=clean.setdefault(layer, {}))
    base = reference_logits(ref, pair.corrupted.question, suffix, 0)
    changed = [p for p in ds.position.values if ds["changed"].sel(pair=0, position=p)]
    assert len(changed) >= 1
    # the changed number, a question token after it, [bot], a thought, an answer-prompt token, the last one
    checked = [changed[0], changed[-1] + 2, -1, 1, K + 1, K + len(suffix) - 1]
    for layer in (0, 1):
        for p in checked:
            call, token = (0, n_q + p) if p < 0 else (p + 1, 0) if p < K else (K + 1, p - K)
            want = kl(
                reference_logits(
                    ref, pair.corrupted.question, suffix, layer, {(call, token): clean[layer][call][token]}
                ),
                base,
            )
            got = float(ds["kl"].sel(pair=0, layer=layer, position=p))
            assert abs(got - want) < TOL, (family, layer, p, got, want)


def test_the_axis_labels_every_token(tiny_models):
    model = tiny_models["gpt2"]
    ds = patch_sweep(model, pairs_of((3, 5)), layers=[0], positions="sequence", batch_size=1)
    K = model.num_latent
    kinds = list(ds["position_kind"].values)
    assert kinds[-1] == "answer prompt" and kinds[0] == "question"
    assert [ds.position.values[i] for i, k in enumerate(kinds) if k == "thought"] == list(range(K))
    assert [ds.position.values[i] for i, k in enumerate(kinds) if k == "bot"] == [-1]  # GPT-2 CODI: [bot] alone
    tokens = ds["token"].sel(pair=0).values  # the target's (denoise: the corrupted question's)
    assert "".join(t for t, k in zip(tokens, kinds) if k == "question") == "Sam has 5 cats and 4 dogs. How many pets?"
    changed = ds["changed"].sel(pair=0).values
    assert [t for t, c in zip(tokens, changed) if c] == ["5"]  # the changed number, and only it
    assert [t for t, k in zip(tokens, kinds) if k == "bot"] == ["[bot]"]
    prompt = [t for t, k in zip(tokens, kinds) if k == "answer prompt"]
    assert prompt[0] == "[eot]" and "".join(prompt[1:]).strip() == "The answer is:"


def test_tokens_before_the_changed_number_and_last_layer_question_tokens_change_nothing(tiny_models):
    """Invariants: before the changed number both runs are identical (causal), so patching them is
    a no-op; the last block's output at a question token reaches nothing (later tokens read the
    block's input as keys and values; only the last prompt token feeds the first thought)."""
    model = tiny_models["llama"]
    ds = patch_sweep(model, pairs_of((3, 5)), positions="sequence", batch_size=1)
    kinds = ds["position_kind"].values
    first_changed = int(ds.position.values[ds["changed"].sel(pair=0).values.argmax()])
    before = ds["kl"].sel(pair=0, position=ds.position.values[ds.position.values < first_changed])
    assert float(np.abs(before).max()) < 1e-12
    last = model.n_layers - 1
    question = ds["kl"].sel(pair=0, layer=last).values[kinds == "question"]
    assert float(np.abs(question).max()) < 1e-12
    assert float(ds["kl"].sel(pair=0, layer=last, position=-1)) > 1e-8  # [bot] feeds thought 0


def test_batch_size_does_not_change_the_numbers_and_short_pairs_are_nan(tiny_models):
    model = tiny_models["gpt2"]
    pairs = pairs_of((3, 5), (12, 17), (6, 8))  # pair 1 is one token longer: pairs 0 and 2 lack the first position
    one = patch_sweep(model, pairs, layers=[0, 1], positions="sequence", batch_size=1)
    three = patch_sweep(model, pairs, layers=[0, 1], positions="sequence", batch_size=3)
    for name in ("kl", "logit_diff", "logprob_diff"):
        a, b = one[name].values, three[name].values
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        # different prompt counts per trace: other kernel shapes, float64 rounding only
        assert np.nanmax(np.abs(a - b)) < 1e-12, name
    first = one.position.values[0]
    assert np.isnan(one["kl"].sel(pair=0, position=first)).all()
    assert np.isfinite(one["kl"].sel(pair=1, position=first)).all()
    assert one["token"].sel(pair=0, position=first).item() == ""
    assert one.attrs["sanity_passed"] == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"component": "latent"},
            "--positions sequence patches the blocks at every token; --component latent exists only at the "
            "thoughts (use --positions each)",
        ),
        ({"mode": "block-all-feedback"}, "--positions sequence runs --mode recurrent only, not block-all-feedback"),
        ({"ablation": "zero"}, "--positions sequence patches from the source run; it takes no --ablation"),
    ],
)
def test_what_a_sequence_sweep_refuses(tiny_models, kwargs, message):
    with pytest.raises(UserError) as e:
        patch_sweep(tiny_models["gpt2"], pairs_of((3, 5)), positions="sequence", **kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_a_changed_number_of_another_length_aligns_the_rest_and_leaves_its_own_tokens_out(
    tiny_models, references, direction
):
    """9 -> 10 (one character token -> two): tokens before the number take the source's token at the
    same index from the start, tokens after it the one at the same offset from the end; the
    number's own tokens have no counterpart (NaN, `patched` 0, `changed` 1). Against the
    plain-hook loop."""
    model, ref = tiny_models["gpt2"], references["gpt2"]
    pair = pairs_of((9, 10))[0]
    src, tgt = (pair.clean, pair.corrupted) if direction == "denoise" else (pair.corrupted, pair.clean)
    ds = patch_sweep(model, [pair], layers=[0], positions="sequence", direction=direction, batch_size=1)
    suffix = answer_tokens(model, pair.clean.answer, pair.corrupted.answer).suffix
    n_t, n_s = (len(ref.tok(q.question).input_ids) + 1 for q in (tgt, src))
    assert {n_t, n_s} == {42, 43}
    span = [int(p) for p in ds.position.values if ds["changed"].sel(pair=0, position=p)]
    assert "".join(ds["token"].sel(pair=0, position=span).values) == ("10" if direction == "denoise" else "9")
    assert np.isnan(ds["kl"].sel(pair=0, position=span)).all() and not ds["patched"].sel(pair=0, position=span).any()
    keep: dict = {}
    reference_logits(ref, src.question, suffix, 0, keep=keep)
    base = reference_logits(ref, tgt.question, suffix, 0)
    for p in (-n_t + 3, span[0] - 1, span[-1] + 1, span[-1] + 4, -1):
        i_t = n_t + p
        i_s = i_t if p < span[0] else n_s + p  # from the start before the number, from the end after it
        want = kl(reference_logits(ref, tgt.question, suffix, 0, {(0, i_t): keep[0][i_s]}), base)
        got = float(ds["kl"].sel(pair=0, layer=0, position=p))
        assert abs(got - want) < TOL, (direction, p, got, want)
        assert want > 1e-12 or p < span[0]  # after the number the patch moves the answer


def test_other_sweeps_keep_their_fingerprints(tiny_models):
    """The sequence axis's extent enters only sequence runs' fingerprints: resuming an older partial
    store of an `each` or `all` sweep still matches."""
    from codi_nnsight.patching.config import SweepConfig

    fp = SweepConfig(layers=[0], positions="each").fingerprint(tiny_models["gpt2"], "x", 0)
    assert "question_tokens" not in fp and "suffix_tokens" not in fp
    seq = SweepConfig(layers=[0], positions="sequence", question_tokens=5, suffix_tokens=3)
    assert seq.fingerprint(tiny_models["gpt2"], "x", 0)["question_tokens"] == 5


def test_its_thoughts_are_the_each_sweep(tiny_models):
    model = tiny_models["llama"]
    pairs = pairs_of((3, 5), (6, 8))
    seq = patch_sweep(model, pairs, positions="sequence", batch_size=2)
    each = patch_sweep(model, pairs, positions="each", batch_size=2)
    for name in ("kl", "logit_diff", "logprob_diff", "flipped"):
        a = seq[name].sel(position=list(range(model.num_latent))).values
        # other prompts in the trace (each question token has its own): float64 rounding only
        np.testing.assert_allclose(a, each[name].values, rtol=0, atol=1e-12, err_msg=name)


def test_region_means_take_each_pairs_largest_token_then_average(tiny_models):
    """region_means by hand: a pair's value in a region is its largest over the region's tokens."""
    from codi_nnsight.analysis.sequence import region_means

    model = tiny_models["gpt2"]
    ds = patch_sweep(model, pairs_of((3, 5), (12, 17)), layers=[0], positions="sequence", batch_size=2)
    kl = ds["kl"].sel(layer=0)
    kinds = ds["position_kind"].values
    want = []
    for i in range(2):
        row = kl.isel(pair=i).values
        changed = ds["changed"].isel(pair=i).values > 0
        last = np.flatnonzero(changed)[-1]
        after = [j for j in range(len(row)) if kinds[j] == "question" and j > last]
        want.append(np.nanmax(row[after]))
    got = region_means(ds).sel(region="after the number", layer=0).item()
    assert got == pytest.approx(np.mean(want), abs=1e-15)
    changed_got = region_means(ds).sel(region="changed number", layer=0).item()
    per_pair = [np.nanmax(kl.isel(pair=i).values[ds["changed"].isel(pair=i).values > 0]) for i in range(2)]
    assert changed_got == pytest.approx(np.mean(per_pair), abs=1e-15)


def test_cli_patch_and_report_name_the_positions(tiny_dirs, tmp_path):
    from click.testing import CliRunner

    from codi_nnsight.cli import main

    out = tmp_path / "seq.nc"
    args = ["patch", "--model", tiny_dirs["gpt2"], "--dtype", "float64", "--limit", "2", "--positions", "sequence"]
    r = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    assert "largest mean KL at layer" in line and "sanity checks passed" in line
    # a position is named by what sits there, never "thought 11" for an answer-prompt token
    assert re.search(
        r"at layer \d+, (question token -\d+|\[bot\]|thought [0-2]|answer prompt token \d+ \('.*'\)) \(", line
    )
    r = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert text.index("**Finding along the sequence:**") < text.index("**Finding:**")
    assert "figures/sequence_kl.png" in text and (tmp_path / "rep" / "figures" / "sequence_kl.png").is_file()


def test_position_labels_say_what_sits_there(tiny_models):
    from codi_nnsight.patching.summary import position_label

    model = tiny_models["gpt2"]
    ds = patch_sweep(model, pairs_of((3, 5)), layers=[0], positions="sequence", batch_size=1)
    K = model.num_latent
    assert position_label(ds, -5) == "question token -5"
    assert position_label(ds, -1) == "[bot]"
    assert position_label(ds, 1) == "thought 1"
    assert position_label(ds, K) == "answer prompt token 0 ('[eot]')"


def test_metric_functions_that_read_thoughts_work_on_the_sequence_axis(tiny_models):
    """A sequence sweep walks the question's call too: a metric reading thoughts sees thought 0
    there, and its values at the thoughts equal the `each` sweep's."""
    from codi_nnsight.data.synthetic import make_toy_pairs
    from codi_nnsight.patching.metrics import gold_value_prob

    model = tiny_models["llama"]
    pairs = [
        p
        for p in make_toy_pairs(12, seed=3)
        if len(model.encode_question(p.clean.question)) == len(model.encode_question(p.corrupted.question))
    ][:3]
    metrics = {"p1": gold_value_prob(1)}
    kw = {"layers": [0, 2], "metrics": metrics}
    seq = patch_sweep(model, pairs, positions="sequence", batch_size=3, **kw)
    one = patch_sweep(model, pairs, positions="sequence", batch_size=1, **kw)
    each = patch_sweep(model, pairs, positions="each", batch_size=3, **kw)
    np.testing.assert_allclose(seq["p1"].values, one["p1"].values, rtol=0, atol=1e-12)
    at_thoughts = seq["p1"].sel(position=list(range(model.num_latent))).values
    np.testing.assert_allclose(at_thoughts, each["p1"].values, rtol=0, atol=1e-12)
    assert np.isfinite(at_thoughts).any()


def test_a_sequence_sweep_runs_remotely_as_here(tiny_models):
    """remote="local": the trace is serialized as for NDIF and run here — the token patches
    (index tensors, the question's and the suffix's calls) travel as they are."""
    model = tiny_models["llama"]
    pairs = pairs_of((3, 5), (6, 8))
    here = patch_sweep(model, pairs, layers=[0, 2], positions="sequence", batch_size=2)
    there = patch_sweep(model, pairs, layers=[0, 2], positions="sequence", batch_size=2, remote="local")
    for name in ("kl", "logit_diff", "logprob_diff", "flipped"):
        np.testing.assert_allclose(here[name].values, there[name].values, rtol=0, atol=1e-9, err_msg=name)
    assert there.attrs["remote"] == "local" and there.attrs["sanity_passed"] == 1


def test_models_are_compared_on_a_sequence_sweeps_thoughts(tiny_models):
    """Token axes follow each model's tokenizer; thoughts are comparable (and are the `each` patches)."""
    from codi_nnsight.analysis import compare_models
    from codi_nnsight.analysis.sequence import thought_view

    pairs = pairs_of((3, 5), (6, 8))
    a = patch_sweep(tiny_models["gpt2"], pairs, layers=[0, 1], positions="sequence", batch_size=2)
    b = patch_sweep(tiny_models["qwen2"], pairs, layers=[0, 1], positions="sequence", batch_size=2)
    both = compare_models([a, b], names=["g", "q"])
    assert list(both.position.values) == list(range(tiny_models["gpt2"].num_latent))
    np.testing.assert_array_equal(both["kl"].sel(model="q").values, thought_view(b)["kl"].values)


def test_chosen_tokens_are_the_full_sweeps_numbers_at_those_tokens(tiny_models):
    """`tokens=`: a subset of the axis, each value the full sweep's; `number` is each pair's own
    changed tokens (at other offsets in other pairs: NaN for a pair where the offset is not its number)."""
    model = tiny_models["gpt2"]
    pairs = pairs_of((3, 5), (12, 17))  # pair 1 is one token longer: its number sits one offset earlier
    full = patch_sweep(model, pairs, layers=[0, 1], positions="sequence", batch_size=2)
    some = patch_sweep(
        model, pairs, layers=[0, 1], positions="sequence", batch_size=2, tokens=["number", "bot", -5, "thoughts"]
    )
    K = model.num_latent
    numbers = sorted(
        {int(p) for i in range(2) for p in full.position.values if full["changed"].isel(pair=i).sel(position=p)}
    )
    assert list(some.position.values) == sorted({*numbers, -5, -1, *range(K)})
    for i in range(2):
        own = {int(p) for p in full.position.values if full["changed"].isel(pair=i).sel(position=p)}
        for p in some.position.values:
            got, want = some["kl"].isel(pair=i).sel(position=p).values, full["kl"].isel(pair=i).sel(position=p).values
            if p in numbers and p not in own and p != -5:
                assert np.isnan(got).all(), (i, p)
            else:
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"pair {i} position {p}")
    assert some.attrs["tokens"] and some.attrs["sanity_passed"] == 1
    patched = some["patched"].values  # 0 exactly where the values are NaN
    assert np.array_equal(patched == 0, np.isnan(some["kl"].isel(layer=0).values))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"positions": "each", "tokens": ["bot"]},
            "--tokens chooses tokens of a --positions sequence sweep; add --positions sequence",
        ),
        (
            {"positions": "sequence", "tokens": ["numbers"]},
            "--tokens 'numbers': expected offsets from the first thought (ints, the question's negative) or "
            "question, number, bot, thoughts, answer",
        ),
        (
            {"positions": "sequence", "tokens": [-500]},
            "--tokens -500: no pair has a token there (positions run from -42 to 18)",
        ),
    ],
)
def test_token_choices_refused_in_one_line(tiny_models, kwargs, message):
    with pytest.raises(UserError) as e:
        patch_sweep(tiny_models["gpt2"], pairs_of((3, 5)), **kwargs)
    assert str(e.value) == message


def test_cli_tokens_chooses_positions_and_a_bad_choice_is_one_line(tiny_dirs, tmp_path):
    import xarray as xr
    from click.testing import CliRunner

    from codi_nnsight.cli import main

    base = ["patch", "--model", tiny_dirs["gpt2"], "--dtype", "float64", "--limit", "2", "--positions", "sequence"]
    out = tmp_path / "t.nc"
    r = CliRunner().invoke(main, [*base, "--tokens", "bot,thoughts,-3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    with xr.open_dataset(out) as ds:
        assert list(ds.position.values) == [-3, -1, 0, 1, 2]
        assert ds.attrs["sanity_passed"] == 1
    r = CliRunner().invoke(main, [*base, "--tokens", "numbers", "--out", str(tmp_path / "u.nc")])
    assert r.exit_code == 2
    assert r.output.strip() == (
        "error: --tokens 'numbers': expected offsets from the first thought (ints, the question's negative) "
        "or question, number, bot, thoughts, answer"
    )
    assert not (tmp_path / "u.nc").exists()
