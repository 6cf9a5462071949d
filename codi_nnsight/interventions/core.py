"""One traced batch of intervened rows: edits at the thoughts, readouts of the answer and every thought.

Every intervention command (transplant, steer, thought graph) is a list of `Row`s: a question
and the `Edit`s made to its run. `run_rows` groups the rows by answer prompt, adds one unedited
*base* row per distinct question of each batch, and runs each batch in one nnsight trace through
the command's `Run`. The trace walks the call schedule (`model.schedule().readout_calls` and
`thought_fed_by()`), never call arithmetic:

* a **site** is either the thought itself (`layer=None`: latent token k's input embedding, the
  output of the method's feedback module — CODI's `prj`, Coconut's final norm) or the residual
  stream at block `layer`, latent position k (the block's output at latent token k);
* an **edit** is `set` (replace the state by a vector), `add` (h + x·‖h‖: x is λ·v̂, so λ is in
  units of the state's own norm) or `project` (h − s·(h·v̂)v̂: remove a share s of v̂).

Each row comes back with its answer (decoded greedily after the teacher-forced answer prompt),
the KL of its answer distribution from its base row, the teacher-forced log-probabilities of
candidate answers, its K thoughts after the edits (float64), the block outputs of requested
layers at every latent position, and per thought j the change from the base row: L2 distance,
cosine similarity, KL of the thought's lens distribution (`softmax(lm_head(norm(thought)))`, as
the `lens` readout decodes a thought) and whether its top lens token changed. Rows never depend
on their batch (a base row is its own question's, run in the same trace).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nnsight
import numpy as np
import torch

from ..errors import UserError
from ..model.families import resolve
from ..model.inference import decode
from ..model.remote import remote_errors, trace_kwargs
from ..patching.sites import output_tensor
from ..patching.trace import cut_to_limits

__all__ = ["EDIT_KINDS", "Edit", "Row", "RowResults", "apply_edits", "rows_batch", "run_rows"]

EDIT_KINDS = ("set", "add", "project")


@dataclass(frozen=True)
class Edit:
    """One change to a row's run: at latent position `k` of the site (`layer` None: the thought)."""

    k: int
    kind: str
    vector: Any  # (d,) tensor: the new state (set), λ·v̂ (add), or v̂ (project)
    layer: int | None = None
    share: float = 1.0  # project only: the share of the component along v̂ removed


@dataclass
class Row:
    """A question and the edits made to its run; `candidates` are answers scored by teacher forcing."""

    question: str
    suffix: tuple[int, ...]
    candidates: list[list[int]]
    edits: list[Edit] = field(default_factory=list)


@dataclass
class RowResults:
    """`run_rows`'s answer: one entry per row (in row order) and one per distinct question (base runs)."""

    answer: np.ndarray  # (rows,) decoded answers (NaN: no number)
    kl: np.ndarray  # (rows,) KL(row || base row) at the answer position, nats
    cand_logp: np.ndarray  # (rows, C) teacher-forced log-probabilities of the candidates
    thoughts: np.ndarray  # (rows, K, d) thoughts after the edits
    states: dict[int, np.ndarray]  # layer -> (rows, K, d) block outputs at the latent positions
    state_l2: np.ndarray  # (rows, K) ‖thought_j - base thought_j‖
    state_cos: np.ndarray  # (rows, K) cosine(thought_j, base thought_j)
    lens_kl: np.ndarray  # (rows, K) KL of thought j's lens distribution from the base row's
    lens_top_changed: np.ndarray  # (rows, K) 1.0 where thought j's top lens token changed
    base_answer: dict[str, float]  # question -> its unedited answer
    text: list[str] = field(default_factory=list)  # (rows,) decoded answer text
    base_text: list[str] = field(default_factory=list)  # (rows,) the unedited run's, cut to the row's limit

    def changed(self) -> np.ndarray:
        """(rows,) 1.0 where a row's decoded answer text differs from its question's unedited one."""
        return np.array([float(t != b) for t, b in zip(self.text, self.base_text)])


def apply_edits(h: torch.Tensor, edits: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Write `edits` [(kind, rows, vectors (n, d), shares (n, 1))] into `h` (rows, tokens, d) at its last token.

    Torch only: it runs inside traces, remotely too. `add` scales by the state's own norm before
    the edit, so λ means "this many thought norms".
    """
    for kind, rows, x, share in edits:
        cur = h[rows, -1, :]
        x = x.to(cur.dtype)
        if kind == "set":
            h[rows, -1, :] = x
        elif kind == "add":
            h[rows, -1, :] = cur + x * cur.norm(dim=-1, keepdim=True)
        else:  # "project"
            h[rows, -1, :] = cur - share.to(cur.dtype) * (cur * x).sum(-1, keepdim=True) * x


def _tables(rows: Sequence[Row], offset: int, calls: dict[int, int], device: Any) -> tuple[dict, dict]:
    """Edits grouped per (layer, decoder call) and per thought: one vectorised write per kind each."""
    groups: dict[tuple[Any, str], list[tuple[int, Edit]]] = {}
    for r, row in enumerate(rows):
        for e in row.edits:
            if e.kind not in EDIT_KINDS:
                raise ValueError(f"edit kind {e.kind!r}: expected one of {', '.join(EDIT_KINDS)}")
            key = ("prj", e.k) if e.layer is None else ((e.layer, calls[e.k]))
            groups.setdefault((key, e.kind), []).append((offset + r, e))
    layer_edits: dict[Any, list] = {}
    prj_edits: dict[int, list] = {}
    for (key, kind), items in groups.items():
        entry = (
            kind,
            torch.tensor([r for r, _ in items], device=device),
            torch.stack([torch.as_tensor(e.vector, dtype=torch.float64) for _, e in items]).to(device),
            torch.tensor([[e.share] for _, e in items], dtype=torch.float64, device=device),
        )
        if key[0] == "prj":
            prj_edits.setdefault(key[1], []).append(entry)
        else:
            layer_edits.setdefault(key, []).append(entry)
    return layer_edits, prj_edits


def rows_batch(
    model: Any, context: tuple[list[int], int, bool | str], job: tuple[list[Row], list[int]]
) -> list[torch.Tensor]:
    """One batch of `run_rows` (the executors' unit of work; module level, so a Ray worker can run it)."""
    save_layers, max_new, remote = context
    rows, base_of = job
    return _trace(model, remote, rows, base_of, save_layers, max_new)


def _trace(
    model: Any, remote: bool | str, rows: Sequence[Row], base_of: list[int], save_layers: Sequence[int], max_new: int
) -> list[Any]:
    """One trace over base rows + edited rows; returns the saved tensors (see `run_rows`)."""
    sched = model.schedule()
    K = model.num_latent
    calls = sched.readout_calls  # the step iterator: [bot] and every latent (the suffix is read from the output)
    feeds = sched.thought_fed_by()  # decoder call -> the thought its last state becomes
    latent_of = sched.latent_of_calls()
    call_of = {k: c for c, k in latent_of.items()}
    device = None if remote or model.device is None else model.device
    layer_edits, prj_edits = _tables(rows, 0, call_of, device)
    n_cand = max(len(r.candidates) for r in rows)
    width = max((len(c) for r in rows for c in r.candidates), default=1)
    cands = torch.full((len(rows), max(n_cand, 1), max(width, 1)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        for c, ids in enumerate(r.candidates):
            cands[i, c, : len(ids)] = torch.tensor(ids)
    inputs = model.prepare(
        [r.question for r in rows], suffix_ids=torch.tensor(rows[0].suffix), candidates=cands, max_new_tokens=max_new
    )
    blocks = model.layers
    last = model.n_layers - 1
    # Every call touches a block first (the last, at least), so the feedback request after it binds
    # to the thought this call feeds (as in the lens readout).
    order = sorted({last, *save_layers, *(L for L, _ in layer_edits)})
    keep = set(save_layers)
    norm = resolve(model.family.decoder(model.lm), model.family.final_norm)
    head = model.lm.lm_head
    prj = model.feedback
    edit = apply_edits
    base = torch.tensor(base_of)
    with remote_errors(remote), model.trace(**inputs, **trace_kwargs(remote)) as tracer:
        thoughts = []
        saved_states: dict[int, list] = {L: [] for L in keep}
        for call in tracer.iter[calls.start : calls.stop - 1]:
            for L in order:
                h = output_tensor(blocks[L].output)
                if (L, call) in layer_edits:
                    edit(h, layer_edits[(L, call)])
                if L in keep and call in latent_of:
                    saved_states[L].append(h[:, -1, :].to(torch.float64))
            j = feeds[call]
            if j < K:
                e = prj.output
                if j in prj_edits:
                    edit(e, prj_edits[j])
                thoughts.append(e[:, -1, :])
        out = model.output
        logp = torch.log_softmax(out["logits"].to(torch.float64), dim=-1)
        b = base.to(logp.device)
        kl = (logp.exp() * (logp - logp[b])).sum(-1)
        t = torch.stack(thoughts, 1)
        lens = torch.log_softmax(head(norm(t)).to(torch.float64), dim=-1)
        t = t.to(torch.float64)
        tb = t[b]
        l2 = (t - tb).norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(t, tb, dim=-1)
        lens_kl = (lens.exp() * (lens - lens[b])).sum(-1)
        top = (lens.argmax(-1) != lens[b].argmax(-1)).to(torch.float64)
        states = [torch.stack(saved_states[L], 1).cpu() for L in sorted(keep)]
        got = nnsight.save(
            [
                kl.cpu(),
                out["candidate_logprobs"].to(torch.float64).cpu(),
                out["generated"].cpu(),
                t.cpu(),
                l2.cpu(),
                cos.cpu(),
                lens_kl.cpu(),
                top.cpu(),
                *states,
            ]
        )
    return [torch.as_tensor(x) for x in got]


def run_rows(
    model: Any,
    run: Any,
    rows: Sequence[Row],
    batch_size: int = 16,
    save_layers: Sequence[int] = (),
    max_new_tokens: int | None = None,
) -> RowResults:
    """Run `rows` in batches of at most `batch_size` edited rows (plus their base rows), one trace
    each, on the run's executor (`Run.map`: this process or Ray workers)."""
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise UserError(f"batch size {batch_size!r}: expected an int >= 1")
    K, n = model.num_latent, len(rows)
    limit_of = [max_new_tokens or (max((len(c) for c in r.candidates), default=1) + 3) for r in rows]
    max_new = max(limit_of, default=1)
    d = int(model.codi.lm.config.hidden_size)
    res = RowResults(
        answer=np.full(n, np.nan),
        kl=np.full(n, np.nan),
        cand_logp=np.full((n, max((len(r.candidates) for r in rows), default=0)), np.nan),
        thoughts=np.full((n, K, d), np.nan),
        states={L: np.full((n, K, d), np.nan) for L in save_layers},
        state_l2=np.full((n, K), np.nan),
        state_cos=np.full((n, K), np.nan),
        lens_kl=np.full((n, K), np.nan),
        lens_top_changed=np.full((n, K), np.nan),
        base_answer={},
        text=[""] * n,
        base_text=[""] * n,
    )
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(r.suffix), []).append(i)
    plans, jobs = [], []
    for members in groups.values():
        for s in range(0, len(members), batch_size):
            idx = members[s : s + batch_size]
            questions = list(dict.fromkeys(rows[i].question for i in idx))
            template = rows[idx[0]]
            bases = [Row(q, template.suffix, template.candidates) for q in questions]
            base_of = list(range(len(bases))) + [questions.index(rows[i].question) for i in idx]
            plans.append((idx, questions))
            jobs.append((bases + [rows[i] for i in idx], base_of))

    def keep(n: int, got: list[torch.Tensor]) -> None:
        idx, questions = plans[n]
        base_of = jobs[n][1]
        kl, cand, gen, t, l2, cos, lkl, top, *states = got
        nb = len(questions)
        # Each row's own limit, and its base row cut to the same limit: no text depends on the batch.
        limits = [limit_of[idx[0]]] * nb + [limit_of[i] for i in idx]
        ids = gen.numpy()
        texts = [decode(model, g) for g in cut_to_limits(ids, limits)]
        answers = [model.method.parse_answer(text) for text in texts]
        for q, a in zip(questions, answers[:nb]):
            res.base_answer[q] = np.nan if a is None else float(a)
        for r, i in enumerate(idx, start=nb):
            res.answer[i] = np.nan if answers[r] is None else float(answers[r])
            res.text[i] = texts[r]
            base_ids = cut_to_limits(ids[base_of[r] : base_of[r] + 1], [limit_of[i]])[0]
            res.base_text[i] = decode(model, base_ids)
            res.kl[i] = float(kl[r])
            nc = len(rows[i].candidates)
            res.cand_logp[i, :nc] = cand[r, :nc].numpy()
            res.thoughts[i] = t[r].numpy()
            res.state_l2[i], res.state_cos[i] = l2[r].numpy(), cos[r].numpy()
            res.lens_kl[i], res.lens_top_changed[i] = lkl[r].numpy(), top[r].numpy()
            for L, st in zip(sorted(save_layers), states):
                res.states[L][i] = st[r].numpy()

    run.map(rows_batch, (list(save_layers), max_new, run.remote), jobs, keep)
    return res
