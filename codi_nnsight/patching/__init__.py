"""Activation patching at the continuous thoughts: plan, trace, Dataset, partial store, sweep."""

from .sweep import patch_sweep
from .trace import (
    SweepConfig,
    answer_tokens,
    full_patch_check,
    parse_layers,
    plan_batch,
    prompt_inputs,
    run_batch,
)

__all__ = ["SweepConfig", "answer_tokens", "full_patch_check", "parse_layers", "patch_sweep", "plan_batch",
           "prompt_inputs", "run_batch"]
