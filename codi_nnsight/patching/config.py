"""One description of a sweep: options, validation, the resume fingerprint and the file attrs.

pyvene serialises an intervention as a config object; here `SweepConfig` plays that role. The
same object produces the fingerprint that `--resume` and multi-component stacking compare, the
provenance attrs of the results file, and the CLI's choices (`OPTIONS`), so the three can never
disagree about what a run was.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..run.fingerprint import fingerprint_difference
from .metrics import RECOVERY_MIN_DENOMINATOR
from .options import (
    ABLATIONS,
    DIRECTIONS,
    MODE_ALIASES,
    MODE_BLOCKS,
    MODES,
    POSITIONS,
    THOUGHT_MODES,
    TOKEN_REGIONS,
)
from .sites import COMPONENTS, SITES

#: The choices of every option, for validation and the CLI.
OPTIONS: dict[str, tuple[str, ...]] = {
    "component": COMPONENTS,
    "positions": POSITIONS,
    "mode": MODES,
    "direction": DIRECTIONS,
}


def canonical_mode(mode: str) -> str:
    """`mode` with old names mapped to the current one (a FutureWarning says the new name)."""
    if isinstance(mode, str) and mode in MODE_ALIASES:
        new = MODE_ALIASES[mode]
        warnings.warn(
            f"mode {mode!r} is now called {new!r}: mode names say what they block ({MODE_BLOCKS[new]})",
            FutureWarning,
            stacklevel=3,
        )
        return new
    return mode


def thought_edge(mode: str) -> str:
    """The one edge out of the patched thought that a thought mode blocks (for messages)."""
    return "fed-back embedding" if mode == "block-thought-feedback" else "keys and values"


@dataclass
class SweepConfig:
    """What a sweep patches; everything that must match for `--resume` to mix results."""

    layers: list[int]
    component: str = "resid"
    positions: str = "all"
    mode: str = "recurrent"
    direction: str = "denoise"
    max_new_tokens: int | None = None
    #: None: activation patching from the source run. Else an ablation of `options.ABLATIONS`, applied
    #: to the clean run (target = clean, `direction` is then "noise": flips and recoveries read as
    #: "moved to the corrupted answer", and `kept` says whether the clean answer survived).
    ablation: str | None = None
    #: `positions="sequence"`: the longest prompt (question tokens + `[bot]`) and answer prompt of
    #: the run's pairs, in tokens — the extent of the position axis (set by `patch_sweep` from the
    #: pairs; part of the fingerprint, so a resume with other pairs cannot mix axes).
    question_tokens: int = 0
    suffix_tokens: int = 0
    #: `positions="sequence"`: the tokens patched (None: all) — offsets from the first thought, as
    #: text ("-3"), and region names of `options.TOKEN_REGIONS`.
    tokens: list[str] | None = None
    #: The changed number's offsets over the run's pairs (set from the pairs when `tokens` names
    #: `number`): the axis holds their union; each pair is patched at its own.
    number_positions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mode = canonical_mode(self.mode)
        self.layers = [int(L) for L in self.layers]
        if self.ablation is not None:
            self.direction = "noise"
        # A site outside the blocks (the fed-back thought) has one "layer": normalised here, once,
        # so that `validate` only checks and never changes what it checks.
        if self.component in SITES and not SITES[self.component].per_layer:
            self.layers = [0]

    @property
    def site(self) -> Any:
        """The patch site (`sites.SITES` entry)."""
        return SITES[self.component]

    def validate(self, model: Any) -> None:
        """Clear one-line errors for values the model cannot take."""
        for name, allowed in OPTIONS.items():
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"--{name} {value!r}: expected one of {', '.join(allowed)}")
        if self.ablation is not None and self.ablation not in ABLATIONS:
            raise UserError(f"--ablation {self.ablation!r}: expected one of {', '.join(ABLATIONS)}")
        if not self.layers:
            raise UserError("--layers: empty layer list")
        bad = [L for L in self.layers if not 0 <= L < model.n_layers]
        if bad:
            raise UserError(
                f"--layers: layer {bad[0]} out of range (model has {model.n_layers} layers, 0-{model.n_layers - 1})"
            )
        if model.num_latent == 0:
            raise UserError("model has num_latent = 0: there are no CoT positions to patch")
        if self.mode in THOUGHT_MODES and self.positions != "each":
            raise UserError(
                f"--mode {self.mode} needs --positions each (it blocks one patched thought's {thought_edge(self.mode)})"
            )
        self._validate_sequence()

    def _validate_sequence(self) -> None:
        """What a sequence sweep refuses, and `tokens` (only with one, and readable)."""
        if self.positions == "sequence":
            # Token positions outside the latent loop exist only for the decoder blocks' sites, and the
            # question's tokens are patched from the source run (an ablation of them is another study).
            if not self.site.per_layer:
                raise UserError(
                    f"--positions sequence patches the blocks at every token; --component {self.component} "
                    "exists only at the thoughts (use --positions each)"
                )
            if self.mode != "recurrent":
                raise UserError(f"--positions sequence runs --mode recurrent only, not {self.mode}")
            if self.ablation is not None:
                raise UserError("--positions sequence patches from the source run; it takes no --ablation")
        if self.tokens is not None:
            if self.positions != "sequence":
                raise UserError("--tokens chooses tokens of a --positions sequence sweep; add --positions sequence")
            for t in self.tokens:
                if t not in TOKEN_REGIONS and not _is_int(t):
                    raise UserError(
                        f"--tokens {t!r}: expected offsets from the first thought (ints, the question's "
                        f"negative) or {', '.join(TOKEN_REGIONS)}"
                    )

    def variants(self, model: Any) -> list[tuple[int, int, int]]:
        """(layer, position, unit) of every patched variant; position -1 = all latent positions at
        once (`all`), else latent position k (`each`) or, for `sequence`, the token's offset from the
        first thought (`sequence_positions`); unit -1 = the whole site (else a head of a per-head site)."""
        if self.positions == "sequence":
            positions = self.sequence_positions(model)
        else:
            positions = [-1] if self.positions == "all" else list(range(model.num_latent))
        return [(L, p, u) for L in self.layers for u in self.site.units(model) for p in positions]

    def sequence_positions(self, model: Any) -> list[int]:
        """`positions="sequence"`: -question_tokens … -1 (the prompt, `[bot]` last), 0 … K-1 (the
        thoughts), K … K + suffix_tokens - 1 (the answer prompt); with `tokens`, those chosen."""
        full = range(-self.question_tokens, model.num_latent + self.suffix_tokens)
        if self.tokens is None:
            return list(full)
        chosen = self.fixed_tokens(model) | (set(self.number_positions) if "number" in self.tokens else set())
        return [p for p in full if p in chosen]

    def fixed_tokens(self, model: Any) -> set[int]:
        """The positions `tokens` chooses for every pair alike (all but `number`'s)."""
        K, n_bot = model.num_latent, len(model.codi.bot_ids())
        full = range(-self.question_tokens, K + self.suffix_tokens)
        regions = {
            "question": lambda p: p < -n_bot,
            "bot": lambda p: -n_bot <= p < 0,
            "thoughts": lambda p: 0 <= p < K,
            "answer": lambda p: p >= K,
        }
        out = {int(t) for t in self.tokens or () if _is_int(t)}
        for name, inside in regions.items():
            if self.tokens is None or name in self.tokens:
                out |= {p for p in full if inside(p)}
        return out

    def fingerprint(self, model: Any, pairs_sha256: str, seed: int) -> dict[str, Any]:
        """Everything that determines the numbers: `--resume` and stacking refuse any difference."""
        fields = dataclasses.asdict(self)
        if self.positions != "sequence":  # the extent of a sequence axis only; other runs keep their fingerprints
            for name in ("question_tokens", "suffix_tokens", "tokens", "number_positions"):
                del fields[name]
        return {
            **fields,
            "model_config": model.codi_config.to_json() if model.codi_config else "",
            "checkpoint_sha256": model.checkpoint_sha256,
            "pairs_sha256": pairs_sha256,
            "dtype": str(model.dtype).replace("torch.", ""),
            "seed": seed,
            "question_normalization": model.question_normalization,
            "recovery_min_denominator": RECOVERY_MIN_DENOMINATOR,
        }

    @staticmethod
    def attrs_of(fingerprint: dict[str, Any]) -> dict[str, Any]:
        """The fingerprint as netCDF attrs (layers as `0,1,2`; None as "")."""
        out = {k: ("" if v is None else v) for k, v in fingerprint.items()}
        out["layers"] = ",".join(map(str, fingerprint["layers"]))
        return out

    @staticmethod
    def difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
        """None when two fingerprints agree, else a one-line description (`run.fingerprint_difference`).

        A stored mode under an old name (`no-feedback`, `feedback-only`, `frozen`) is the same mode.
        """
        if isinstance(stored.get("mode"), str) and stored["mode"] in MODE_ALIASES:
            stored = {**stored, "mode": MODE_ALIASES[stored["mode"]]}
        return fingerprint_difference(stored, current)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except (TypeError, ValueError):
        return False
    return True


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """`"0-3,7"` → [0, 1, 2, 3, 7]; None/"all" → every layer. Errors name the bad piece."""
    if text is None or text.strip() in ("", "all"):
        if text is not None and text.strip() == "":
            raise UserError("--layers: empty layer list")
        return list(range(n_layers))
    out: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if "-" in piece[1:]:
                a, b = piece.split("-", 1) if not piece.startswith("-") else ("-" + piece[1:].split("-")[0], "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
            else:
                lo = hi = int(piece)
        except ValueError:
            raise UserError(f"--layers: cannot read {piece!r} (expected e.g. 0-3,7)") from None
        if not 0 <= lo <= hi < n_layers:  # checked before expanding: 0-9999999999 is no list to build
            what = f"layer {lo}" if lo == hi else piece
            raise UserError(f"--layers: {what} out of range (model has {n_layers} layers, 0-{n_layers - 1})")
        out.extend(range(lo, hi + 1))
    return sorted(dict.fromkeys(out))
