"""`LatentMethod`: what distinguishes one latent-reasoning method from another, as data and small functions."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class LatentMethod:
    """One latent-reasoning method (a row of `METHODS`).

    Attributes:
        name: the method's name (`codi`, ...), recorded in every results file.
        description: one line for docs and reports.
        added_tokens: the tokens the method adds to the base vocabulary, in the order they take
            the ids V, V+1, V+2, ... (V = the base vocabulary size).
        roles: which added token plays which part of the loop: `pad` (or None: the tokenizer's
            eos pads), `start` (ends the question; its last state makes thought 0) and `end`
            (follows the last thought).
        feedback: attribute of the module (and of the nnsight model) that turns the last state
            into the next thought's input embedding; the `latent` patch site is its output.
        feedback_doc: what `feedback` computes, in words.
        answer_prompt: text teacher-forced after `end` before the answer is scored.
        config_file: the json file that describes a checkpoint of this method.
        parse_answer: reads the answer number out of generated text (None: no number).
        question_suffix: text appended to the (normalized) question before it is tokenized
            (Coconut: "\n", as its official data does; CODI: nothing).
        greedy_below: the role whose token bounds greedy decoding: the argmax runs over the ids
            below it, as the official decoder slices its logits (CODI: `end`, so `[eot]` and
            anything after it are never generated); None: over every id (Coconut's official
            `argmax` of the whole row).
    """

    name: str
    description: str
    added_tokens: tuple[str, ...]
    roles: dict[str, str | None]
    feedback: str
    feedback_doc: str
    answer_prompt: str
    config_file: str
    parse_answer: Callable[[str], float | None]
    #: `"module:function"` that builds (module, tokenizer, info) from a config (the checkpoint
    #: format); named, not imported, so the method table stays free of torch and of import cycles.
    builder: str = ""
    question_suffix: str = ""
    greedy_below: str | None = None

    def build(self, cfg: Any, **kwargs: Any) -> Any:
        """Build the model of a config of this method (`builder`)."""
        module, _, func = self.builder.partition(":")
        return getattr(importlib.import_module(module), func)(cfg, **kwargs)

    def token_id(self, role: str, vocab_size: int, eos_token_id: int | None = None) -> int:
        """The id of the added token playing `role` (`pad` falls back to eos when the method has none)."""
        token = self.roles.get(role)
        if token is None:
            if role == "pad" and eos_token_id is not None:
                return int(eos_token_id)
            raise KeyError(f"method {self.name} has no {role} token")
        return vocab_size + self.added_tokens.index(token)


#: Every method, by name.
METHODS: dict[str, LatentMethod] = {}


def register(method: LatentMethod) -> LatentMethod:
    """Add `method` to `METHODS` (refusing a second row with the same name)."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"latent method {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def method_named(name: str) -> LatentMethod:
    """The method called `name`; a one-line error naming the known ones otherwise."""
    if name not in METHODS:
        raise UserError(f"latent method {name!r}: expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
