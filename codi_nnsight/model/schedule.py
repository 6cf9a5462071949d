"""Which call of a decoder block, or of `prj`, belongs to which latent step.

`CODIModule.forward` calls every decoder block once per pass over new tokens, so nnsight's
`tracer.iter[...]` indexes passes, not positions. The arithmetic lives here and nowhere else:

    decoder call                       what runs
    0 … prefill_calls-1                the question (with a shared prefix: prefixes, then the rests)
    prefill_calls + k, k = 0 … K-1     latent token k (its input embedding is prj call k)
    prefill_calls + K                  the suffix: [eot] and the teacher-forced answer prompt
    then                               one call per scored answer candidate token block, then one
                                       per greedily decoded token after the first

`prj` is called K times; call k turns the last hidden state before latent token k (the
question's `[bot]` for k = 0) into latent token k's input embedding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallSchedule:
    """Call indices of one forward pass with `num_latent` latents and `prefill_calls` prefill passes."""

    num_latent: int
    prefill_calls: int = 1

    def latent_call(self, k: int) -> int:
        """Decoder call that computes latent token k's block outputs."""
        self._check(k)
        return self.prefill_calls + k

    def prj_call(self, k: int) -> int:
        """`prj` call that produces latent token k's input embedding."""
        self._check(k)
        return k

    def latent_of_call(self, call: int) -> int:
        """The latent token a decoder call computes (inverse of `latent_call`)."""
        k = call - self.prefill_calls
        self._check(k)
        return k

    @property
    def latent_calls(self) -> range:
        """Decoder calls of the latent tokens, in order (a `tracer.iter` slice)."""
        return range(self.prefill_calls, self.prefill_calls + self.num_latent)

    @property
    def suffix_call(self) -> int:
        """Decoder call of the suffix (`[eot]` + answer prompt)."""
        return self.prefill_calls + self.num_latent

    @property
    def question_call(self) -> int:
        """Decoder call that ends the question (its last position is `[bot]`; the last prefill call)."""
        return self.prefill_calls - 1

    @property
    def readout_calls(self) -> range:
        """The K + 2 decoder calls whose last position is a step: `[bot]`, each latent, the answer prompt."""
        return range(self.question_call, self.suffix_call + 1)

    def step_calls(self) -> list[tuple[int, str, int]]:
        """`(decoder call, kind, index)` of every step, in order: ("question", 0), ("latent", k), ("suffix", 0).

        The step iterator of the loop: code that reads or patches per step walks this (or the plain
        dicts below, which travel into remote trace bodies as data) instead of doing call arithmetic.
        """
        return [
            (self.question_call, "question", 0),
            *((self.latent_call(k), "latent", k) for k in range(self.num_latent)),
            (self.suffix_call, "suffix", 0),
        ]

    def latent_of_calls(self) -> dict[int, int]:
        """`{decoder call: latent k}` for the latent calls (a plain dict: usable inside a remote trace)."""
        return {call: k for call, kind, k in self.step_calls() if kind == "latent"}

    def thought_fed_by(self) -> dict[int, int]:
        """`{decoder call: j}`: the call's last state becomes thought j's input (via the feedback, e.g. `prj`).

        The question's call feeds thought 0, latent k's call feeds thought k + 1; the last latent's
        entry is K (no thought follows: the loop ends there). A plain dict, usable inside a trace.
        """
        return {call: (0 if kind == "question" else k + 1) for call, kind, k in self.step_calls() if kind != "suffix"}

    def _check(self, k: int) -> None:
        if not 0 <= k < self.num_latent:
            raise IndexError(f"latent step {k} out of range 0..{self.num_latent - 1}")
