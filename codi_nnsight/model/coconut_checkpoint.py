"""Coconut checkpoints: the `coconut.json` description and strict loading into a plain `CODIModule`.

A `coconut.json` names the base model (a folder or hub id with its config and tokenizer) and the
checkpoint file, and how many thoughts to run:

    {"method": "coconut", "base": "base", "checkpoint": "ckpt/checkpoint_6", "num_latent": 6}

Two checkpoint formats load, told apart by their keys:

* Meta's (the official `run.py`): one `torch.save(state_dict)` file whose keys are
  `base_causallm.<transformers keys>` plus `embedding.weight`, a second copy of the input
  embedding (the `Coconut` wrapper registers it as its own submodule). The prefix is stripped and
  the copy checked equal to the embedding, then dropped. The base has no latent tokens; they are
  added here in the official order, as `run.py` does before loading.
* Hugging Face native (e.g. `ModalityDance/latent-tts-coconut`): plain transformers keys in a
  safetensors file, the base config carrying `latent_start_id`, `latent_end_id` and `latent_id`.

A plain model (a stage-0 CoT checkpoint: no prefix, no latent ids) is refused, as is anything that
does not fill the model exactly. Files load with `torch.load(weights_only=True)` or safetensors,
so a checkpoint can never run code.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..methods.coconut import COCONUT
from .config import CODIConfig, ModelFile, _value_error
from .families import Family, check_shape, family_for

if TYPE_CHECKING:  # torch is imported where weights are read: `CoconutConfig` stays light, as `CODIConfig` is
    import torch
    from torch import nn

    from .module import CODIModule

#: Prefix of the LM's keys in Meta's format (the `Coconut` wrapper's `base_causallm` attribute).
META_PREFIX = "base_causallm."
#: The wrapper's second copy of the input embedding.
META_EMBEDDING = "embedding.weight"
#: Config attributes of the Hugging Face-native format, by the role of their token.
HF_LATENT_IDS = {"start": "latent_start_id", "end": "latent_end_id", "latent": "latent_id"}


# ---------------------------------------------------------------------------------------------
# coconut.json
# ---------------------------------------------------------------------------------------------
@dataclass
class CoconutConfig(ModelFile):
    """Everything needed to rebuild a Coconut model (the `coconut.json` file).

    `base`: a folder or a Hugging Face id with the base LM's config and tokenizer (the tokenizer
    without the three latent tokens for Meta's format); `checkpoint`: the checkpoint file (a
    local path, or `hf://<repo id>/<file>`); `num_latent`: thoughts per question (official
    configs: 6). Relative paths resolve against the json's folder.
    """

    base: str
    checkpoint: str
    num_latent: int = 6
    method: str = "coconut"
    name: str | None = None
    revision: str | None = None
    #: Folder of the json the config came from (not serialized; resolves relative paths).
    root: str | None = field(default=None, compare=False, repr=False)

    #: Keys every `coconut.json` must hold.
    REQUIRED = ("method", "base", "checkpoint")

    def __post_init__(self) -> None:
        if self.method != COCONUT.name:
            raise UserError(f"coconut config: method must be {COCONUT.name!r}, got {self.method!r}")
        err = _value_error("num_latent", self.num_latent)
        if err:
            raise UserError(f"coconut config: num_latent {err}")

    # -- paths: as CODIConfig resolves them -------------------------------------------------
    def _as_codi(self) -> CODIConfig:
        return CODIConfig(base=self.base, checkpoint=self.checkpoint, num_latent=0, root=self.root)

    @property
    def base_path(self) -> str:
        """The base LM location with a relative folder resolved (a hub id stays as it is)."""
        return self._as_codi().base_path

    @property
    def checkpoint_path(self) -> str:
        """The checkpoint location with a relative path resolved."""
        return self._as_codi().checkpoint_path

    # -- (de)serialization: `to_dict` / `to_json` / `display_name` come from `ModelFile` ------
    @classmethod
    def from_dict(cls, data: Any, source: str = "coconut config", root: str | None = None) -> CoconutConfig:
        """Build from a parsed json object, refusing unknown or missing keys and wrong types in one line."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(data).__name__}")
        types: dict[str, tuple[type, ...]] = {
            "method": (str,),
            "base": (str,),
            "checkpoint": (str,),
            "num_latent": (int,),
            "name": (str, type(None)),
            "revision": (str, type(None)),
        }
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise UserError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(types))}"
            )
        for key in cls.REQUIRED:
            if key not in data:
                raise UserError(f"{source}: missing required key {key!r}")
        for key, value in data.items():
            # bool is an int subclass: a `true` where a number belongs is a typo, not a 1.
            if not isinstance(value, types[key]) or isinstance(value, bool):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types[key])
                raise UserError(f"{source}: key {key!r} must be {want}, got {json.dumps(value)}")
        if data["method"] != COCONUT.name:
            raise UserError(f"{source}: key 'method' must be {COCONUT.name!r}, got {json.dumps(data['method'])}")
        if "num_latent" in data:
            err = _value_error("num_latent", data["num_latent"])
            if err:
                raise UserError(f"{source}: num_latent {err}")
        return cls(**data, root=root)

    @classmethod
    def from_json(cls, path: str | Path) -> CoconutConfig:
        """Read a `coconut.json` (relative paths resolve against the real file's folder)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 (byte {e.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return cls.from_dict(data, source=str(path), root=str(path.resolve().parent))

    def save(self, path: str | Path) -> None:
        """Write this config as a `coconut.json` (paths as given, not resolved)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint
# ---------------------------------------------------------------------------------------------
def read_coconut_file(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in `path`: safetensors, or a `torch.save` file read with `weights_only=True`.

    A pickle that would call code (any global beyond tensors and plain containers) is refused in
    one line that says so, instead of torch's advice to retry with `weights_only=False`.
    """
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UserError(f"{path}: not a torch.save checkpoint ({_one_line(e)})") from None
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"calls {found.group(1)}" if found else "holds Python objects"
        raise UserError(
            f"{path}: refused: the pickle {what}, not only tensors; a checkpoint that can run code is never "
            "loaded (torch.load weights_only=True): re-save it as a plain state_dict"
        ) from None
    except Exception as e:
        raise UserError(f"{path}: not a torch.save checkpoint ({_one_line(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{path}: not a state_dict of tensors")
    return sd


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (libraries put the reason on later lines)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def coconut_state_dict(
    sd: dict[str, torch.Tensor], lm: nn.Module, family: Family, vocab: int, hf_native: bool, source: str
) -> tuple[dict[str, torch.Tensor], str]:
    """Map a Coconut checkpoint onto `lm`'s keys; returns (state, format: "meta" or "hf").

    `vocab` is V, the base vocabulary before the three latent tokens; `hf_native` whether the
    base config carries the HF-native latent ids. Raises `UserError` (one line naming `source`
    and the key) for a plain (stage-0) model, a mismatched duplicate embedding, an embedding of
    the wrong shape, unused or missing keys, or other wrong shapes.
    """
    import torch

    from .checkpoint import check_weight_values

    check_weight_values(sd, source)
    emb_key = family.embedding_key
    if any(k.startswith(META_PREFIX) for k in sd):
        fmt = "meta"
        state = {k[len(META_PREFIX) :]: v for k, v in sd.items() if k.startswith(META_PREFIX)}
        origin = {k[len(META_PREFIX) :]: k for k in sd if k.startswith(META_PREFIX)}
        unused = sorted(k for k in sd if not k.startswith(META_PREFIX) and k != META_EMBEDDING)
        if unused:
            raise UserError(f"{source}: checkpoint keys not used by a Coconut {family.name} model: {_short(unused)}")
        if META_EMBEDDING in sd:
            dup, emb = sd[META_EMBEDDING], state.get(emb_key)
            if emb is None or dup.shape != emb.shape or not torch.equal(dup, emb):
                raise UserError(
                    f"{source}: {META_EMBEDDING} differs from {META_PREFIX}{emb_key}; Meta's Coconut wrapper saves "
                    "the same input embedding under both names, so this file is not one it wrote"
                )
    elif hf_native:
        fmt, state, origin = "hf", dict(sd), {k: k for k in sd}
    else:
        raise UserError(
            f"{source}: no key starts with {META_PREFIX!r} and the base config has no latent_id: a plain model "
            "(e.g. a stage-0 CoT checkpoint), not Coconut; load it as a plain LM, or give a Coconut checkpoint"
        )
    expected = lm.state_dict()
    hidden = lm.get_input_embeddings().weight.shape[1]
    want = (vocab + len(COCONUT.added_tokens), hidden)
    if emb_key in state and tuple(state[emb_key].shape) != want:
        raise UserError(
            f"{source}: {origin[emb_key]} has shape {tuple(state[emb_key].shape)}; this base needs {want}: "
            f"{vocab} base tokens + the {len(COCONUT.added_tokens)} latent tokens, width {hidden}"
        )
    # Buffers transformers no longer saves (GPT-2's causal mask, rotary inv_freq) in older files.
    buffers = {name for name, _ in lm.named_buffers()}
    unused = sorted(origin[k] for k in state if k not in expected and k not in buffers)
    if unused:
        raise UserError(f"{source}: checkpoint keys not used by a Coconut {family.name} model: {_short(unused)}")
    state = {k: v for k, v in state.items() if k in expected}
    if getattr(lm.config, "tie_word_embeddings", False):
        head = state.pop("lm_head.weight", None)
        if head is not None and emb_key not in state:
            state[emb_key] = head
        elif head is not None and not torch.equal(head, state[emb_key]):
            raise UserError(f"{source}: lm_head.weight differs from {emb_key}, but the base config ties them")
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    if missing:
        prefix = META_PREFIX if fmt == "meta" else ""
        raise UserError(f"{source}: model weights missing from the checkpoint: {_short([prefix + k for k in missing])}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(
                f"{source}: {origin.get(k, k)} has shape {tuple(v.shape)} in the checkpoint, "
                f"model expects {tuple(expected[k].shape)}"
            )
    return state, fmt


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------
def add_latent_tokens(tokenizer: Any, base: str) -> int:
    """Give `tokenizer` the three latent tokens in the official order, pad = eos; returns V.

    V is the id of `<|start-latent|>` (the base tokenizer's length, as `add_tokens` assigns it).
    A tokenizer that already holds all three (an HF-native base) must hold them at V, V+1, V+2 as
    its last tokens; one holding only some of them is refused.
    """
    tokens = COCONUT.added_tokens
    vocab = tokenizer.get_vocab()
    have = [t for t in tokens if t in vocab]
    if have and len(have) != len(tokens):
        raise UserError(f"base {base!r}: the tokenizer holds {', '.join(have)} but not all of {', '.join(tokens)}")
    if not have:
        tokenizer.add_tokens(list(tokens))  # ordinary added tokens, as the official run.py adds them
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    start = ids[0]
    if ids != list(range(start, start + len(tokens))) or start + len(tokens) != len(tokenizer):
        raise UserError(
            f"base {base!r}: the tokenizer's latent tokens {', '.join(tokens)} have ids {ids} (of {len(tokenizer)}); "
            "Coconut needs them consecutive, in this order, as the last ids"
        )
    tokenizer.pad_token = tokenizer.eos_token
    return start


def _hf_latent_ids(hf_config: Any, vocab: int, base: str) -> bool:
    """Whether the base config is HF-native (carries the latent ids); its ids must be V, V+1, V+2."""
    given = {role: getattr(hf_config, attr, None) for role, attr in HF_LATENT_IDS.items()}
    if all(v is None for v in given.values()):
        return False
    want = {"start": vocab, "end": vocab + 1, "latent": vocab + 2}
    if given != want:
        got = ", ".join(f"{HF_LATENT_IDS[r]}={given[r]}" for r in HF_LATENT_IDS)
        exp = ", ".join(f"{HF_LATENT_IDS[r]}={want[r]}" for r in HF_LATENT_IDS)
        raise UserError(f"base {base!r}: config has {got}; the tokenizer's latent tokens give {exp}")
    return True


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------
def build_coconut(
    cfg: CoconutConfig, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", meta: bool = False
) -> tuple[CODIModule, Any, dict[str, str]]:
    """Build a Coconut model: (module, tokenizer, info).

    The module is a `CODIModule` with `method=COCONUT` and the identity as feedback (the thought
    is the final-norm state itself); the tokenizer has the three latent tokens (ids V, V+1, V+2)
    and pads with eos; info has `checkpoint_sha256`, `family` and `format` (`meta` or `hf`; ""
    with `meta=True`, which builds the structure only and reads no weights). `dtype`: float32
    when None.
    """
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import check_tokenizer, fetch_file, file_sha256
    from .module import CODIModule, register_attention

    dtype = torch.float32 if dtype is None else dtype

    base = cfg.base_path
    try:
        hf_config = AutoConfig.from_pretrained(base, revision=None)
        tokenizer = AutoTokenizer.from_pretrained(base)
    except Exception as e:
        raise UserError(f"base {base!r}: cannot load config/tokenizer ({_one_line(e)})") from None
    check_tokenizer(tokenizer, base)
    family = family_for(hf_config)  # an unsupported architecture is refused before any weight is built
    check_shape(hf_config, f"base {base!r}")
    vocab = add_latent_tokens(tokenizer, base)
    hf_native = _hf_latent_ids(hf_config, vocab, base)
    hf_config.vocab_size = vocab + len(COCONUT.added_tokens)
    # The package's eager attention: exact in float64 (see module.codi_attention).
    with torch.device("meta" if meta else "cpu"):
        lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation=register_attention())
    info = {"family": family.name, "checkpoint_sha256": "", "format": ""}
    if not meta:
        if dtype == torch.float64:  # cast the file's weights once, straight into float64
            lm.to(torch.float64)
        path = fetch_file(cfg.checkpoint_path, cfg.revision)
        sd = read_coconut_file(path)
        state, info["format"] = coconut_state_dict(sd, lm, family, vocab, hf_native, str(path))
        lm.load_state_dict(state, strict=False)  # completeness checked above, tied weights aside
        if getattr(lm.config, "tie_word_embeddings", False):
            lm.tie_weights()
        info["checkpoint_sha256"] = file_sha256(path)
    module = CODIModule(
        lm,
        nn.Identity(),
        num_latent=cfg.num_latent,
        vocab_size=vocab,
        eos_token_id=tokenizer.eos_token_id,
        remove_eos=True,  # the question (+ "\n") is followed by <|start-latent|> directly
        method=COCONUT,
    )
    module.eval()
    if not meta:
        module.to(device=device, dtype=dtype)
    return module, tokenizer, info
