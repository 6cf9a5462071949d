"""The choices a sweep takes, kept free of heavy imports so the CLI can offer them instantly."""

from __future__ import annotations

POSITIONS = ("all", "each")
#: What each mode holds fixed — the routes an effect can take through the latent loop:
#: `recurrent`: nothing; later latents are recomputed from the patched state (the total effect).
#: `no-feedback`: the patched run's fed-back latent input embeddings are held at the baseline's, so
#: the patched activation reaches the answer only through attention (the *attention route*): not a
#: direct effect, and exactly zero for `resid` at the last layer, whose only route onwards is the
#: feedback.
#: `feedback-only`: the patched position's own states (so the keys and values later positions
#: attend to) are held at the baseline's; only its fed-back embedding — the next latent's input —
#: carries the patch (the *feedback route*). Needs `--positions each`; exactly zero at the last
#: latent position, which feeds nothing back.
MODES = ("recurrent", "no-feedback", "feedback-only")
#: Old mode names still accepted (a warning says the new name).
MODE_ALIASES = {"frozen": "no-feedback"}
DIRECTIONS = ("denoise", "noise")
#: Ablations: what replaces the activation at the patched site instead of another run's activation.
#: `zero`; `mean` over a reference set of questions (the sweep's clean questions by default), per
#: site, layer and latent position; `resample` from another problem (the next pair's clean
#: question, a fixed donor whatever the batch); `noise`: a random direction with the ablated
#: activation's own norm (seeded per pair and site).
ABLATIONS = ("zero", "mean", "resample", "noise")
