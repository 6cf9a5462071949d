"""The model layer against an independent eager re-implementation of the official CODI loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nnsight
import pytest
import torch
from conftest import FAMILIES
from safetensors.torch import load_file, save_file

from codi_nnsight.errors import UserError
from codi_nnsight.model.checkpoint import build_codi
from codi_nnsight.model.config import CODIConfig, resolve_model_spec
from codi_nnsight.model.wrapper import CODIModel, load_model
from codi_nnsight.testing.tiny import write_tiny_codi

QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many?",
    "What is 7-2?",
    "A box holds 12 eggs; 5 break. How many are left?",
]
TOL = 1e-9


@pytest.mark.parametrize("family", FAMILIES)
def test_latents_and_logits_match_reference(family, tiny_models, references):
    model, ref = tiny_models[family], references[family]
    K = model.num_latent
    for q in QUESTIONS:
        inputs = model.prepare([q], max_new_tokens=6)
        with model.trace(**inputs) as tracer:
            outs = nnsight.save({})
            for step in tracer.iter[1 : K + 1]:
                for L in range(model.n_layers):
                    outs[(step, L)] = model.layers[L].output.save()
            result = model.output.save()
        expected = ref.run(q, max_new_tokens=6)
        assert (result["latents"][0] - expected["latents"]).abs().max() < TOL
        for L in range(model.n_layers):
            mine = torch.cat([outs[(k, L)][0, -1:] for k in range(1, K + 1)])
            assert (mine - expected["block_latent_outputs"][L]).abs().max() < TOL
        assert (result["logits"][0] - expected["logits"]).abs().max() < TOL
        gen = [int(t) for t in result["generated"][0] if t >= 0]
        assert gen == expected["generated"][: len(gen)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_mixed_lengths_equal_one_at_a_time(family, tiny_models):
    model = tiny_models[family]
    batched = model.codi(**model.prepare(QUESTIONS, max_new_tokens=5))
    for i, q in enumerate(QUESTIONS):
        single = model.codi(**model.prepare([q], max_new_tokens=5))
        assert (batched["logits"][i] - single["logits"][0]).abs().max() < TOL
        assert (batched["latents"][i] - single["latents"][0]).abs().max() < TOL
        n = single["generated"].shape[1]
        # Greedy ids across batch shapes: every argmax's top-2 gap is >= 1.6e-3 here (measured), far
        # above the < 1e-9 the logits move, so the ids are equal.
        assert torch.equal(batched["generated"][i, :n], single["generated"][0])


def test_shared_prefix_rows_equal_separate_prompts(tiny_models):
    model = tiny_models["llama"]
    inp = model.prepare(QUESTIONS[:2])
    shared = model.codi(**inp, rows=torch.tensor([1, 0, 1, 1]))
    separate = model.codi(**model.prepare([QUESTIONS[1], QUESTIONS[0], QUESTIONS[1], QUESTIONS[1]]))
    assert (shared["logits"] - separate["logits"]).abs().max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_candidate_logprobs_match_reference(family, tiny_models, references):
    model, ref = tiny_models[family], references[family]
    q = QUESTIONS[0]
    eot = model.codi.eot_id
    suffix = [eot] + model.tokenizer("The answer is:", add_special_tokens=False).input_ids
    cands = [[ord("1"), ord("2")], [ord("7")], [ord("1"), ord("0"), ord("4")]]
    padded = torch.full((1, 3, 3), -1)
    for i, c in enumerate(cands):
        padded[0, i, : len(c)] = torch.tensor(c)
    out = model.codi(**model.prepare([q]), suffix_ids=torch.tensor(suffix), candidates=padded)
    expected = ref.run(q, suffix=suffix, candidates=cands)
    assert (out["candidate_logprobs"][0] - expected["candidate_logprobs"]).abs().max() < TOL


def test_remote_local_simulation_equals_local(tiny_models):
    model = tiny_models["gpt2"]
    inputs = model.prepare(QUESTIONS[:2], max_new_tokens=3)
    with model.trace(**inputs, remote="local"):
        remote_logits = model.output["logits"].save()
    local = model.codi(**inputs)["logits"]
    assert (remote_logits - local).abs().max() < TOL


def test_model_key_round_trip(tiny_models, tiny_dirs):
    model = tiny_models["llama"]
    key = model.to_model_key()
    assert key.startswith("codi_nnsight.model.CODIModel:")
    rebuilt = CODIModel.from_model_key(key, dtype="float64")
    assert rebuilt.to_model_key() == key
    for (k1, v1), (k2, v2) in zip(model.codi.state_dict().items(), rebuilt.codi.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)  # the same checkpoint loaded again: no arithmetic, same bits


def test_bin_checkpoint_and_tied_key_variants(tmp_path, references):
    for i, (fmt, tied) in enumerate((("bin", "both"), ("safetensors", "lm_head"), ("safetensors", "embedding"))):
        path = write_tiny_codi(tmp_path / str(i), family="gpt2", seed=1, checkpoint_format=fmt, tied_key=tied)
        m = load_model(path, dtype="float64")
        out = m.codi(**m.prepare([QUESTIONS[1]]))
        ref = load_model(write_tiny_codi(tmp_path / f"r{i}", family="gpt2", seed=1), dtype="float64")
        assert (out["logits"] - ref.codi(**ref.prepare([QUESTIONS[1]]))["logits"]).abs().max() < TOL


def _mutate_checkpoint(codi_json, fn):
    ckpt = codi_json.parent / "ckpt" / "model.safetensors"
    sd = load_file(str(ckpt))
    fn(sd)
    save_file(sd, str(ckpt))
    return str(ckpt)


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing", "model weights missing from the checkpoint: transformer.h.1.ln_2.weight"),
        ("extra", "checkpoint keys not used by a CODI gpt2 model: codi.base_model.model.bogus.weight"),
        (
            "shape",
            "codi.base_model.model.transformer.h.0.ln_1.bias has shape (3,) in the checkpoint, model expects (32,)",
        ),
        ("prj", "projection weights missing from the checkpoint: prj.ln.weight"),
    ],
)
def test_bad_checkpoint_keys_are_named(tmp_path, case, needle):
    path = write_tiny_codi(tmp_path / case, family="gpt2")
    key = "codi.base_model.model.transformer.h.1.ln_2.weight"
    mutate = {
        "missing": lambda sd: sd.pop(key),
        "extra": lambda sd: sd.__setitem__("codi.base_model.model.bogus.weight", torch.zeros(2)),
        "shape": lambda sd: sd.__setitem__("codi.base_model.model.transformer.h.0.ln_1.bias", torch.zeros(3)),
        "prj": lambda sd: sd.pop("prj.ln.weight"),
    }[case]
    ckpt = _mutate_checkpoint(path, mutate)
    with pytest.raises(UserError) as e:
        build_codi(CODIConfig.from_json(path))
    assert str(e.value) == f"{ckpt}: {needle}"


def test_wrong_family_checkpoint_is_refused(tmp_path):
    g = write_tiny_codi(tmp_path / "g", family="gpt2")
    lla = write_tiny_codi(tmp_path / "l", family="llama")
    shutil.copy(lla.parent / "ckpt" / "model.safetensors", g.parent / "ckpt" / "model.safetensors")
    with pytest.raises(
        UserError,
        match="checkpoint keys not used by a CODI gpt2 model: codi.base_model.model.model.embed_tokens.weight",
    ):
        build_codi(CODIConfig.from_json(g))


def test_pickle_checkpoint_that_runs_code_is_refused(tmp_path):
    path = write_tiny_codi(tmp_path / "p", family="gpt2", checkpoint_format="bin")
    ckpt = path.parent / "ckpt" / "pytorch_model.bin"

    class Evil:
        def __reduce__(self):
            return (exec, ("open('/tmp/codi_nnsight_pwned', 'w').write('x')",))

    torch.save({"x": Evil()}, ckpt)
    with pytest.raises(UserError, match=r"refused to load \(weights_only=True\)"):
        build_codi(CODIConfig.from_json(path))
    import os

    assert not os.path.exists("/tmp/codi_nnsight_pwned")


@pytest.mark.parametrize(
    "data,message",
    [
        ({"base": "b", "checkpoint": "c", "num_latnet": 6}, "unknown key(s) 'num_latnet'"),
        ({"base": "b", "checkpoint": "c", "num_latent": "6"}, "key 'num_latent' must be int, got \"6\""),
        ({"base": "b", "checkpoint": "c", "use_prj": 1}, "key 'use_prj' must be bool, got 1"),
        ({"checkpoint": "c"}, "missing required key 'base'"),
    ],
)
def test_codi_json_errors(tmp_path, data, message):
    p = tmp_path / "codi.json"
    p.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        CODIConfig.from_json(p)
    assert str(e.value).startswith(f"{p}: {message}")


def test_model_spec_resolution(tmp_path, tiny_dirs):
    cfg = resolve_model_spec(tiny_dirs["gpt2"])
    assert cfg.num_latent == 3
    from pathlib import Path

    assert resolve_model_spec(Path(tiny_dirs["gpt2"]).parent) == cfg
    with pytest.raises(UserError, match=f"{tmp_path}: folder holds no codi.json"):
        resolve_model_spec(tmp_path)
    assert resolve_model_spec("codi-gpt2").checkpoint == "hf://zen-E/CODI-gpt2/pytorch_model.bin"
    with pytest.raises(UserError) as err:
        resolve_model_spec("no-such-model")
    assert str(err.value).startswith(
        "--model 'no-such-model': not a codi.json or coconut.json file, a folder holding one, a bundled toy "
        "(toy-codi, toy-coconut) or a preset ("
    )
    # The bundled toys load by name (the toy CODI is also the default).
    assert resolve_model_spec("toy-codi") == resolve_model_spec(None)
    coconut = resolve_model_spec("toy-coconut")
    assert (coconut.method, coconut.num_latent, coconut.name) == ("coconut", 6, "toy-coconut")


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_question_prefix_equals_full_prefill(family, tiny_models):
    from codi_nnsight.patching.trace import prompt_inputs

    model = tiny_models[family]
    qs = [
        "Tom has 3 apples and buys 4 more. How many?",
        "Tom has 3 apples and buys 5 more. How many?",
        "What is 7-2?",
        "Why is 7-2?",
    ]
    shared, calls = prompt_inputs(model, qs)
    assert calls == 2 and shared["prefix_ids"].shape[0] == 2
    rows = torch.tensor([0, 1, 1, 2, 3, 3])
    a = model.codi(**shared, rows=rows, max_new_tokens=4)
    b = model.codi(**model.prepare(qs), rows=rows, max_new_tokens=4)
    assert (a["logits"] - b["logits"]).abs().max() < TOL
    assert (a["latents"] - b["latents"]).abs().max() < TOL
    assert torch.equal(a["generated"], b["generated"])  # argmax top-2 gaps >= 1.6e-3 here, logits < 1e-9


def test_several_invokes_are_batched_like_separate_runs(tiny_models):
    """Questions of different lengths as separate invokes of one trace (`_batch` left-pads them)."""
    model = tiny_models["llama"]
    a, b = QUESTIONS[0], QUESTIONS[1]
    with model.trace() as tracer:
        with tracer.invoke(**model.prepare([a], max_new_tokens=3)):
            ha = model.layers[1].output.save()
            la = model.output["logits"].save()
        with tracer.invoke(**model.prepare([b], max_new_tokens=3)):
            hb = model.layers[1].output.save()
            lb = model.output["logits"].save()
    for q, logits, h in ((a, la, ha), (b, lb, hb)):
        single = model.codi(**model.prepare([q], max_new_tokens=3))["logits"]
        assert logits.shape == single.shape and (logits - single).abs().max() < TOL
        assert h.shape[0] == 1  # each invoke sees only its own rows


def test_two_invokes_with_shared_prefix_inputs_equal_separate_traces(tiny_models):
    # Every forward argument is batched across invokes; prefix inputs used to be dropped silently.
    from codi_nnsight.patching import prompt_inputs

    model = tiny_models["llama"]
    a, n_a = prompt_inputs(
        model, ["Tom has 3 apples and buys 4 more. How many?", "Tom has 3 apples and buys 5 more. How many?"]
    )
    b, n_b = prompt_inputs(
        model, ["A box holds 12 eggs; 5 break. How many are left?", "A box holds 12 eggs; 6 break. How many are left?"]
    )
    assert n_a == n_b == 2  # both use shared prefixes
    with model.trace() as tracer:
        with tracer.invoke(**a):
            la = model.output["logits"].save()
        with tracer.invoke(**b):
            lb = model.output["logits"].save()
    assert (la - model.codi(**a)["logits"]).abs().max() < TOL
    assert (lb - model.codi(**b)["logits"]).abs().max() < TOL
    plain = model.prepare(QUESTIONS[:1])
    with pytest.raises(ValueError, match="must all use shared prefixes"):
        with model.trace() as tracer:
            with tracer.invoke(**a):
                model.output["logits"].save()
            with tracer.invoke(**plain):
                model.output["logits"].save()


def test_trace_and_invoke_take_question_text(tiny_models):
    model = tiny_models["gpt2"]
    with model.trace(QUESTIONS[1], max_new_tokens=3):
        one = model.output["logits"].save()
    assert (one - model.codi(**model.prepare([QUESTIONS[1]]))["logits"]).abs().max() < TOL
    with model.trace() as tracer:
        with tracer.invoke(QUESTIONS[:2]):
            first = model.output["logits"].save()
        with tracer.invoke(QUESTIONS[2]):
            second = model.output["logits"].save()
    expected = model.codi(**model.prepare(QUESTIONS))["logits"]
    assert first.shape[0] == 2 and second.shape[0] == 1
    assert (torch.cat([first, second]) - expected).abs().max() < TOL
    with pytest.raises(TypeError, match="unknown forward argument"):
        with model.trace(QUESTIONS[0], temperature=0.5):
            model.output.save()


def test_call_schedule_names_the_latent_calls(tiny_models):
    model = tiny_models["gpt2"]
    s = model.schedule()
    K = model.num_latent
    assert list(s.latent_calls) == list(range(1, K + 1)) and s.suffix_call == K + 1
    assert model.schedule(2).latent_call(0) == 2 and model.schedule(2).prj_call(0) == 0
    with pytest.raises(IndexError):
        s.latent_call(K)


def test_unsupported_architecture_is_refused_by_model_type(tmp_path):
    from codi_nnsight.model.families import family_for

    class Config:
        model_type = "mamba"

    with pytest.raises(
        UserError, match="unsupported model_type 'mamba': CODI models are supported for gpt2, llama, qwen2"
    ):
        family_for(Config())


def test_readme_python_example_runs_and_prints_what_it_says():
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, flags=re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "6 thoughts of width 128 ; answer: The answer is: 9"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"prj_dim": 0}, "codi config: prj_dim must be > 0 (or null for the hidden size), got 0"),
        ({"prj_dim": -4}, "codi config: prj_dim must be > 0 (or null for the hidden size), got -4"),
        ({"lora_alpha": float("nan")}, "codi config: lora_alpha must be a finite number, got nan"),
    ],
)
def test_config_values_that_used_to_pass_silently(change, message):
    with pytest.raises(UserError) as e:
        CODIConfig(base="b", checkpoint="c", **change)
    assert str(e.value) == message


def test_a_base_that_looks_like_a_missing_folder_is_not_sent_to_the_hub(tmp_path):
    cfg = CODIConfig(base="./models/base", checkpoint="c.safetensors", root=str(tmp_path))
    with pytest.raises(UserError, match=r"base './models/base': no such folder beside .* \(and not a hub id"):
        _ = cfg.base_path
    assert CODIConfig(base="gpt2", checkpoint="c", root=str(tmp_path)).base_path == "gpt2"
    assert (
        CODIConfig(base="meta-llama/Llama-3.2-1B", checkpoint="c", root=str(tmp_path)).base_path
        == "meta-llama/Llama-3.2-1B"
    )


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda v: v.to(torch.int32), "holds int32 values; model weights must be floating point"),
        (lambda v: v.clone().fill_(float("nan")), "non-finite value(s) (NaN or inf)"),
    ],
)
def test_non_float_and_non_finite_weights_are_refused_by_name(tiny_dirs, tmp_path, corrupt, message):
    src = Path(tiny_dirs["llama"]).parent
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    ckpt = dst / "ckpt" / "model.safetensors"
    sd = load_file(str(ckpt))
    key = next(k for k in sd if k.endswith("mlp.down_proj.base_layer.weight"))
    sd[key] = corrupt(sd[key])
    save_file(sd, str(ckpt))
    with pytest.raises(UserError) as e:
        load_model(dst, dtype="float64")
    assert str(e.value).startswith(f"{ckpt}: {key} ") and message in str(e.value)


def test_gpt2_gelu_runs_as_one_fused_kernel_with_the_same_values(tiny_models):
    # `gelu_new` is swapped for torch's fused tanh GELU at the same place; the values agree to rounding.
    from transformers.activations import NewGELUActivation

    from codi_nnsight.model.module import FusedGELUTanh, fuse_activations

    gpt2 = tiny_models["gpt2"].codi
    acts = [block.mlp.act for block in gpt2.layers]
    assert all(type(a) is FusedGELUTanh for a in acts)
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    assert (acts[0](x) - NewGELUActivation()(x)).abs().max() < 1e-14
    assert fuse_activations(tiny_models["llama"].codi.lm) == 0  # SiLU models keep their activation
