"""Coconut (Hao et al. 2024, arXiv 2412.06769; official code `facebookresearch/coconut`) as a `LatentMethod` row.

Three tokens are added with `tokenizer.add_tokens`, in this order: `<|start-latent|>` (id V),
`<|end-latent|>` (V+1) and `<|latent|>` (V+2), V being the base tokenizer's length; eos pads.
The prompt is `question + "\\n"`, `<|start-latent|>`, K latent slots and `<|end-latent|>`. Each
thought is the final-norm state (the LM head's input, transformers' `hidden_states[-1]`) at the
position before its slot, written unchanged over that slot's input embedding: there is no
projection, so the feedback module is the identity. The answer is written `### <answer>` and eos.
"""

from __future__ import annotations

from ..model.answers import extract_answer_number
from .base import LatentMethod, register

#: The added tokens in the order the official `run.py` adds them (so they take ids V, V+1, V+2).
START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"
#: What the official data (`dataset.py`) puts before the answer, and after the question.
ANSWER_DELIMITER = "###"
QUESTION_SUFFIX = "\n"


def parse_coconut_answer(text: str) -> float | None:
    """The answer after the last `#`, as the official evaluation splits it (`text.split("#")[-1]`).

    The official code then compares that tail with the gold string; here its number is read as
    CODI's is (the last number, commas removed), so eos text or trailing spaces do not matter.
    None when the tail holds no number.
    """
    return extract_answer_number(text.rsplit("#", 1)[-1])


COCONUT = register(
    LatentMethod(
        name="coconut",
        description="Coconut: the final-norm last state fed back unchanged as the next input embedding",
        added_tokens=(START_LATENT, END_LATENT, LATENT),
        roles={"pad": None, "start": START_LATENT, "end": END_LATENT},
        feedback="thought",
        feedback_doc="identity: the final-norm state (LM-head input) at the previous position, unchanged",
        answer_prompt=ANSWER_DELIMITER,
        config_file="coconut.json",
        parse_answer=parse_coconut_answer,
        builder="codi_nnsight.model.coconut_checkpoint:build_coconut",
        question_suffix=QUESTION_SUFFIX,
    )
)
