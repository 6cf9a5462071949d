"""CODI (Shen et al. 2025, arXiv 2502.21074; official code `zhenyi4/codi`) as a `LatentMethod` row.

Three added tokens (pad = V, bot = V+1, eot = V+2); the question ends in `[bot]` (after eos when
`remove_eos` is false); each thought is `prj` of the last layer's output at the previous position
(the final-norm state, as `hidden_states[-1]` in transformers), fed back as the next input
embedding; after the K thoughts come `[eot]` and the answer prompt "The answer is:".
"""

from __future__ import annotations

from ..model.answers import extract_answer_number
from .base import LatentMethod, register

CODI = register(
    LatentMethod(
        name="codi",
        description="CODI: continuous thoughts distilled from a CoT teacher; prj(last state) fed back",
        added_tokens=("[pad]", "[bot]", "[eot]"),
        roles={"pad": "[pad]", "start": "[bot]", "end": "[eot]"},
        feedback="prj",
        feedback_doc="prj (Linear-GELU-Linear[-LayerNorm]) of the last layer's output at the previous position",
        answer_prompt="The answer is:",
        config_file="codi.json",
        parse_answer=extract_answer_number,
        builder="codi_nnsight.model.checkpoint:build_codi",
        greedy_below="end",  # the official decoder's argmax never picks [eot]
    )
)
