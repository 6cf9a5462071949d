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
import logging
from pathlib import Path
from typing import Any

import nnsight
import torch
from nnsight.modeling.mixins.remotable import Remotable

from ..errors import UserError
from .answers import format_answer
from .checkpoint import build_codi
from .config import CODIConfig, check_hub_access, config_from_dict, resolve_model_spec
from .families import Family
from .module import CODIModule
from .schedule import CallSchedule

#: How question text is normalized before tokenizing. `official` is what the official CODI test
#: script does (20 of the 132 seed questions of the original study hold double spaces, which
#: tokenize differently); `none` feeds the text as written.
QUESTION_NORMALIZATIONS: dict[str, Any] = {
    "official": lambda q: q.strip().replace("  ", " "),
    "none": lambda q: q,
}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger(__name__)


def build_model(cfg: Any, **kwargs: Any) -> tuple[CODIModule, Any, dict[str, str]]:
    """(module, tokenizer, info) of a model config: `build_codi`, or its latent method's builder."""
    if isinstance(cfg, CODIConfig):
        return build_codi(cfg, **kwargs)  # looked up here, so tests can spy on `wrapper.build_codi`
    from ..methods import method_named

    return method_named(cfg.method).build(cfg, **kwargs)


class ServerModelMismatch(UserError):
    """The model a remote server runs is not the one loaded here (different weights or checkpoint)."""


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
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r}: not a torch device") from None
    if dev.type == "meta":
        raise UserError("--device meta: holds no data, so nothing can be computed there (use cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return dev


class CODIModel(Remotable):
    """nnsight wrapper of a CODI model (`CODIModule`), remote-capable through NDIF.

    Construct from a `CODIConfig`, a `codi.json` path / folder / preset name, or a ready
    `CODIModule` (then pass `tokenizer=` and `config=`).

    `remote_only=True` builds the structure on the meta device and never reads the weights: the
    model can then run only remotely (`remote=True` or a host URL), where the server holds the
    weights; a local run (also `remote="local"`, which runs here) is refused with a one-line error.
    """

    def __init__(
        self,
        spec: Any,
        *args: Any,
        tokenizer: Any = None,
        config: CODIConfig | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        question_normalization: str = "official",
        remote_only: bool = False,
        **kwargs: Any,
    ) -> None:
        if question_normalization not in QUESTION_NORMALIZATIONS:
            raise UserError(
                f"question normalization {question_normalization!r}: expected one of "
                f"{', '.join(QUESTION_NORMALIZATIONS)}"
            )
        self.question_normalization = question_normalization
        self._codi_dtype = dtype
        self._codi_device = device
        self.remote_only = bool(remote_only)
        if isinstance(spec, CODIModule):
            if remote_only:
                raise UserError("remote_only needs a model config, not a ready module")
            self.codi_config = config
            self.tokenizer = tokenizer
            self.checkpoint_sha256 = ""
            super().__init__(spec, *args, **kwargs)
        else:
            self.codi_config = resolve_model_spec(spec)
            # Remote-only: nnsight's meta build (structure, tokenizer, no weights). Otherwise load now,
            # so load errors surface at load time rather than on the first trace.
            kwargs["dispatch"] = False if remote_only else kwargs.get("dispatch", True)
            super().__init__(self.codi_config, *args, dtype=dtype, device=device, **kwargs)

    # -- loading (nnsight's Loadable/Meta hooks) ---------------------------------------------
    def _load(self, cfg: CODIConfig, *args: Any, dtype: Any = None, device: Any = None, **kwargs: Any) -> CODIModule:
        dev = resolve_device(device)
        check_hub_access(cfg)  # one line now instead of half a minute of hub retries
        module, tok, info = build_model(cfg, dtype=resolve_dtype(dtype, dev), device=dev)
        # Frozen, as NDIF's model actor freezes every parameter: torch picks its matmul kernels by
        # whether a weight requires grad, so only a frozen local model computes the very bits a
        # server does (attribution takes its gradients at the activations, not the parameters).
        module.requires_grad_(False)
        self.tokenizer = tok
        self.checkpoint_sha256 = info["checkpoint_sha256"]
        # Also on the module: a remote trace sees the server's module, so `server_identity` reads
        # the hash of the file the server loaded, not the client's.
        module.checkpoint_sha256 = info["checkpoint_sha256"]
        return module

    def _load_meta(
        self, cfg: CODIConfig, *args: Any, dtype: Any = None, device: Any = None, **kwargs: Any
    ) -> CODIModule:
        check_hub_access(cfg)  # the base's config and tokenizer still come from the hub
        module, tok, _ = build_model(cfg, meta=True)
        # The dtype asked for (meta tensors take no memory): `dtype` reports the client's request,
        # which `provenance` compares with what the server runs.
        module.to(resolve_dtype(dtype, "cpu" if device is None else device))
        self.tokenizer = tok
        # The file's hash names the weights the client means without loading them, so a server
        # that runs other weights is refused (`provenance`); a hub checkpoint not cached is left unnamed.
        self.checkpoint_sha256 = _local_file_sha256(cfg.checkpoint_path)
        return module

    def dispatch(self) -> None:
        """Load the real weights (nnsight calls this before the first local run); refused when remote-only."""
        if self.dispatched:
            return
        if self.remote_only:
            raise UserError(
                f"{self.name} was loaded for remote runs only (remote_only=True): it has no weights "
                "here, so it cannot run locally or with remote='local'; load it without remote_only"
            )
        super().dispatch()

    def _remote_backend(self, remote: bool | str, blocking: bool, job_id: str | None, verbose: bool) -> Any:
        """nnsight's backend for `remote`, with its job-status line off when stdout is no terminal.

        nnsight redraws a spinner line with carriage returns on every status message and every
        0.1 s; in a log file or a pipe each redraw is a new line (about a dozen per request).
        """
        from .remote import status_display_wanted

        backend = super()._remote_backend(remote, blocking, job_id, verbose)
        display = getattr(backend, "display", None)
        if display is not None and not verbose and not status_display_wanted():
            display.enabled = False
        return backend

    # -- remote identity ---------------------------------------------------------------------
    def _remoteable_model_key(self) -> str:
        if self.codi_config is None:
            raise UserError("this CODIModel was built from a ready module; it has no config to name it remotely")
        return self.codi_config.to_json(resolved=True)

    @classmethod
    def _remoteable_from_model_key(cls, model_key: str, **kwargs: Any) -> CODIModel:
        cfg = config_from_dict(json.loads(model_key), source="model key")
        return cls(cfg, **kwargs)

    # -- structure -----------------------------------------------------------------------------
    @property
    def codi(self) -> CODIModule:
        """The wrapped plain `CODIModule`."""
        return self._module

    @property
    def method(self) -> Any:
        """The latent-reasoning method's row (`codi_nnsight.methods.LatentMethod`)."""
        return self._module.method

    @property
    def feedback(self) -> Any:
        """Envoy of the module that makes each thought from the last state (CODI: `prj`)."""
        return getattr(self, self._module.method.feedback)

    @property
    def family(self) -> Family:
        """The model family's row of the family table (module paths, LoRA targets, ...)."""
        return self._module.family

    @property
    def layers(self) -> Any:
        """Envoys of the decoder blocks (`transformer.h`, `model.layers`, ... by family)."""
        return self.family.blocks(self.lm)

    def block_part(self, layer: int, part: str | None) -> Any:
        """Envoy of a decoder block (`part` None) or of one of its parts named in the family table.

        `part` is `attention`, `attention_out` or `mlp` (see `families.Family`).
        """
        block = self.layers[layer]
        return block if part is None else self.family.part(block, part)

    def schedule(self, prefill_calls: int = 1) -> CallSchedule:
        """Which decoder / prj call is which latent step (see `model.schedule`)."""
        return self._module.schedule(prefill_calls)

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

    # -- provenance: what computes the numbers ---------------------------------------------------
    def fingerprint_parameters(self) -> list[str]:
        """Names of the parameters in the weights fingerprint: the matrices of the first and last block and the prj.

        Chosen from the structure alone (the same on a meta-loaded client and on the server). Every
        block carries merged LoRA weights, so a different checkpoint or base shows in these.
        """
        mod = self._module
        names = {id(m): n for n, m in mod.named_modules()}
        parts = [mod.layers[0], mod.layers[-1], getattr(mod, "prj", None)]
        prefixes = tuple(names[id(m)] + "." for m in parts if m is not None and id(m) in names)
        # Matrices only: norm and bias vectors add little (a fresh LayerNorm's L1 norm is just its width).
        return [n for n, p in mod.named_parameters() if n.startswith(prefixes) and p.dim() >= 2]

    def weights_fingerprint(self) -> list[float] | None:
        """Float64 L1 norms of `fingerprint_parameters()` in this process's weights (None when remote-only).

        Compare with a server's through `fingerprints_agree`: an L1 norm moves by at most the
        dtype's unit roundoff when weights are cast, so equal weights in different dtypes agree.
        """
        if not self.dispatched:
            return None
        params = dict(self._module.named_parameters())
        with torch.no_grad():
            return [_l1_norm(params[n]) for n in self.fingerprint_parameters()]

    def server_identity(self, remote: bool | str) -> dict[str, Any]:
        """What the model that runs this object's traces for `remote` is, probed where it runs.

        One small request (a session without a forward pass) for a remote target; computed here for
        `remote=False`. Returns `where` ("local", "remote-simulation" or "server"), `dtype` (the
        parameters' dtype holding the most weights, e.g. "float32"), `dtypes` ({dtype: numel}),
        `device` ("cuda", "cpu"; comma-joined when several), `n_params`, `fingerprint_parameters`
        and `weights_fingerprint` (see `weights_fingerprint`), and `checkpoint_sha256` (the file
        the server loaded; "" when its codi_nnsight does not report one).

        Raises:
            RemoteUnavailable: the remote target failed (one line, as for any remote trace).
            UserError: `remote=False` on a remote-only model (there are no weights here to describe).
        """
        from .remote import remote_errors, trace_kwargs

        names = self.fingerprint_parameters()
        if not remote:
            if not self.dispatched:
                raise UserError(f"{self.name} was loaded for remote runs only: there are no local weights to describe")
            params = dict(self._module.named_parameters())
            dtypes: dict[str, int] = {}
            for p in params.values():
                key = str(p.dtype).replace("torch.", "")
                dtypes[key] = dtypes.get(key, 0) + p.numel()
            raw = {
                "dtypes": dtypes,
                "devices": ",".join(sorted({p.device.type for p in params.values()})),
                "fingerprint": self.weights_fingerprint(),
                "sha": self.checkpoint_sha256,
            }
        else:
            # Only torch and plain Python in the body: it runs on the server, against the server's module
            # (`self.codi` resolves there), with the package's own code possibly absent (remote="local").
            # The norms are taken in 4M-element chunks so the float64 upcast never copies a whole weight.
            with remote_errors(remote), self.session(**trace_kwargs(remote)):
                codi = self.codi
                params = dict(codi.named_parameters())
                counts = {}
                for p in params.values():
                    key = str(p.dtype).replace("torch.", "")
                    counts[key] = counts.get(key, 0) + p.numel()
                dtypes_s = nnsight.save(counts)
                devices_s = nnsight.save(",".join(sorted({p.device.type for p in params.values()})))
                norms_s = nnsight.save(
                    torch.stack(
                        [
                            sum(
                                torch.linalg.vector_norm(c, ord=1, dtype=torch.float64)
                                for c in params[n].detach().reshape(-1).split(1 << 22)
                            )
                            .reshape(())
                            .cpu()
                            for n in names
                        ]
                    )
                )
                sha_s = nnsight.save(str(getattr(codi, "checkpoint_sha256", "") or ""))
                versions_s = nnsight.save(
                    {"version_torch": str(torch.__version__), "version_nnsight": str(nnsight.__version__)}
                )
            raw = {
                "dtypes": dict(dtypes_s),
                "devices": str(devices_s),
                "fingerprint": [float(x) for x in torch.as_tensor(norms_s).tolist()],
                "sha": str(sha_s),
                "versions": {str(k): str(v) for k, v in dict(versions_s).items()},
            }
        dtypes = {str(k): int(v) for k, v in raw["dtypes"].items()}
        return {
            "where": "local" if not remote else "remote-simulation" if remote == "local" else "server",
            "dtype": max(dtypes, key=lambda k: dtypes[k]) if dtypes else "unknown",
            "dtypes": dtypes,
            "device": raw["devices"],
            "n_params": sum(dtypes.values()),
            "fingerprint_parameters": names,
            "weights_fingerprint": raw["fingerprint"],
            "checkpoint_sha256": raw["sha"],
            "versions": raw.get("versions", {}),
        }

    def provenance(self, remote: bool | str, identity: dict[str, Any] | None = None) -> dict[str, Any]:
        """Results-file attrs saying what computed the numbers, checked against this model.

        Keys: `computed_on` ("local" | "remote-simulation" | "server"); `dtype` (the dtype the
        numbers were computed in) with `dtype_source` ("client" | "server") and `client_dtype`;
        `device`; `checkpoint_sha256` with `checkpoint_sha256_source` ("client": computed here;
        "server": reported by the server; "client-verified": the server reports none but its
        weights fingerprint matches this model's; "unknown": neither, and the hash is "");
        `weights_fingerprint` (JSON list of float64 L1 norms) with `weights_fingerprint_params`
        (JSON list of parameter names) and `n_params`. Every value is a str or an int (netCDF-safe).

        A dtype differing from the client's is logged as a warning (the numbers are valid, in the
        server's precision, and recorded as such).

        Raises:
            ServerModelMismatch: the server's weights fingerprint or checkpoint hash differs from
                this model's (its numbers would be attributed to the wrong model).
        """
        ident = identity if identity is not None else self.server_identity(remote)
        client_dtype = str(self.dtype).replace("torch.", "")
        here = ident["where"] != "server"
        attrs: dict[str, Any] = {
            "computed_on": ident["where"],
            "dtype": ident["dtype"] if ident["dtype"] != "unknown" else client_dtype,
            "dtype_source": "client" if here or ident["dtype"] == "unknown" else "server",
            "client_dtype": client_dtype,
            "device": ident["device"] or str(self.device),
            "n_params": int(ident["n_params"]),
            "weights_fingerprint": json.dumps(ident["weights_fingerprint"]),
            "weights_fingerprint_params": json.dumps(ident["fingerprint_parameters"]),
        }
        if here:
            attrs.update(checkpoint_sha256=self.checkpoint_sha256, checkpoint_sha256_source="client")
            return attrs
        # The libraries the server ran (`version_torch`, ...): the numbers are theirs, not the client's.
        attrs.update({str(k): str(v) for k, v in (ident.get("versions") or {}).items()})
        from .remote import describe

        where = f"remote {describe(remote)}"
        mine = self.weights_fingerprint()
        if mine is not None and not fingerprints_agree(mine, self.dtype, ident["weights_fingerprint"], ident["dtype"]):
            worst = max(range(len(mine)), key=lambda i: abs(mine[i] - ident["weights_fingerprint"][i]))
            raise ServerModelMismatch(
                f"{where}: the server's weights are not this model's ({ident['fingerprint_parameters'][worst]}: "
                f"L1 norm {ident['weights_fingerprint'][worst]:.10g} there, {mine[worst]:.10g} here, beyond "
                f"{ident['dtype']}/{client_dtype} rounding); its numbers would be attributed to the wrong checkpoint"
            )
        server_sha = ident["checkpoint_sha256"]
        if server_sha and self.checkpoint_sha256 and server_sha != self.checkpoint_sha256:
            mine_path = self.codi_config.checkpoint_path if self.codi_config else "this model"
            raise ServerModelMismatch(
                f"{where}: the server runs checkpoint sha256 {server_sha[:12]}..., not {mine_path} "
                f"(sha256 {self.checkpoint_sha256[:12]}...); refusing to attribute its numbers to this checkpoint"
            )
        if server_sha:
            attrs.update(checkpoint_sha256=server_sha, checkpoint_sha256_source="server")
        elif mine is not None and self.checkpoint_sha256:
            attrs.update(checkpoint_sha256=self.checkpoint_sha256, checkpoint_sha256_source="client-verified")
        else:
            attrs.update(checkpoint_sha256="", checkpoint_sha256_source="unknown")
        if attrs["dtype"] != client_dtype:
            log.warning(
                "%s computes in %s (its deployment), not the %s asked for here; the results record dtype=%s",
                where,
                attrs["dtype"],
                client_dtype,
                attrs["dtype"],
            )
        return attrs

    # -- inputs --------------------------------------------------------------------------------
    def normalize_question(self, question: str) -> str:
        """The question text as the model is fed it (see `QUESTION_NORMALIZATIONS`)."""
        return QUESTION_NORMALIZATIONS[self.question_normalization](question)

    def encode_question(self, question: str) -> list[int]:
        """Token ids of the normalized `question` (+BOS when the tokenizer adds one) followed by `[bot]`."""
        text = self.normalize_question(question) + self.method.question_suffix  # Coconut: question + "\n"
        return list(self.tokenizer(text).input_ids) + self._module.bot_ids()

    @property
    def context_length(self) -> int | None:
        """Positions the base model supports (None when its config does not say)."""
        cfg = self._module.lm.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def check_fits(self, pairs: Any, extra: int) -> None:
        """Refuse, naming the pair, any question that with `extra` more tokens exceeds the context.

        Checked before any work: a question past the context would otherwise run silently on
        positions the model never saw (or, for a huge `num_latent`, seemingly forever).
        """
        limit = self.context_length
        if not limit:
            return
        if extra >= limit:
            raise UserError(
                f"{extra} tokens for latents and answer (num_latent {self.num_latent}) exceed the "
                f"model's context of {limit}"
            )
        for p in pairs:
            for variant in ("clean", "corrupted"):
                n = len(self.encode_question(getattr(p, variant).question))
                if n + extra > limit:
                    raise UserError(
                        f"pair_id {p.pair_id}, {variant} question: {n} tokens + {extra} for "
                        f"latents and answer exceed the model's context of {limit}"
                    )

    def check_text(self, pairs: Any) -> None:
        """Refuse, naming the pair, text the tokenizer would silently change.

        A question whose text becomes a special token (`</s>`, `<unk>`, ...) feeds the model
        something the question does not say; an answer the tokenizer cannot spell (`<unk>`) makes
        two different answers score identically, so logit and log-probability differences vanish.
        """
        tok = self.tokenizer
        special = set(getattr(tok, "all_special_ids", []) or [])
        unk = getattr(tok, "unk_token_id", None)
        for p in pairs:
            for variant in ("clean", "corrupted"):
                q = getattr(p, variant)
                if "\x00" in q.question:  # netCDF strings end at NUL: the stored question would be cut there
                    raise UserError(
                        f"pair_id {p.pair_id}, {variant} question: contains a NUL character at character "
                        f"{q.question.index(chr(0))}"
                    )
                ids = tok(self.normalize_question(q.question), add_special_tokens=False).input_ids
                bad = sorted({tok.convert_ids_to_tokens(i) for i in ids if i in special})
                if bad:
                    raise UserError(
                        f"pair_id {p.pair_id}, {variant} question: the text contains the special "
                        f"token(s) {', '.join(bad)}; remove them from the question"
                    )
                answer = format_answer(q.answer)
                if unk is not None and unk in tok(f" {answer}", add_special_tokens=False).input_ids:
                    raise UserError(
                        f"pair_id {p.pair_id}, {variant} answer {answer}: the tokenizer cannot spell it "
                        f"(it becomes {tok.unk_token}), so it would score like any other unknown answer"
                    )

    def prepare(self, questions: list[str] | str, **extra: Any) -> dict[str, Any]:
        """Left-padded `input_ids` / `attention_mask` for `questions`, plus `extra` forward kwargs.

        Raises:
            UserError: an empty question, or one that with the latents does not fit the context.
        """
        if isinstance(questions, str):
            questions = [questions]
        seqs = []
        limit = self.context_length
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise TypeError(f"question {i}: expected text, got {type(q).__name__}")
            if not q.strip():
                raise UserError(f"question {i} is empty: the model needs a question to think about")
            ids = self.encode_question(q)
            if limit and len(ids) + self.num_latent >= limit:
                raise UserError(
                    f"question {i}: {len(ids)} tokens + {self.num_latent} latents exceed the model's context of {limit}"
                )
            seqs.append(ids)
        return {**left_pad(seqs, self._module.pad_id), **extra}

    def _invoke_inputs(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """One invoke's forward arguments as keywords; question text is encoded like `prepare`.

        `model.trace("What is 2+3?")` and `tracer.invoke(["q1", "q2"])` work as with nnsight's
        `LanguageModel`. Arguments `forward` has but that cannot be combined across invokes are
        refused here rather than silently dropped.
        """
        kw = dict(kwargs)
        if args and (
            isinstance(args[0], str)
            or (isinstance(args[0], (list, tuple)) and args[0] and all(isinstance(q, str) for q in args[0]))
        ):
            kw = {**self.prepare(args[0]), **kw}
            args = args[1:]
        elif args and not isinstance(args[0], torch.Tensor):
            raise TypeError(
                "CODIModel.trace: expected question text, a list of questions or input_ids, "
                f"got {type(args[0]).__name__}"
            )
        for name, value in zip(("input_ids", "attention_mask"), args):
            kw[name] = value
        if len(args) > 2:
            raise TypeError(
                f"CODIModel: give forward inputs after input_ids and attention_mask as keywords "
                f"({len(args)} positional arguments)"
            )
        unknown = sorted(set(kw) - set(BATCHED_INPUTS) - set(SHARED_INPUTS))
        if unknown:
            raise TypeError(
                f"CODIModel: unknown forward argument(s) {', '.join(unknown)}; "
                f"known: {', '.join(BATCHED_INPUTS + SHARED_INPUTS)}"
            )
        return kw

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        if not inputs and not kwargs:
            return 0
        kw = self._invoke_inputs(inputs, kwargs)
        if kw.get("rows") is not None:
            return int(kw["rows"].shape[0])
        return int(kw["input_ids"].shape[0]) if "input_ids" in kw else 0

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        """Combine invokes into one forward call: every argument in `BATCHED_INPUTS` is merged.

        Prompts are re-padded on the left, `rows` and `prompt_prefix` offset, suffixes and
        candidates stacked; `SHARED_INPUTS` must agree (max_new_tokens takes the largest). The
        rows of invoke i follow those of invoke i-1, which is the order nnsight slices outputs in.
        """
        kws = [self._invoke_inputs(args, kw) for args, kw in invokes if args or kw]
        if len(kws) <= 1:
            return (), (kws[0] if kws else {})
        return (), batch_invokes(kws, self._module.pad_id)


#: Forward arguments with one entry per prompt or row; `_batch` merges them across invokes.
BATCHED_INPUTS = (
    "input_ids",
    "attention_mask",
    "rows",
    "suffix_ids",
    "candidates",
    "prefix_ids",
    "prefix_mask",
    "prompt_prefix",
)
#: Forward arguments that hold for the whole call.
SHARED_INPUTS = ("max_new_tokens", "num_latent", "keep_grad")


def batch_invokes(kws: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Merge the keyword inputs of several invokes into one `CODIModule.forward` call."""
    with_prefix = [kw.get("prefix_ids") is not None for kw in kws]
    if any(with_prefix) and not all(with_prefix):
        raise ValueError("batched invokes must all use shared prefixes (prefix_ids), or none")
    if len({kw.get("num_latent") for kw in kws}) > 1:
        raise ValueError("batched invokes need the same num_latent")
    n_prompts = [kw["input_ids"].shape[0] for kw in kws]
    offsets = [sum(n_prompts[:i]) for i in range(len(kws))]
    rows = [
        (torch.arange(n) if kw.get("rows") is None else kw["rows"].to(torch.long).cpu()) + off
        for kw, n, off in zip(kws, n_prompts, offsets)
    ]
    out: dict[str, Any] = {
        **_pad_left_cat([kw["input_ids"] for kw in kws], [kw["attention_mask"] for kw in kws], pad_id),
        "rows": torch.cat(rows),
    }
    if all(with_prefix):
        pre = _pad_left_cat([kw["prefix_ids"] for kw in kws], [kw["prefix_mask"] for kw in kws], pad_id)
        out["prefix_ids"], out["prefix_mask"] = pre["input_ids"], pre["attention_mask"]
        n_pre = [kw["prefix_ids"].shape[0] for kw in kws]
        out["prompt_prefix"] = torch.cat([kw["prompt_prefix"].cpu() + sum(n_pre[:i]) for i, kw in enumerate(kws)])
    suffix = [kw.get("suffix_ids") for kw in kws]
    if any(s is not None for s in suffix):
        if any(s is None for s in suffix) or len({s.shape[-1] for s in suffix}) != 1:
            raise ValueError("batched invokes need suffixes of one length")
        out["suffix_ids"] = torch.cat(
            [s if s.dim() == 2 else s.unsqueeze(0).expand(len(r), -1) for s, r in zip(suffix, rows)]
        )
    cands = [kw.get("candidates") for kw in kws]
    if any(c is not None for c in cands):
        if any(c is None for c in cands):
            raise ValueError("batched invokes must all pass candidates, or none")
        a, n = max(c.shape[2] for c in cands), max(c.shape[1] for c in cands)
        out["candidates"] = torch.cat(
            [torch.nn.functional.pad(c, (0, a - c.shape[2], 0, n - c.shape[1]), value=-1) for c in cands]
        )
    if any("max_new_tokens" in kw for kw in kws):
        out["max_new_tokens"] = max(kw.get("max_new_tokens", 0) for kw in kws)
    if kws[0].get("num_latent") is not None:
        out["num_latent"] = kws[0]["num_latent"]
    if any(kw.get("keep_grad") for kw in kws):
        out["keep_grad"] = True
    return out


def _pad_left_cat(ids: list[torch.Tensor], masks: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad (ids, mask) blocks to one width and stack them."""
    width = max(x.shape[1] for x in ids)
    return {
        "input_ids": torch.cat([torch.nn.functional.pad(x, (width - x.shape[1], 0), value=pad_id) for x in ids]),
        "attention_mask": torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0), value=0) for m in masks]),
    }


# The public import path names the class in NDIF model keys: keep keys stable across refactors.
CODIModel.__module__ = "codi_nnsight.model"


def left_pad(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into `input_ids` and `attention_mask` tensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def load_model(
    spec: str | Path | CODIConfig | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    question_normalization: str = "official",
    remote_only: bool = False,
) -> CODIModel:
    """Load a CODI model for nnsight: `codi.json` path, folder, preset name, or the bundled toy.

    `question_normalization="official"` feeds questions as the official CODI evaluation does
    (`question.strip().replace("  ", " ")`); `"none"` feeds them as written.
    `remote_only=True` reads no weights (nnsight's meta build: structure and tokenizer only), for a
    model that runs only on a remote server (`remote=True` or a URL; not `"local"`, which runs here).
    """
    return CODIModel(
        resolve_model_spec(spec),
        dtype=dtype,
        device=device,
        question_normalization=question_normalization,
        remote_only=remote_only,
    )


#: Unit roundoff of each dtype: casting moves every element, and so an L1 norm, by at most this factor.
_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def _local_file_sha256(location: str) -> str:
    """sha256 of a checkpoint that is a local file ("" for a hub location or a missing file)."""
    from .checkpoint import file_sha256

    if location.startswith("hf://") or not Path(location).is_file():
        return ""
    return file_sha256(location)


def _l1_norm(p: torch.Tensor) -> float:
    """Float64 L1 norm of a tensor, in 4M-element chunks (the upcast never copies a whole weight)."""
    return float(
        sum(torch.linalg.vector_norm(c, ord=1, dtype=torch.float64) for c in p.detach().reshape(-1).split(1 << 22))
    )


def fingerprints_agree(a: list[float], dtype_a: str | torch.dtype, b: list[float], dtype_b: str | torch.dtype) -> bool:
    """Whether two weights fingerprints (`CODIModel.weights_fingerprint`) can come from the same weights.

    Each side's weights are the same float64 weights cast to its dtype, which moves an L1 norm by
    at most the dtype's unit roundoff (relative); twice the sum of both sides' roundoffs allows for
    the float64 summation. An unknown dtype counts as bfloat16 (the coarsest listed). This is a
    fingerprint, not a hash: it tells different checkpoints apart, not every possible edit.
    """
    if len(a) != len(b):
        return False
    names = [str(d).replace("torch.", "") for d in (dtype_a, dtype_b)]
    tol = 2 * sum(_ROUNDOFF.get(n, _ROUNDOFF["bfloat16"]) for n in names) + 1e-12
    return all(abs(x - y) <= tol * max(abs(x), abs(y)) for x, y in zip(a, b))
