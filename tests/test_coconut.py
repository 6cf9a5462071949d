"""Coconut on the latent-method seam: loading both checkpoint formats, the loop against an
official-style plain-PyTorch reference, batching, and the analyses on a Coconut model."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from codi_nnsight.data.synthetic import make_synthetic_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.methods import METHODS
from codi_nnsight.methods.coconut import COCONUT, parse_coconut_answer
from codi_nnsight.model.coconut_checkpoint import CoconutConfig, build_coconut
from codi_nnsight.model.wrapper import CODIModel, left_pad
from codi_nnsight.testing.tiny_coconut import write_tiny_coconut

FAMILIES = ("gpt2", "llama", "qwen2")
K = 4  # thoughts per question in the tiny models
TOL = 1e-9
QUESTIONS = (
    "Tom has 3 cats and 2 dogs. How many pets?",
    "A box holds 12 eggs; 5 break.",
    "Sam runs 4 km a day for 7 days. How far?",
)


def _shape(family: str) -> dict:
    return {"n_layers": 2, "kv_heads": None if family == "gpt2" else 2, "num_latent": K, "seed": 3}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """`{(family, format): coconut.json}` for every family in both formats (same weights per family)."""
    out = {}
    for family in FAMILIES:
        for fmt in ("meta", "hf"):
            d = tmp_path_factory.mktemp(f"coconut-{family}-{fmt}")
            out[family, fmt] = write_tiny_coconut(d, family=family, fmt=fmt, **_shape(family))
    return out


@pytest.fixture(scope="module")
def models(dirs) -> dict[str, CODIModel]:
    """float64 Coconut models (Meta's format), wrapped for nnsight from the builder's output."""
    out = {}
    for family in FAMILIES:
        module, tok, _ = build_coconut(CoconutConfig.from_json(dirs[family, "meta"]), dtype=torch.float64)
        out[family] = CODIModel(module, tokenizer=tok, config=None)
    return out


# ---------------------------------------------------------------------------------------------
# The method row
# ---------------------------------------------------------------------------------------------
def test_the_coconut_row():
    assert METHODS["coconut"] is COCONUT
    assert COCONUT.added_tokens == ("<|start-latent|>", "<|end-latent|>", "<|latent|>")
    assert [COCONUT.token_id(r, 50257) for r in ("start", "end")] == [50257, 50258]
    assert COCONUT.token_id("pad", 50257, eos_token_id=50256) == 50256  # pad = eos
    assert COCONUT.answer_prompt == "###" and COCONUT.config_file == "coconut.json"
    # The official evaluation reads the text after the last '#'.
    assert parse_coconut_answer("<<3*4=12>>\n### 12") == 12.0
    assert parse_coconut_answer("### 1,250") == 1250.0
    assert parse_coconut_answer("7 ### 8# -3") == -3.0
    assert parse_coconut_answer("### none") is None


def test_models_take_the_official_token_layout(models):
    for family, model in models.items():
        codi, tok = model.codi, model.tokenizer
        v = codi.vocab_size
        assert tok.convert_tokens_to_ids(list(COCONUT.added_tokens)) == [v, v + 1, v + 2], family
        assert len(tok) == v + 3 and codi.lm.get_input_embeddings().weight.shape[0] == v + 3
        assert (codi.bot_id, codi.eot_id, codi.pad_id) == (v, v + 1, tok.eos_token_id)
        assert tok.pad_token_id == tok.eos_token_id
        assert isinstance(codi.thought, torch.nn.Identity) and model.method is COCONUT


# ---------------------------------------------------------------------------------------------
# The loop against an official-style reference
# ---------------------------------------------------------------------------------------------
class Reference:
    """Coconut as the official `coconut.py` runs it, in plain transformers and PyTorch.

    Loads Meta's file itself (prefix stripped, duplicate embedding dropped) into a fresh
    transformers model, then runs K+1 passes sharing a KV cache with explicit position ids: the
    question and `<|start-latent|>`; each latent slot in turn, its input embedding replaced by
    the previous position's `hidden_states[-1]` (the final-norm state); the last slot, `<|end-latent|>`
    and any suffix. Attention is transformers' own: `eager` for GPT-2, `sdpa` for Llama/Qwen2, whose
    eager path takes the softmax in float32 and so could not agree to 1e-9 in float64.
    """

    def __init__(self, coconut_json: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = json.loads(coconut_json.read_text())
        root = coconut_json.parent
        self.tok = AutoTokenizer.from_pretrained(root / cfg["base"])
        self.tok.add_tokens(["<|start-latent|>", "<|end-latent|>", "<|latent|>"])
        self.start, self.end, self.latent = self.tok.convert_tokens_to_ids(
            ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]
        )
        hf = AutoConfig.from_pretrained(root / cfg["base"])
        hf.vocab_size = len(self.tok)
        attn = "eager" if hf.model_type == "gpt2" else "sdpa"
        self.lm = AutoModelForCausalLM.from_config(hf, attn_implementation=attn)
        sd = torch.load(root / cfg["checkpoint"], map_location="cpu", weights_only=True)
        inner = {k[len("base_causallm.") :]: v for k, v in sd.items() if k.startswith("base_causallm.")}
        self.lm.load_state_dict(inner, strict=True)
        self.lm.to(torch.float64).eval()
        self.K = cfg["num_latent"]
        # transformers 5.2x renamed `past_key_values` to `cache`
        self.cache_kw = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"

    def ids(self, question: str, suffix: list[int] | None = None) -> list[int]:
        """`question + "\\n"`, start, K latent slots, end, then `suffix`."""
        q = list(self.tok(question + "\n").input_ids)
        return q + [self.start] + [self.latent] * self.K + [self.end] + (suffix or [])

    @torch.no_grad()
    def loop(self, question: str, suffix: list[int] | None = None, before=None, thoughts=None):
        """The K+1 passes: (fed thoughts (K, d), the last pass's output, the latent slot's first
        index). `before(lo, k)` runs before pass k, which computes positions lo, lo + 1, …;
        `thoughts` = {k: vec} replaces the thought fed into slot k."""
        from transformers import DynamicCache

        ids = torch.tensor([self.ids(question, suffix)])
        emb = self.lm.get_input_embeddings()(ids).clone()
        pos = torch.arange(ids.shape[1])[None]
        first = int((ids[0] == self.latent).nonzero()[0])
        cache, lo, hi, fed = DynamicCache(), 0, first, []
        for k in range(self.K + 1):
            if before is not None:
                before(lo, k)
            out = self.lm(
                inputs_embeds=emb[:, lo:hi],
                position_ids=pos[:, lo:hi],
                use_cache=True,
                **{self.cache_kw: cache},
                output_hidden_states=True,
            )
            if k == self.K:
                return torch.stack(fed), out, first
            thought = out.hidden_states[-1][0, -1]
            if thoughts and k in thoughts:
                thought = thoughts[k]
            emb[0, first + k] = thought
            fed.append(thought)
            lo, hi = hi, (hi + 1 if k + 1 < self.K else ids.shape[1])
        raise AssertionError("unreachable")

    def run(self, question: str, suffix: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(thoughts (K, d), logits at the last position) for one question."""
        fed, out, _ = self.loop(question, suffix)
        return fed, out.logits[0, -1]


def _package_inputs(model: CODIModel, questions: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Left-padded `question + "\\n" <|start-latent|>` prompts, as the official data builds them."""
    seqs = [list(model.tokenizer(q + "\n").input_ids) + [model.codi.bot_id] for q in questions]
    return left_pad(seqs, model.codi.pad_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_loop_equals_the_official_k_plus_1_pass_reference(models, dirs, family):
    model, ref = models[family], Reference(dirs[family, "meta"])
    prompt = list(model.tokenizer("###", add_special_tokens=False).input_ids)
    suffix = torch.tensor([model.codi.eot_id] + prompt)
    inputs = _package_inputs(model, QUESTIONS)
    assert (inputs["input_ids"][-1][-1] == ref.start) and ref.start == model.codi.bot_id
    with torch.no_grad():
        plain = model.codi(**inputs)  # suffix: <|end-latent|>
        prompted = model.codi(**inputs, suffix_ids=suffix)  # <|end-latent|> ###
    worst = 0.0
    for i, q in enumerate(QUESTIONS):  # batched, left-padded rows against batch-1 references
        thoughts, logits = ref.run(q)
        _, logits_prompted = ref.run(q, prompt)
        for got, want in (
            (plain["latents"][i], thoughts),
            (prompted["latents"][i], thoughts),
            (plain["logits"][i], logits),
            (prompted["logits"][i], logits_prompted),
        ):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=TOL)
            worst = max(worst, float((got - want).abs().max()))
    # Not vacuous: the thoughts are far from any token embedding and move the answer.
    assert float(plain["latents"].norm(dim=-1).min()) > 1.0
    assert float((plain["logits"] - prompted["logits"]).abs().max()) > 1e-3
    assert worst <= TOL


class PatchingReference(Reference):
    """The official-style loop with plain forward hooks: records a site's output at every latent
    slot and patches it, or replaces a fed-back thought, one question at a time."""

    def site(self, layer: int, component: str) -> torch.nn.Module:
        inner = self.lm.transformer.h if hasattr(self.lm, "transformer") else self.lm.model.layers
        block = inner[layer]
        attn = block.attn if hasattr(block, "attn") else block.self_attn
        return {"resid": block, "attn": attn, "head": getattr(attn, "c_proj", None) or getattr(attn, "o_proj", None)}[
            component
        ]

    @torch.no_grad()
    def patched(self, question, suffix, component, patch=None, head=None, thoughts=None):
        """(thoughts, logits, {layer: (K, d) site outputs at the slots}); `patch` = {layer: {k: vec}}
        writes slot k's site output, `thoughts` = {k: vec} replaces the thought fed into slot k."""

        n_layers = self.lm.config.num_hidden_layers
        records = {i: [] for i in range(n_layers)}
        slot = {"k": None}  # the latent slot the current pass starts with (None: the question)

        def post(i):
            def hook(mod, args, out):
                h = out[0] if isinstance(out, tuple) else out
                if slot["k"] is not None:
                    if patch and i in patch and slot["k"] in patch[i]:
                        h = h.clone()
                        h[:, 0] = patch[i][slot["k"]]
                        out = (h, *out[1:]) if isinstance(out, tuple) else h
                    records[i].append(h[0, 0].clone())
                return out

            return hook

        def pre(i):  # `head`: the heads' outputs side by side, the input of the output projection
            def hook(mod, args):
                x = args[0]
                if slot["k"] is not None:
                    if patch and i in patch and slot["k"] in patch[i]:
                        x = x.clone()
                        x[:, 0, head] = patch[i][slot["k"]][head]
                    records[i].append(x[0, 0].clone())
                return (x, *args[1:])

            return hook

        mods = [self.site(i, component) for i in range(n_layers)]
        if component == "head":
            handles = [m.register_forward_pre_hook(pre(i)) for i, m in enumerate(mods)]
        else:
            handles = [m.register_forward_hook(post(i)) for i, m in enumerate(mods)]
        try:
            fed, out, _ = self.loop(
                question, suffix, before=lambda lo, k: slot.update(k=None if k == 0 else k - 1), thoughts=thoughts
            )
        finally:
            for h in handles:
                h.remove()
        return fed, out.logits[0, -1], {i: torch.stack(v) for i, v in records.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_equals_a_plain_hook_computation(models, dirs, family):
    """resid, attn, one head and the fed-back thought, each thought in turn, against the hooks above."""
    from codi_nnsight.patching.plan import answer_tokens
    from codi_nnsight.patching.sites import head_dim
    from codi_nnsight.patching.sweep import patch_sweep

    model, ref = models[family], PatchingReference(dirs[family, "meta"])
    pair = make_synthetic_pairs(1, seed=5)[0]
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    assert toks.suffix[0] == model.codi.eot_id  # <|end-latent|>, then the answer prompt
    suffix = list(toks.suffix[1:])
    hd = head_dim(model)
    checked = 0
    for component in ("resid", "attn", "head", "latent"):
        ds = patch_sweep(model, [pair], component=component, positions="each", batch_size=1)
        if component == "head":
            ds = ds.sel(head=1)
        site = "resid" if component == "latent" else component
        thoughts, _, source = ref.patched(pair.clean.question, suffix, site)
        _, base_logits, _ = ref.patched(pair.corrupted.question, suffix, site)
        lb = torch.log_softmax(base_logits, -1)
        for li, layer in enumerate(ds["layer"].values):
            for k in range(model.num_latent):
                if component == "latent":
                    _, logits, _ = ref.patched(pair.corrupted.question, suffix, site, thoughts={k: thoughts[k]})
                else:
                    patch = {int(layer): {k: source[int(layer)][k]}}
                    head = slice(hd, 2 * hd) if component == "head" else None
                    _, logits, _ = ref.patched(pair.corrupted.question, suffix, component, patch=patch, head=head)
                lp = torch.log_softmax(logits, -1)
                want = float((lp.exp() * (lp - lb)).sum())
                got = float(ds["kl"].isel(pair=0, layer=li).sel(position=k))
                assert abs(got - want) < TOL, (component, int(layer), k, got, want)
                checked += want > 1e-6
    assert checked > 10  # the patches move the answer: the comparison is not between zeros


@pytest.mark.parametrize("family,component", [("gpt2", "latent"), ("llama", "resid"), ("qwen2", "attn")])
def test_zero_ablation_equals_a_plain_hook_computation(models, dirs, family, component):
    """Zeroing a site of the clean run at thought k, against the same hooks (KL to the clean run)."""
    from codi_nnsight.patching.plan import answer_tokens
    from codi_nnsight.patching.sweep import patch_sweep

    model, ref = models[family], PatchingReference(dirs[family, "meta"])
    pair = make_synthetic_pairs(1, seed=6)[0]
    layer = model.n_layers - 1
    ds = patch_sweep(model, [pair], component=component, layers=[layer], positions="each", ablation="zero")
    suffix = list(answer_tokens(model, pair.clean.answer, pair.corrupted.answer).suffix[1:])
    site = "resid" if component == "latent" else component
    thoughts, clean_logits, _ = ref.patched(pair.clean.question, suffix, site)
    lc = torch.log_softmax(clean_logits, -1)
    zero = torch.zeros_like(thoughts[0])
    moved = 0
    for k in range(model.num_latent):
        if component == "latent":
            _, logits, _ = ref.patched(pair.clean.question, suffix, site, thoughts={k: zero})
        else:
            _, logits, _ = ref.patched(pair.clean.question, suffix, site, patch={layer: {k: zero}})
        lp = torch.log_softmax(logits, -1)
        want = float((lp.exp() * (lp - lc)).sum())
        assert abs(float(ds["kl"].isel(pair=0, layer=0).sel(position=k)) - want) < TOL
        moved += want > 1e-6
    # The last block's output at the last slot reaches nothing (it is not fed back, and later
    # positions read only earlier blocks' keys): exactly 0 there; every other ablation moves the answer.
    assert moved >= model.num_latent - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_at_the_thoughts_equals_a_plain_hook_computation(models, dirs, family):
    """The lens at every thought slot and layer: the final norm and LM head of the block's output there."""
    from codi_nnsight.readouts.lens import logit_lens

    model, ref = models[family], PatchingReference(dirs[family, "meta"])
    pairs = make_synthetic_pairs(1, seed=7)
    lens = logit_lens(model, pairs, top_k=3)
    steps = [str(s) for s in lens["step"].values]
    norm = ref.lm.transformer.ln_f if hasattr(ref.lm, "transformer") else ref.lm.model.norm
    for variant in ("clean", "corrupted"):
        _, _, blocks = ref.patched(getattr(pairs[0], variant).question, [], "resid")
        for layer in range(model.n_layers):
            with torch.no_grad():
                probs = torch.softmax(ref.lm.lm_head(norm(blocks[layer])), -1)  # (K, V)
            top_p, top_i = probs.topk(3, dim=-1)
            cell = lens.isel(pair=0).sel(variant=variant, layer=layer)
            for k in range(model.num_latent):
                at = cell.isel(step=steps.index(str(k)))
                assert np.array_equal(at["top_ids"].values, top_i[k].numpy())
                assert np.abs(at["top_prob"].values - top_p[k].numpy()).max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_1_equals_batch_4_in_the_sweep(models, family):
    from codi_nnsight.patching.sweep import patch_sweep

    model = models[family]
    pairs = make_synthetic_pairs(4, seed=5)
    for component in ("resid", "latent"):
        runs = {bs: patch_sweep(model, pairs, component=component, positions="each", batch_size=bs) for bs in (1, 4)}
        xr.testing.assert_allclose(runs[1].drop_attrs(), runs[4].drop_attrs(), rtol=0, atol=TOL)
        assert runs[1].attrs["latent_method"] == "coconut"
        assert float(np.nanmax(np.abs(runs[1]["kl"].values))) > 1e-6  # the patches do something


def test_the_last_blocks_output_is_the_next_thought(models):
    """Thought k+1 is the final norm of the last block's output at thought k's slot, and that output
    feeds no key or value: patching it is patching thought k+1 exactly (the fed-back route)."""
    from codi_nnsight.patching.sweep import patch_sweep

    model = models["gpt2"]
    pairs = make_synthetic_pairs(3, seed=7)
    last = model.n_layers - 1
    resid = patch_sweep(model, pairs, layers=[last], component="resid", positions="each")
    latent = patch_sweep(model, pairs, component="latent", positions="each")
    for k in range(K - 1):
        for name in ("kl", "logprob_diff"):
            np.testing.assert_allclose(
                resid[name].sel(position=k).values[:, 0],
                latent[name].sel(position=k + 1).values[:, 0],
                rtol=0,
                atol=TOL,
                err_msg=f"{name} at thought {k}",
            )
    assert np.abs(latent["kl"].values).max() > 1e-6
    assert latent.attrs["latent_method"] == resid.attrs["latent_method"] == "coconut"


def test_analyses_run_on_a_coconut_model(models):
    from codi_nnsight.patching.ablation import early_exit
    from codi_nnsight.readouts.lens import logit_lens

    model = models["qwen2"]
    pairs = make_synthetic_pairs(2, seed=11)
    lens = logit_lens(model, pairs, top_k=3)
    assert lens.sizes["layer"] == model.n_layers and lens.attrs["latent_method"] == "coconut"
    exits = early_exit(model, pairs, steps=[0, K])
    assert list(exits["n_latent"].values) == [0, K] and exits.attrs["latent_method"] == "coconut"


# ---------------------------------------------------------------------------------------------
# Both formats, and refusals
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_both_formats_load_to_identical_weights(dirs, family):
    built = {fmt: build_coconut(CoconutConfig.from_json(dirs[family, fmt])) for fmt in ("meta", "hf")}
    assert [built[f][2]["format"] for f in ("meta", "hf")] == ["meta", "hf"]
    a, b = (built[f][0].state_dict() for f in ("meta", "hf"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ta, tb = built["meta"][1], built["hf"][1]
    assert ta.get_vocab() == tb.get_vocab()


def _meta_copy(dirs, tmp_path: Path, edit) -> tuple[Path, Path]:
    """A copy of the tiny GPT-2 in Meta's format whose state_dict went through `edit`; (json, checkpoint)."""
    import shutil

    src = dirs["gpt2", "meta"].parent
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    cfg = CoconutConfig.from_json(dst / "coconut.json")
    ckpt = Path(cfg.checkpoint_path)
    sd = torch.load(ckpt, weights_only=True)
    torch.save(edit(sd), ckpt)
    return dst / "coconut.json", ckpt


def _refusal(path: Path) -> str:
    with pytest.raises(UserError) as e:
        build_coconut(CoconutConfig.from_json(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


class _Print:
    """Pickles as a call of `print`: a harmless stand-in for code in a checkpoint."""

    def __reduce__(self):
        return (print, ("a checkpoint ran code",))


def test_a_pickle_with_code_is_refused(dirs, tmp_path, capsys):
    path, ckpt = _meta_copy(dirs, tmp_path, lambda sd: {**sd, "payload": _Print()})
    assert _refusal(path) == (
        f"{ckpt}: refused: the pickle calls print, not only tensors; a checkpoint that can run code "
        "is never loaded (torch.load weights_only=True): re-save it as a plain state_dict"
    )
    assert "ran code" not in capsys.readouterr().out


def test_a_stage_0_file_is_refused(dirs, tmp_path):
    def plain(sd):
        return {k[len("base_causallm.") :]: v for k, v in sd.items() if k.startswith("base_causallm.")}

    path, ckpt = _meta_copy(dirs, tmp_path, plain)
    assert _refusal(path) == (
        f"{ckpt}: no key starts with 'base_causallm.' and the base config has no latent_id: a plain model "
        "(e.g. a stage-0 CoT checkpoint), not Coconut; load it as a plain LM, or give a Coconut checkpoint"
    )


def test_a_wrong_embedding_shape_is_refused(dirs, tmp_path):
    def base_vocab(sd):  # the embedding without the three latent rows, consistently in every copy
        for k in ("base_causallm.transformer.wte.weight", "base_causallm.lm_head.weight", "embedding.weight"):
            sd[k] = sd[k][:-3].clone()
        return sd

    path, ckpt = _meta_copy(dirs, tmp_path, base_vocab)
    assert _refusal(path) == (
        f"{ckpt}: base_causallm.transformer.wte.weight has shape (257, 32); this base needs (260, 32): "
        "257 base tokens + the 3 latent tokens, width 32"
    )


def test_a_mismatched_duplicate_embedding_is_refused(dirs, tmp_path):
    def nudge(sd):
        sd["embedding.weight"] = sd["embedding.weight"].clone()
        sd["embedding.weight"][259, 0] += 1e-3
        return sd

    path, ckpt = _meta_copy(dirs, tmp_path, nudge)
    assert _refusal(path) == (
        f"{ckpt}: embedding.weight differs from base_causallm.transformer.wte.weight; Meta's Coconut wrapper "
        "saves the same input embedding under both names, so this file is not one it wrote"
    )


def test_missing_and_unexpected_keys_are_refused(dirs, tmp_path):
    key = "base_causallm.transformer.h.1.mlp.c_fc.weight"
    path, ckpt = _meta_copy(dirs, tmp_path / "a", lambda sd: {k: v for k, v in sd.items() if k != key})
    assert _refusal(path) == f"{ckpt}: model weights missing from the checkpoint: {key}"
    extra = {"pause_embedding": torch.zeros(32), "base_causallm.transformer.h.9.ln_1.weight": torch.ones(32)}
    path, ckpt = _meta_copy(dirs, tmp_path / "b", lambda sd: {**sd, **extra})
    assert _refusal(path) == f"{ckpt}: checkpoint keys not used by a Coconut gpt2 model: pause_embedding"
    layer9 = "base_causallm.transformer.h.9.ln_1.weight"
    path, ckpt = _meta_copy(dirs, tmp_path / "c", lambda sd: {**sd, layer9: extra[layer9]})
    assert _refusal(path) == (f"{ckpt}: checkpoint keys not used by a Coconut gpt2 model: {layer9}")


def test_hf_latent_ids_must_match_the_tokenizer(dirs, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(dirs["gpt2", "hf"].parent, dst)
    config = json.loads((dst / "base" / "config.json").read_text())
    config["latent_id"], config["latent_start_id"] = config["latent_start_id"], config["latent_id"]
    (dst / "base" / "config.json").write_text(json.dumps(config))
    msg = _refusal(dst / "coconut.json")
    assert msg == (
        f"base {str(dst / 'base')!r}: config has latent_start_id=259, latent_end_id=258, latent_id=257; "
        "the tokenizer's latent tokens give latent_start_id=257, latent_end_id=258, latent_id=259"
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ({"method": "coconut", "base": "b", "checkpoint": "c", "k": 1}, "unknown key(s) 'k'; known keys: "),
        ({"base": "b", "checkpoint": "c"}, "missing required key 'method'"),
        ({"method": "codi", "base": "b", "checkpoint": "c"}, "key 'method' must be 'coconut', got \"codi\""),
        ({"method": "coconut", "base": "b", "checkpoint": "c", "num_latent": True}, "key 'num_latent' must be int"),
        ({"method": "coconut", "base": "b", "checkpoint": "c", "num_latent": -1}, "num_latent must be >= 0, got -1"),
    ],
)
def test_coconut_json_is_strict(data, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        CoconutConfig.from_dict(data, source="x/coconut.json")
    assert str(e.value).startswith("x/coconut.json: ") and "\n" not in str(e.value)


def test_a_meta_build_reads_no_weights(dirs, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(dirs["qwen2", "hf"].parent, dst)
    (dst / "ckpt" / "model.safetensors").unlink()
    module, tok, info = build_coconut(CoconutConfig.from_json(dst / "coconut.json"), meta=True)
    assert module.lm.get_input_embeddings().weight.is_meta and info["checkpoint_sha256"] == ""
    assert module.method is COCONUT and len(tok) == module.vocab_size + 3


def test_relative_paths_resolve_against_the_json(dirs):
    cfg = CoconutConfig.from_json(dirs["gpt2", "meta"])
    root = dirs["gpt2", "meta"].resolve().parent
    assert cfg.base_path == str(root / "base") and cfg.checkpoint_path == str(root / "ckpt" / f"checkpoint_{K}")
    again = CoconutConfig.from_dict(json.loads(cfg.to_json(resolved=True)))  # a remote model key round trip
    assert (again.base_path, again.checkpoint_path, again.num_latent) == (cfg.base_path, cfg.checkpoint_path, K)


def test_a_coconut_json_runs_through_load_model_and_the_cli(tmp_path):
    """`make-tiny --method coconut`, `--model <folder with coconut.json>`, the official prompt, every analysis."""
    from click.testing import CliRunner

    from codi_nnsight.cli import main
    from codi_nnsight.model.inference import evaluate_pairs
    from codi_nnsight.model.wrapper import load_model
    from codi_nnsight.patching.ablation import early_exit
    from codi_nnsight.patching.sweep import patch_sweep
    from codi_nnsight.readouts.lens import logit_lens

    args = ["make-tiny", "--out", str(tmp_path / "m"), "--method", "coconut", "--family", "gpt2", "--num-latent", "3"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "m").glob("*.json")) == ["coconut.json"]  # no codi.json beside it
    model = load_model(tmp_path / "m", dtype="float64", device="cpu")
    assert model.method is COCONUT and model.name == "tiny-coconut-gpt2" and model.checkpoint_sha256
    newline = model.tokenizer("\n", add_special_tokens=False).input_ids
    assert model.encode_question("Tom has 3 cats.")[-2:] == [*newline, model.codi.bot_id]
    pairs = make_synthetic_pairs(3, seed=1)
    sweep = patch_sweep(model, pairs, component=["resid", "latent"], positions="each")
    assert sweep.attrs["latent_method"] == "coconut" and sweep.attrs["checkpoint_sha256"]
    assert logit_lens(model, pairs).attrs["latent_method"] == "coconut"
    assert early_exit(model, pairs).attrs["latent_method"] == "coconut"
    assert len(evaluate_pairs(model, pairs, max_new_tokens=6)) == 6
    again = CODIModel._remoteable_from_model_key(model._remoteable_model_key(), dtype="float64")
    assert again.method is COCONUT
    for a, b in zip(model.codi.state_dict().values(), again.codi.state_dict().values()):
        assert torch.equal(a, b)


class TokenReference(Reference):
    """The official-style loop with a plain forward hook on one block that reads and writes its
    output at absolute token positions, whichever pass computes them."""

    @torch.no_grad()
    def logits(self, question, suffix, layer, patch=None, keep=None):
        """Answer-position logits; `patch` = {position: vector} writes block `layer`'s output there,
        `keep` (a dict) receives it at every position."""

        block = (self.lm.transformer.h if hasattr(self.lm, "transformer") else self.lm.model.layers)[layer]
        span = {"lo": 0}

        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            for i in range(h.shape[1]):
                t = span["lo"] + i
                if patch and t in patch:
                    h = h.clone()
                    h[0, i] = patch[t]
                if keep is not None:
                    keep[t] = h[0, i].clone()
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = block.register_forward_hook(hook)
        try:
            _, out, first = self.loop(question, suffix, before=lambda lo, k: span.update(lo=lo))
        finally:
            handle.remove()
        return out.logits[0, -1], first


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sequence_positions_equal_a_plain_hook_computation(models, dirs, family):
    """`positions="sequence"` on Coconut: question tokens, the start marker, each thought and the
    answer prompt (`<|end-latent|>` …), each against the hook above at the same absolute position."""
    from codi_nnsight.patching.plan import answer_tokens
    from codi_nnsight.patching.sweep import patch_sweep

    model, ref = models[family], TokenReference(dirs[family, "meta"])
    pair = next(
        p
        for p in make_synthetic_pairs(8, seed=5)
        if len(model.encode_question(p.clean.question)) == len(model.encode_question(p.corrupted.question))
    )
    suffix = list(answer_tokens(model, pair.clean.answer, pair.corrupted.answer).suffix[1:])
    ds = patch_sweep(model, [pair], layers=[0, 1], positions="sequence", batch_size=1)
    K = model.num_latent
    checked = 0
    for layer in (0, 1):
        clean: dict[int, torch.Tensor] = {}
        _, first = ref.logits(pair.clean.question, suffix, layer, keep=clean)
        base, _ = ref.logits(pair.corrupted.question, suffix, layer)
        lb = torch.log_softmax(base, -1)
        changed = [int(p) for p in ds.position.values if ds["changed"].sel(pair=pair.pair_id, position=p)]
        for p in [*changed, changed[-1] + 1, -1, 0, K - 1, K, K + 1]:
            logits, _ = ref.logits(pair.corrupted.question, suffix, layer, patch={first + p: clean[first + p]})
            lp = torch.log_softmax(logits, -1)
            want = float((lp.exp() * (lp - lb)).sum())
            got = float(ds["kl"].sel(pair=pair.pair_id, layer=layer, position=p))
            assert abs(got - want) < TOL, (family, layer, p, got, want)
            checked += want > 1e-8
    assert checked >= 4  # the patches move the answer: the comparison is not between zeros
