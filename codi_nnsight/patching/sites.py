"""Patch sites as data: where an activation is read from the source run and written into a target run.

A site names a module of the family table (`model.families`) whose output is patched at the
latent positions, so a new site is one entry here plus its tests; plan, trace and Dataset take
everything they need from the entry (TransformerLens' `patching.py` does the same with one
generic patch loop and one small setter per site).

Position k means latent token k for every site: for layer sites it is the sub-layer's output at
latent token k (decoder call `schedule.latent_call(k)`); for `latent` it is latent token k's
input embedding (`prj` call k), which the model computed from the token before it. So `resid`
at the last layer, position k, is the same intervention as `latent` at position k + 1, and
`resid` at the last layer, position K-1, feeds nothing that the answer reads through `prj`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Site:
    """One kind of activation to patch."""

    name: str
    description: str
    #: Part of a decoder block in the family table (None: the block itself); unused when not per-layer.
    part: str | None = None
    #: False for sites outside the decoder blocks (the fed-back latent embedding): one "layer" only.
    per_layer: bool = True
    #: What is patched: the module's `output`, or its `input` (per-head outputs live in the input
    #: of the attention output projection, before the heads are mixed).
    reads: str = "output"
    #: An extra dimension the site splits its tensor along (`head`), or None.
    axis: str | None = None

    def envoy(self, model: Any, layer: int) -> Any:
        """The nnsight envoy whose output (or input) is this site at `layer`."""
        if not self.per_layer:
            return model.feedback  # the method's feedback module (CODI: prj)
        return model.block_part(layer, self.part)

    def units(self, model: Any) -> list[int]:
        """Indices along `axis` (head numbers); [-1] (the whole tensor) for sites without one."""
        return list(range(n_heads(model))) if self.axis == "head" else [-1]

    def unit_slice(self, model: Any, unit: int) -> slice:
        """The slice of the last dimension that unit `unit` owns (everything for -1)."""
        if unit < 0:
            return slice(None)
        width = head_dim(model)
        return slice(unit * width, (unit + 1) * width)


#: Every patch site, by name. `--component` takes these names.
SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site("resid", "the residual stream: a decoder block's output"),
        Site("attn", "the attention sub-layer's output (before it is added to the residual stream)", part="attention"),
        Site("mlp", "the MLP sub-layer's output (before it is added to the residual stream)", part="mlp"),
        Site(
            "latent",
            "the continuous thought fed back as the next input embedding (the method's feedback output: CODI's prj)",
            per_layer=False,
        ),
        Site(
            "head",
            "one attention head's output: its slice of the input to the attention output projection",
            part="attention_out",
            reads="input",
            axis="head",
        ),
    )
}

COMPONENTS = tuple(SITES)


def n_heads(model: Any) -> int:
    """Attention heads per layer (query heads: the ones whose outputs are concatenated)."""
    return int(model.codi.lm.config.num_attention_heads)


def head_dim(model: Any) -> int:
    """Width of one head's output."""
    cfg = model.codi.lm.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def output_tensor(out: Any) -> Any:
    """The hidden-state tensor of a module output (blocks and attention return tuples)."""
    return out[0] if isinstance(out, tuple) else out
