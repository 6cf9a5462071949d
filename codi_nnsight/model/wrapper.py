"""`CODIModel`: the nnsight wrapper around `CODIModule`, local or remote (NDIF).

    model = load_model("path/to/codi.json", dtype="float64")
    with model.trace(model.prepare(["What is 2+3?"]), max_new_tokens=8):
        h = model.layers[0].output.save()          # prefill (call 0)
        ...
    model.lm.transformer.h[0]  /  model.lm.model.layers[0]   # the usual transformers paths

The model key (`to_model_key()`) is `codi_nnsight.model.CODIModel:<codi config json>`, so an
NDIF server with this package installed rebuilds the very same model from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from nnsight.modeling.mixins.remotable import Remotable

from ..errors import UserError
from ..model.config import CODIConfig, resolve_model_spec
from ..model.module import CODIModule, build_codi

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """`None` → float32 on CPU, bfloat16 on CUDA; names as in `DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` → cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return dev


class CODIModel(Remotable):
    """nnsight wrapper of a CODI model (`CODIModule`), remote-capable through NDIF.

    Construct from a `CODIConfig`, a `codi.json` path / folder / preset name, or a ready
    `CODIModule` (then pass `tokenizer=` and `config=`).
    """

    def __init__(self, spec: Any, *args: Any, tokenizer: Any = None, config: CODIConfig | None = None,
                 dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                 **kwargs: Any) -> None:
        self._codi_dtype = dtype
        self._codi_device = device
        if isinstance(spec, CODIModule):
            self.codi_config = config
            self.tokenizer = tokenizer
            self.checkpoint_sha256 = ""
            super().__init__(spec, *args, **kwargs)
        else:
            self.codi_config = resolve_model_spec(spec)
            kwargs.setdefault("dispatch", True)
            super().__init__(self.codi_config, *args, dtype=dtype, device=device, **kwargs)

    # -- loading (nnsight's Loadable/Meta hooks) ---------------------------------------------
    def _load(self, cfg: CODIConfig, *args: Any, dtype: Any = None, device: Any = None,
              **kwargs: Any) -> CODIModule:
        dev = resolve_device(device)
        module, tok, info = build_codi(cfg, dtype=resolve_dtype(dtype, dev), device=dev)
        self.tokenizer = tok
        self.checkpoint_sha256 = info["checkpoint_sha256"]
        return module

    def _load_meta(self, cfg: CODIConfig, *args: Any, dtype: Any = None, device: Any = None,
                   **kwargs: Any) -> CODIModule:
        module, tok, _ = build_codi(cfg, meta=True)
        self.tokenizer = tok
        self.checkpoint_sha256 = ""
        return module

    # -- remote identity ---------------------------------------------------------------------
    def _remoteable_model_key(self) -> str:
        if self.codi_config is None:
            raise UserError("this CODIModel was built from a ready module; it has no config to "
                            "name it remotely")
        return self.codi_config.to_json(resolved=True)

    @classmethod
    def _remoteable_from_model_key(cls, model_key: str, **kwargs: Any) -> CODIModel:
        cfg = CODIConfig.from_dict(json.loads(model_key), source="model key")
        return cls(cfg, **kwargs)

    # -- structure -----------------------------------------------------------------------------
    @property
    def codi(self) -> CODIModule:
        """The wrapped plain `CODIModule`."""
        return self._module

    @property
    def layers(self) -> Any:
        """Envoys of the decoder blocks (`transformer.h` or `model.layers`)."""
        return self.lm.transformer.h if self._module.family == "gpt2" else self.lm.model.layers

    def sublayer(self, layer: int, component: str) -> Any:
        """The envoy whose output is the patch site: `resid` block, `attn` or `mlp` sub-layer."""
        block = self.layers[layer]
        if component == "resid":
            return block
        if component == "attn":
            return block.attn if self._module.family == "gpt2" else block.self_attn
        if component == "mlp":
            return block.mlp
        raise UserError(f"unknown component {component!r}: expected resid, attn, mlp or latent")

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self._module.layers)

    @property
    def num_latent(self) -> int:
        """Latent (CoT) steps per question."""
        return self._module.num_latent

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return next(self._module.parameters()).dtype

    @property
    def name(self) -> str:
        """Human name for titles and provenance."""
        return self.codi_config.display_name() if self.codi_config else "codi"

    # -- inputs --------------------------------------------------------------------------------
    def encode_question(self, question: str) -> list[int]:
        """Token ids of `question` (+BOS when the tokenizer adds one) followed by `[bot]`."""
        return list(self.tokenizer(question).input_ids) + self._module.bot_ids()

    def prepare(self, questions: list[str] | str, **extra: Any) -> dict[str, Any]:
        """Left-padded `input_ids` / `attention_mask` for `questions`, plus `extra` forward kwargs."""
        if isinstance(questions, str):
            questions = [questions]
        return {**left_pad([self.encode_question(q) for q in questions], self._module.pad_id), **extra}

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        if "rows" in kwargs and kwargs["rows"] is not None:
            return int(kwargs["rows"].shape[0])
        if "input_ids" in kwargs:
            return int(kwargs["input_ids"].shape[0])
        if inputs and isinstance(inputs[0], torch.Tensor):
            return int(inputs[0].shape[0])
        return 0

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        """Stack several invokes into one call: re-pad prompts on the left, offset `rows`."""
        if len(invokes) <= 1:
            return super()._batch(invokes, fn)
        kws = [dict(kw) for _, kw in invokes]
        for (args, kw) in zip([a for a, _ in invokes], kws):
            for name, value in zip(("input_ids", "attention_mask"), args):
                kw[name] = value
        width = max(kw["input_ids"].shape[1] for kw in kws)
        ids, masks, rows, suffix, cands, offset = [], [], [], [], [], 0
        for kw in kws:
            x, m = kw["input_ids"], kw["attention_mask"]
            padn = width - x.shape[1]
            ids.append(torch.nn.functional.pad(x, (padn, 0), value=self._module.pad_id))
            masks.append(torch.nn.functional.pad(m, (padn, 0), value=0))
            r = kw.get("rows")
            r = torch.arange(x.shape[0]) if r is None else r
            rows.append(r.to(torch.long).cpu() + offset)
            offset += x.shape[0]
            s = kw.get("suffix_ids")
            if s is not None:
                suffix.append(s if s.dim() == 2 else s.unsqueeze(0).expand(len(r), -1))
            if kw.get("candidates") is not None:
                cands.append(kw["candidates"])
        out = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks), "rows": torch.cat(rows)}
        if suffix:
            if len(suffix) != len(kws) or len({s.shape[1] for s in suffix}) != 1:
                raise ValueError("batched invokes need suffixes of one length")
            out["suffix_ids"] = torch.cat(suffix)
        if cands:
            if len(cands) != len(kws):
                raise ValueError("batched invokes must all pass candidates, or none")
            a = max(c.shape[2] for c in cands)
            n = max(c.shape[1] for c in cands)
            out["candidates"] = torch.cat([torch.nn.functional.pad(c, (0, a - c.shape[2], 0, n - c.shape[1]),
                                                                   value=-1) for c in cands])
        for kw in kws:
            for key in ("max_new_tokens", "num_latent"):
                if key in kw:
                    out[key] = max(out.get(key, 0), kw[key]) if key == "max_new_tokens" else kw[key]
        return (), out


# The public import path names the class in NDIF model keys: keep keys stable across refactors.
CODIModel.__module__ = "codi_nnsight.model"


def left_pad(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into `input_ids` and `attention_mask` tensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def load_model(spec: str | Path | CODIConfig | None = None, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None) -> CODIModel:
    """Load a CODI model for nnsight: `codi.json` path, folder, preset name, or the bundled toy."""
    return CODIModel(resolve_model_spec(spec), dtype=dtype, device=device)
