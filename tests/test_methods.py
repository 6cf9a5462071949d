"""The latent-method seam: a method is one table row, and the loop, sites and answer prompt follow it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from codi_nnsight.data.synthetic import make_synthetic_pairs
from codi_nnsight.errors import UserError
from codi_nnsight.methods import CODI, METHODS, LatentMethod, method_named, register
from codi_nnsight.model.answers import extract_answer_number
from codi_nnsight.model.module import CODIModule
from codi_nnsight.model.wrapper import CODIModel
from codi_nnsight.patching.plan import answer_tokens
from codi_nnsight.patching.sweep import patch_sweep

#: A Coconut-shaped method for the seam's tests: its thought is the final-norm state itself (no
#: projection), its tokens come in another order, and its answer prompt is its own.
IDENTITY = LatentMethod(
    name="test-identity-feedback",
    description="test only: the last state fed back unchanged",
    added_tokens=("<start>", "<end>", "<latent>"),
    roles={"pad": None, "start": "<start>", "end": "<end>"},
    feedback="thought",
    feedback_doc="identity of the final-norm state",
    answer_prompt="###",
    config_file="test.json",
    parse_answer=extract_answer_number,
)


def test_codi_is_the_first_row():
    assert METHODS["codi"] is CODI and method_named("codi") is CODI
    assert CODI.token_id("pad", 100) == 100 and CODI.token_id("start", 100) == 101 and CODI.token_id("end", 100) == 102
    with pytest.raises(UserError) as e:
        method_named("coconutt")
    assert str(e.value) == "latent method 'coconutt': expected one of coconut, codi"


def test_a_method_cannot_be_registered_twice():
    register(IDENTITY)
    assert register(IDENTITY) is IDENTITY
    with pytest.raises(ValueError, match="registered already"):
        register(LatentMethod(**{**IDENTITY.__dict__}))
    del METHODS[IDENTITY.name]


def test_codi_models_name_their_method(tiny_models):
    model = tiny_models["gpt2"]
    assert model.method is CODI and model.codi.feedback is model.codi.prj
    assert model.codi.bot_ids() == [model.codi.vocab_size + 1]


@pytest.fixture(scope="module")
def identity_model(tiny_models):
    """The tiny GPT-2's weights under the test method: no projection, pad = eos, other token ids."""
    base = tiny_models["gpt2"]
    lm = copy.deepcopy(base.codi.lm)
    module = CODIModule(
        lm,
        torch.nn.Identity(),
        num_latent=base.num_latent,
        vocab_size=base.codi.vocab_size,
        eos_token_id=base.codi.eos_token_id,
        method=IDENTITY,
    )
    module.eval()
    return CODIModel(module, tokenizer=base.tokenizer, config=base.codi_config)


def test_the_loop_feeds_the_methods_thought(identity_model):
    """Each latent input embedding is the previous position's final-norm state (no projection)."""
    model = identity_model
    codi = model.codi
    assert codi.pad_id == codi.eos_token_id and codi.bot_ids() == [codi.vocab_size]
    ids = torch.tensor([model.encode_question("Tom has 3 cats and 2 dogs.")])
    with torch.no_grad():
        out = codi(ids, torch.ones_like(ids))
        # Reference: transformers' own eager attention, the whole sequence re-run each step (no cache).
        ref = copy.deepcopy(codi.lm)
        ref.set_attn_implementation("eager")
        emb = codi.embed(ids)
        thoughts = []
        for _ in range(model.num_latent):
            h = ref(inputs_embeds=emb, output_hidden_states=True).hidden_states[-1][:, -1:, :]
            thoughts.append(h)
            emb = torch.cat([emb, h], dim=1)
    np.testing.assert_allclose(out["latents"].numpy(), torch.cat(thoughts, 1).numpy(), rtol=0, atol=1e-9)


def test_sites_and_answer_prompt_follow_the_method(identity_model):
    model = identity_model
    pair = make_synthetic_pairs(1, seed=3)[0]
    toks = answer_tokens(model, pair.clean.answer, pair.corrupted.answer)
    prompt = model.tokenizer("###", add_special_tokens=False).input_ids
    assert toks.suffix[: 1 + len(prompt)] == [model.codi.eot_id, *prompt]
    pairs = make_synthetic_pairs(3, seed=3)
    last = model.n_layers - 1
    resid = patch_sweep(model, pairs, layers=[last], component="resid", positions="each")
    latent = patch_sweep(model, pairs, component="latent", positions="each")
    # The last block's output at position k, fed back unchanged, is thought k + 1: the same intervention.
    for k in range(model.num_latent - 1):
        for name in ("kl", "logprob_diff"):
            np.testing.assert_allclose(
                resid[name].sel(position=k).values[:, 0],
                latent[name].sel(position=k + 1).values[:, 0],
                rtol=0,
                atol=1e-9,
                err_msg=f"{name} at thought {k}",
            )
    assert np.abs(latent["kl"].values).max() > 1e-7  # the check is not vacuous (1e-9 is its tolerance)
    assert resid.attrs["latent_method"] == IDENTITY.name
