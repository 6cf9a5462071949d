"""The choices a sweep takes, kept free of heavy imports so the CLI can offer them instantly."""

from __future__ import annotations

#: `all` latent positions at once; `each` latent position on its own; `sequence`: every token of
#: the run on its own — the question's tokens, the `[bot]` marker, each thought and each token of
#: the answer prompt (`[eot] The answer is:`), on one `position` axis counted from the first thought
#: (question tokens negative, thoughts 0 … K-1, the answer prompt K …).
POSITIONS = ("all", "each", "sequence")
#: `--tokens` of a sequence sweep: besides offsets from the first thought (ints), these regions.
#: `number` is the changed number's tokens of each pair (at other offsets in other pairs).
TOKEN_REGIONS = ("question", "number", "bot", "thoughts", "answer")
#: Each mode is named after what it BLOCKS on the way from the patched site at latent p to the
#: answer (the path diagram is in docs/results-schema.md, "Modes and routes"). Out of latent p's
#: own column leave exactly two edges: its keys and values, which every later token attends to
#: (the *attention* edge), and its fed-back embedding prj(h_p), the input of latent p + 1 (the
#: *feedback* edge). Every path to the answer starts with one of them.
#:
#: `recurrent`: blocks nothing; later latents are recomputed from the patched state: the total.
#: `block-all-feedback`: every fed-back latent input embedding of the patched run is held at the
#: baseline's (formerly `no-feedback`, before that `frozen`): what reaches the answer through
#: attention alone, with no feedback anywhere downstream. Not a direct effect; exactly zero for
#: `resid` at the last layer, whose only route onwards is the feedback.
#: `block-thought-feedback`: only the patched thought's own fed-back embedding (the input of
#: latent p + 1) is held at the baseline's; later latents, and their feedback, are recomputed:
#: the *attention route*, including "latent q attends to p, then feeds q's state back". Needs
#: `--positions each`; equals `recurrent` at the last latent position (which feeds nothing back).
#: `block-thought-attention`: the patched thought's own states (so the keys and values later
#: tokens attend to) are held at the baseline's; only its fed-back embedding carries the patch
#: (formerly `feedback-only`): the *feedback route*. Needs `--positions each`; exactly zero at the
#: last latent position.
MODES = ("recurrent", "block-all-feedback", "block-thought-feedback", "block-thought-attention")
#: Modes that patch one thought at a time (they block one thought's edge): need `--positions each`.
THOUGHT_MODES = ("block-thought-feedback", "block-thought-attention")
#: What each mode blocks, in words (warnings, docs).
MODE_BLOCKS = {
    "recurrent": "nothing: the total effect through the latent loop",
    "block-all-feedback": "every fed-back latent embedding",
    "block-thought-feedback": "the patched thought's own fed-back embedding",
    "block-thought-attention": "the keys and values of the patched thought",
}
#: `mode="routes"`: not one sweep but the route split (`sweep.route_split`): the total, the
#: feedback route, the attention route and their interaction, on a `route` dimension.
ROUTES = "routes"
#: Old mode names still accepted (a FutureWarning says the new name).
MODE_ALIASES = {
    "frozen": "block-all-feedback",
    "no-feedback": "block-all-feedback",
    "feedback-only": "block-thought-attention",
}
#: Every `--mode` value the CLI accepts: the sweep modes, the route split and the old names.
MODE_CHOICES = (*MODES, ROUTES, *MODE_ALIASES)
DIRECTIONS = ("denoise", "noise")
#: Ablations: what replaces the activation at the patched site instead of another run's activation.
#: `zero`; `mean` over a reference set of questions (the sweep's clean questions by default), per
#: site, layer and latent position; `resample` from another problem (the next pair's clean
#: question, a fixed donor whatever the batch); `noise`: a random direction with the ablated
#: activation's own norm (seeded per pair and site).
ABLATIONS = ("zero", "mean", "resample", "noise")
