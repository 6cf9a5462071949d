"""Latent-reasoning methods: one row each, the only place a method's specifics live.

A continuous chain-of-thought method is, for this package, a decoder LM that runs the same loop —
`question + start` → K times (last state → `feedback` → next input embedding) → `end` → answer —
and differs only in the rows of `LatentMethod`: its added tokens and their roles, the prompt
around the thoughts, the module that turns a state into the next thought (CODI: `prj` on the
last layer's output; Coconut: nothing — the final-norm state itself), the teacher-forced answer
prompt, how an answer is parsed, and its checkpoint format. Everything else (the call schedule,
sites, patching, readouts, the run layer) asks the model's `method` and never branches on a name.

Adding a method is one module defining a `LatentMethod` and one `register` call.
"""

from .base import METHODS, LatentMethod, method_named, register
from .coconut import COCONUT
from .codi import CODI

__all__ = ["COCONUT", "CODI", "METHODS", "LatentMethod", "method_named", "register"]
