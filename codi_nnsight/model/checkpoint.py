"""Strict loading of official CODI checkpoints into a plain `CODIModule`.

The official `CODI` module saves a peft-wrapped LM under `codi.` and the projection under `prj.`.
Every checkpoint key must be used and every weight set; LoRA is merged into the base weights in
float64 (`W += B @ A * alpha / r`), so nnsight sees ordinary transformers module paths.
Loading is `weights_only=True` or safetensors: a checkpoint can never run code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..atomic import file_sha256  # noqa: F401  (re-exported: checkpoint provenance)
from ..errors import UserError
from .families import Family, check_shape, family_for
from .module import CODIModule, make_prj, register_attention

if TYPE_CHECKING:  # annotations only: config.py reaches this module through the Coconut loader
    from .config import CODIConfig

CKPT_PREFIXES = ("codi.base_model.model.", "codi.")


# ---------------------------------------------------------------------------------------------
def fetch_file(location: str, revision: str | None = None) -> Path:
    """A local path for `location`: itself, or a hub download for `hf://<repo>/<file>`."""
    if location.startswith("hf://"):
        rest = location[len("hf://") :]
        parts = rest.split("/")
        if len(parts) < 3:
            raise UserError(f"checkpoint {location!r}: expected hf://<owner>/<repo>/<file>")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision))
        except Exception as e:  # network / auth failures are reported as one line
            raise UserError(f"checkpoint {location!r}: download failed: {e}") from None
    path = Path(location)
    if not path.is_file():
        raise UserError(f"checkpoint {location}: no such file")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict safely: safetensors, or `torch.load(weights_only=True)` for `.bin`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refused to load (weights_only=True): {first}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state_dict of tensors")
    return sd


def _short(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def merge_codi_state_dict(
    sd: dict[str, torch.Tensor], lm: nn.Module, prj: nn.Module, cfg: CODIConfig, family: Family, source: str
) -> tuple[dict, dict]:
    """Map official CODI keys onto the plain LM and prj, merging LoRA (`W += B @ A * alpha / r`).

    Returns (lm_state, prj_state). Raises `UserError` naming the offending keys for non-float or
    non-finite weights, unused checkpoint keys, missing model weights, or shape mismatches.
    """
    check_weight_values(sd, source)
    split = _split_keys(sd)
    lm_sd = lm.state_dict()
    # Keys this architecture has no place for (e.g. another family's checkpoint) come first:
    # they explain every later mismatch.
    unknown = split.unknown + [split.origin.get(k, k) for k in set(split.lm) - set(lm_sd)]
    unknown += [split.origin[f"{m}.lora_{w}"] for m, ab in split.lora.items() for w in ab if m + ".weight" not in lm_sd]
    if unknown:
        raise UserError(f"{source}: checkpoint keys not used by a CODI {family.name} model: {_short(sorted(unknown))}")
    conv1d = {name for name, m in lm.named_modules() if type(m).__name__ == "Conv1D"}
    _merge_lora(split.lm, split.lora, cfg, set(cfg.lora_target_modules or family.lora_targets), conv1d, source)
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    if tied:
        _tie(split.lm, family.embedding_key, source)
    expected = {k: v for k, v in lm_sd.items() if not (tied and k == "lm_head.weight")}
    _check_complete(split.lm, expected, "", "model weights", split.origin, source)
    _check_complete(split.prj, prj.state_dict(), "prj.", "projection weights", {}, source, extra_is_error=True)
    return split.lm, split.prj


@dataclass
class _SplitKeys:
    """A checkpoint's keys sorted by where they go."""

    lm: dict[str, torch.Tensor] = field(default_factory=dict)
    prj: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> {"A": ..., "B": ...}
    unknown: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key, to name the user's key


def _split_keys(sd: dict[str, torch.Tensor]) -> _SplitKeys:
    """Sort official keys into LM weights, prj weights and LoRA factors (peft's names undone)."""
    out = _SplitKeys()
    for key, value in sd.items():
        if key.startswith("prj."):
            out.prj[key[4:]] = value
            continue
        inner = next((key[len(p) :] for p in CKPT_PREFIXES if key.startswith(p)), None)
        if inner is None:
            out.unknown.append(key)
            continue
        if ".lora_A." in inner or ".lora_B." in inner:
            which = "A" if ".lora_A." in inner else "B"
            mod, _, rest = inner.partition(f".lora_{which}.")
            if rest != "default.weight":
                out.unknown.append(key)
                continue
            out.lora.setdefault(mod, {})[which] = value
            out.origin[f"{mod}.lora_{which}"] = key
            continue
        inner = inner.replace(".base_layer.", ".")
        out.lm[inner] = value
        out.origin[inner] = key
    return out


def _merge_lora(
    lm_state: dict[str, torch.Tensor],
    lora: dict[str, dict[str, torch.Tensor]],
    cfg: CODIConfig,
    targets: set[str],
    conv1d: set[str],
    source: str,
) -> None:
    """Add every LoRA delta to its base weight, in float64 (the load casts once, exactly for float64 runs)."""
    scale = cfg.lora_alpha / cfg.lora_r if cfg.lora_r else 0.0
    for mod, ab in sorted(lora.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{source}: LoRA weights for {mod} incomplete (have lora_{''.join(ab)} only)")
        if mod.rsplit(".", 1)[-1] not in targets:
            raise UserError(f"{source}: LoRA weights for {mod}, which is not in lora_target_modules {sorted(targets)}")
        wkey = mod + ".weight"
        if wkey not in lm_state:
            raise UserError(f"{source}: LoRA weights for {mod} but no base weight {wkey}")
        a, b = ab["A"].double(), ab["B"].double()
        if a.shape[0] != cfg.lora_r:
            raise UserError(f"{source}: {mod}.lora_A has rank {a.shape[0]}, codi.json says lora_r={cfg.lora_r}")
        delta = b @ a * scale
        if mod in conv1d:  # GPT-2's Conv1D stores weights as (in, out)
            delta = delta.T
        w = lm_state[wkey]
        if delta.shape != w.shape:
            raise UserError(
                f"{source}: LoRA delta for {mod} has shape {tuple(delta.shape)}, weight has {tuple(w.shape)}"
            )
        lm_state[wkey] = w.double() + delta


def _tie(lm_state: dict[str, torch.Tensor], emb_key: str, source: str) -> None:
    """Tied embeddings may be stored under either name (or both, then they must agree)."""
    if "lm_head.weight" in lm_state and emb_key not in lm_state:
        lm_state[emb_key] = lm_state["lm_head.weight"]
    if emb_key in lm_state and "lm_head.weight" in lm_state:
        if not torch.equal(lm_state[emb_key], lm_state["lm_head.weight"]):
            raise UserError(f"{source}: lm_head.weight differs from {emb_key}, but the base config ties them")
    lm_state.pop("lm_head.weight", None)


def _check_complete(
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    prefix: str,
    what: str,
    origin: dict[str, str],
    source: str,
    extra_is_error: bool = False,
) -> None:
    """Every expected weight present, no extra one (when asked), every shape right."""
    extra = sorted(set(state) - set(expected))
    if extra and extra_is_error:
        raise UserError(f"{source}: checkpoint keys not used by the projection: {_short([prefix + k for k in extra])}")
    # Non-persistent buffers (e.g. rotary inv_freq, GPT-2 causal masks) are not weights.
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{source}: {what} missing from the checkpoint: {_short([prefix + k for k in missing])}")
    for k, v in state.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(
                f"{source}: {origin.get(k, prefix + k)} has shape {tuple(v.shape)} in the checkpoint, "
                f"model expects {tuple(expected[k].shape)}"
            )


def check_weight_values(sd: dict[str, torch.Tensor], source: str) -> None:
    """Refuse integer or non-finite weights, naming the tensor.

    An int32 weight would be cast silently (truncating a real checkpoint to zeros) and a NaN one
    would make every number NaN — while the sanity checks, comparing NaN runs, could still pass.
    """
    for key, value in sd.items():
        if not value.is_floating_point():
            raise UserError(
                f"{source}: {key} holds {str(value.dtype).replace('torch.', '')} values; model "
                "weights must be floating point"
            )
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f"{source}: {key} holds {bad} non-finite value(s) (NaN or inf)")


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line: transformers often puts the reason on a later line."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Text any real tokenizer encodes into several tokens.
_TOKENIZER_PROBE = "The answer is: 18"


def check_tokenizer(tokenizer: Any, base: str) -> None:
    """Refuse a tokenizer that cannot encode text, e.g. the empty one transformers builds for a base
    folder without tokenizer files (every question would become nothing and every answer wrong)."""
    try:
        ids = tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    except Exception as e:  # a broken tokenizer file
        raise UserError(f"base {base!r}: the tokenizer cannot encode text ({_one_line(e)})") from None
    if len(tokenizer) < 2 or not ids:
        raise UserError(
            f"base {base!r}: no usable tokenizer ({len(tokenizer)} token(s), encodes {_TOKENIZER_PROBE!r} as "
            f"{len(ids)} tokens); the folder needs its tokenizer files (tokenizer.json, or vocab.json and merges.txt)"
        )


def build_codi(
    cfg: CODIConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", meta: bool = False
) -> tuple[CODIModule, Any, dict[str, str]]:
    """Build the merged CODI module and its tokenizer from a config.

    Returns (module, tokenizer, info) where info has `checkpoint_sha256` and `family`. With
    `meta=True` only the structure is built (no weights read), for nnsight's lazy loading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = cfg.base_path
    try:
        hf_config = AutoConfig.from_pretrained(base, revision=None)
        tokenizer = AutoTokenizer.from_pretrained(base)
    except Exception as e:
        raise UserError(f"base {base!r}: cannot load config/tokenizer ({_one_line(e)})") from None
    check_tokenizer(tokenizer, base)
    family = family_for(hf_config)  # an unsupported architecture is refused before any weight is built
    check_shape(hf_config, f"base {base!r}")
    vocab = hf_config.vocab_size
    hf_config.vocab_size = vocab + 3  # pad, bot, eot
    # Our eager attention: exact in float64 (see codi_attention).
    with torch.device("meta" if meta else "cpu"):
        lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation=register_attention())
    hidden = hf_config.hidden_size
    prj = make_prj(hidden, cfg.prj_dim or hidden, cfg.use_prj, cfg.prj_no_ln)
    info = {"family": family.name, "checkpoint_sha256": ""}
    if not meta:
        if dtype == torch.float64:  # load straight into float64 so merged LoRA stays exact
            lm.to(torch.float64)
            prj.to(torch.float64)
        path = fetch_file(cfg.checkpoint_path, cfg.revision)
        sd = read_state_dict(path)
        lm_state, prj_state = merge_codi_state_dict(sd, lm, prj, cfg, family, str(path))
        lm.load_state_dict(lm_state, strict=False)  # strictness checked above, tied weights aside
        if getattr(lm.config, "tie_word_embeddings", False):
            lm.tie_weights()
        prj.load_state_dict(prj_state, strict=True)
        info["checkpoint_sha256"] = file_sha256(path)
    module = CODIModule(
        lm,
        prj,
        num_latent=cfg.num_latent,
        vocab_size=vocab,
        eos_token_id=tokenizer.eos_token_id,
        remove_eos=cfg.remove_eos,
    )
    module.eval()
    if not meta:
        module.to(device=device, dtype=dtype)
    return module, tokenizer, info
