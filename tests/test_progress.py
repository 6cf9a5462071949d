"""Long commands say how far they are: the tuned-lens training shows a bar with a time estimate."""

from __future__ import annotations

import torch

from codi_nnsight.readouts.tuned import fit_translators


def test_translator_training_reports_progress_and_stays_the_same(capsys):
    states = torch.randn(8, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    norm, head = torch.nn.LayerNorm(4).double(), torch.nn.Linear(4, 5).double()
    quiet = fit_translators(states, norm, head, steps=5)
    assert capsys.readouterr().err == ""
    shown = fit_translators(states, norm, head, steps=5, progress=True)
    err = capsys.readouterr().err
    assert "training translators" in err and "10/10" in err  # (layers - 1) x steps
    assert all(torch.equal(a, b) for a, b in zip(quiet, shown))  # the bar changes nothing
