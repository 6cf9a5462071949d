"""Tuned lens (Belrose et al. 2023) over the CODI loop: a learned affine translator per layer.

The logit lens decodes a block output h of layer L as if it were the last layer's:
`softmax(lm_head(final_norm(h)))`. Earlier layers do not speak the last layer's basis, so the
tuned lens first maps h through a per-layer affine *translator* `A_L h + b_L` (initialised to the
identity and zero, so an untrained tuned lens *is* the logit lens) trained to minimise

    KL( p_final ‖ softmax(lm_head(final_norm(A_L h_L + b_L))) )

where p_final is the lens distribution of the last block's output at the same position (the
model's own output distribution there). The last layer's translator is the identity and is not
trained (its KL is 0 by definition).

Training data: the block outputs at every latent position (latent token 0 … K-1) of every
question (both variants of every pair), collected with one nnsight trace per batch
(`readouts.probe.collect_states`: torch only in the trace body, only the hidden states leave
it, so `remote=` works). The translators are then fitted with plain torch (Adam, seeded) on the
final norm and LM head of the local weights. A share of the *pairs* (default 20 %) is held out
(a clean question and its corrupted twin are on the same side) and the held-out KL per layer
of the tuned lens and of the plain logit lens is recorded.

A tuned lens is saved as a folder holding `tuned_lens.safetensors` (translators `weight`
(layers, d, d) and `bias` (layers, d)) and `tuned_lens.json` (model identity, layers, hidden
size, train / held-out KL, seed, …); loading reads the tensors with safetensors only and
refuses a lens trained for another model with one line.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError

SCHEMA = "codi-nnsight/tuned-lens/1"
WEIGHTS_FILE = "tuned_lens.safetensors"
META_FILE = "tuned_lens.json"
#: Fields of `model_identity` a tuned lens must share with the model it is applied to.
MATCH_FIELDS = ("family", "n_layers", "hidden_size", "vocab_size", "checkpoint_sha256")

__all__ = [
    "META_FILE",
    "SCHEMA",
    "WEIGHTS_FILE",
    "TunedLens",
    "fit_translators",
    "load_tuned_lens",
    "model_identity",
    "save_tuned_lens",
    "train_tuned_lens",
]


def model_identity(model: Any) -> dict[str, Any]:
    """What a tuned lens is tied to: name, family, layers, hidden size, vocabulary, checkpoint sha256.

    `config_sha256` hashes the architecture fields (family, layers, hidden size, vocabulary, latents).
    """
    head = model.codi.lm.get_output_embeddings().weight
    ident = {
        "name": str(model.name),
        "family": str(model.family.name),
        "n_layers": int(model.n_layers),
        "hidden_size": int(head.shape[1]),
        "vocab_size": int(head.shape[0]),
        "num_latent": int(model.num_latent),
        "checkpoint_sha256": str(getattr(model, "checkpoint_sha256", "") or ""),
    }
    arch = {k: ident[k] for k in ("family", "n_layers", "hidden_size", "vocab_size", "num_latent")}
    ident["config_sha256"] = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()
    return ident


def _short(value: Any) -> str:
    text = str(value) if value != "" else "unknown"
    return text[:12] if len(text) == 64 else text


@dataclass
class TunedLens:
    """Per-layer affine translators `h -> weight[L] @ h + bias[L]` and what they were trained on."""

    weight: torch.Tensor  # (layers, d, d)
    bias: torch.Tensor  # (layers, d)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def identity(cls, model: Any, dtype: torch.dtype = torch.float64) -> TunedLens:
        """Untrained translators (identity, zero): the tuned lens then equals the logit lens."""
        ident = model_identity(model)
        n, d = ident["n_layers"], ident["hidden_size"]
        weight = torch.eye(d, dtype=dtype).repeat(n, 1, 1)
        return cls(weight, torch.zeros(n, d, dtype=dtype), {"schema": SCHEMA, "model": ident, "trained": False})

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[-1])

    @property
    def sha256(self) -> str:
        """Hash of the translators' values (dtype, shapes and bytes)."""
        h = hashlib.sha256()
        for t in (self.weight, self.bias):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def translate(self, h: torch.Tensor) -> torch.Tensor:
        """Translate (..., layers, d) block outputs layer by layer, in the translators' dtype; torch only."""
        x = h.to(self.weight.dtype)
        return (torch.einsum("...lj,lij->...li", x, self.weight) + self.bias).to(h.dtype)

    def check_model(self, model: Any, where: str | None = None) -> None:
        """Refuse (one-line `UserError`) a model other than the one these translators were trained for."""
        saved = self.meta.get("model", {})
        mine = model_identity(model)
        diffs = []
        for k in MATCH_FIELDS if saved else ():  # translators made by hand (no identity): shapes only
            a, b = saved.get(k), mine[k]
            if k == "checkpoint_sha256" and (not a or not b):
                continue  # unknown on one side (a model built from a module): the architecture must do
            if a != b:
                diffs.append(f"{k} {_short(a)} != {_short(b)}")
        if (self.n_layers, self.hidden_size) != (mine["n_layers"], mine["hidden_size"]) and not diffs:
            diffs.append(f"translators {self.n_layers}x{self.hidden_size} != {mine['n_layers']}x{mine['hidden_size']}")
        if diffs:
            where = where or str(self.meta.get("source") or "tuned lens")
            raise UserError(
                f"{where}: tuned lens trained on {saved.get('name', 'another model')}, not on this "
                f"{mine['name']} ({'; '.join(diffs)}); train one for it with `codi-nnsight tuned-lens train`"
            )

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the translators to folder `path` (`save_tuned_lens`)."""
        return save_tuned_lens(self, path, force=force)


# -- saving and loading -------------------------------------------------------------------------
def save_tuned_lens(lens: TunedLens, path: str | os.PathLike, force: bool = False) -> Path:
    """Write `path/tuned_lens.safetensors` and `path/tuned_lens.json` (the folder is created).

    A folder that holds a tuned lens already is refused unless `force` (as the CLI's `--force`).
    """
    from safetensors.torch import save

    folder = Path(path)
    if not force and ((folder / WEIGHTS_FILE).exists() or (folder / META_FILE).exists()):
        raise UserError(f"{folder}: holds a tuned lens already; add --force (force=True) to overwrite it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**{k: v for k, v in lens.meta.items() if k != "source"}, "schema": SCHEMA}
        meta.update(layers=lens.n_layers, hidden_size=lens.hidden_size, dtype=str(lens.weight.dtype).split(".")[-1])
        meta["translators_sha256"] = lens.sha256
        tmp = f".tmp-{os.getpid()}"
        tensors = {"weight": lens.weight.detach().cpu().contiguous(), "bias": lens.bias.detach().cpu().contiguous()}
        (folder / (WEIGHTS_FILE + tmp)).write_bytes(save(tensors, metadata={"schema": SCHEMA}))
        (folder / (META_FILE + tmp)).write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(folder / (WEIGHTS_FILE + tmp), folder / WEIGHTS_FILE)
        os.replace(folder / (META_FILE + tmp), folder / META_FILE)
    except OSError as e:
        raise UserError(f"{folder}: cannot write the tuned lens ({e.strerror or e})") from None
    return folder


def load_tuned_lens(path: str | os.PathLike, model: Any | None = None) -> TunedLens:
    """Read a tuned lens folder (or its json / safetensors file); with `model`, refuse another model's lens."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if folder.is_file() and folder.name in (WEIGHTS_FILE, META_FILE):
        folder = folder.parent
    weights, meta_path = folder / WEIGHTS_FILE, folder / META_FILE
    if not weights.is_file() or not meta_path.is_file():
        raise UserError(f"{path}: not a tuned lens (expected a folder holding {WEIGHTS_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"{path}: cannot read the tuned lens ({str(e).splitlines()[0] if str(e) else e})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise UserError(f"{meta_path}: not a tuned lens description (schema {SCHEMA!r} expected)")
    w, b = tensors.get("weight"), tensors.get("bias")
    if (
        w is None
        or b is None
        or w.dim() != 3
        or w.shape[1] != w.shape[2]
        or tuple(b.shape) != (w.shape[0], w.shape[1])
        or (w.shape[0], w.shape[1]) != (meta.get("layers"), meta.get("hidden_size"))
    ):
        raise UserError(f"{weights}: translators do not match {META_FILE} (layers x hidden size)")
    # Copies in torch's 64-byte-aligned memory: safetensors' buffers sit at the file header's 8-byte
    # alignment, where MKL's float64 GEMM rounds differently from the lens that was saved.
    lens = TunedLens(w.clone(), b.clone(), {**meta, "source": str(path)})
    if model is not None:
        lens.check_model(model, where=str(path))
    return lens


# -- training ------------------------------------------------------------------------------------
def _decoder_readout(model: Any, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Frozen copies of the final norm and LM head in `dtype`, on the CPU (local weights needed)."""
    from ..model.families import resolve

    norm = resolve(model.family.decoder(model.codi.lm), model.family.final_norm)
    head = model.codi.lm.lm_head
    if any(p.is_meta for p in [*norm.parameters(), *head.parameters()]):
        raise UserError(
            f"{model.name}: training a tuned lens needs the final norm and LM head here; load the model's weights "
            "(not remote_only)"
        )
    norm = copy.deepcopy(norm).to("cpu", dtype).requires_grad_(False)
    head = copy.deepcopy(head).to("cpu", dtype).requires_grad_(False)
    return norm, head


def _kl_rows(target_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from p's log-probabilities and q's logits."""
    logq = torch.log_softmax(logits, dim=-1)
    return (target_logp.exp() * (target_logp - logq)).sum(-1)


@torch.no_grad()
def _mean_kl(
    states: torch.Tensor, final: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm: Any, head: Any
) -> float:
    """Mean KL (float64) between the lens of `final` and the translated lens of `states`, in chunks."""
    if states.shape[0] == 0:
        return math.nan
    total = 0.0
    for s in range(0, states.shape[0], 1024):
        h, f = states[s : s + 1024].to(torch.float64), final[s : s + 1024].to(torch.float64)
        target = torch.log_softmax(head(norm(f)), dim=-1)
        total += float(_kl_rows(target, head(norm(h @ weight.T + bias))).sum())
    return total / states.shape[0]


def fit_translators(
    states: torch.Tensor,
    norm: torch.nn.Module,
    head: torch.nn.Module,
    steps: int = 300,
    lr: float = 3e-3,
    seed: int = 0,
    batch: int = 4096,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit translators on (n, layers, d) block outputs; returns weight (layers, d, d) and bias (layers, d).

    `progress` shows a bar over every layer's steps, with tqdm's time estimate (minutes on a CPU).

    Every layer but the last starts at identity / zero and runs `steps` Adam steps on the mean
    KL(final-layer lens ‖ translated lens) over a minibatch of `batch` rows (all rows when fewer;
    the minibatches are drawn from a generator seeded with `seed`, the same for every layer). The
    last layer stays the identity. Runs in the dtype of `norm` / `head`; deterministic on the CPU.
    """
    dtype = next(head.parameters()).dtype
    n, n_layers, d = states.shape
    weight = torch.eye(d, dtype=dtype).repeat(n_layers, 1, 1)
    bias = torch.zeros(n_layers, d, dtype=dtype)
    if n == 0 or steps == 0:
        return weight, bias
    x = states.to(dtype)
    with torch.no_grad():
        final = x[:, -1]
    from tqdm.auto import tqdm

    bar = tqdm(total=(n_layers - 1) * int(steps), desc="training translators", unit="step", disable=not progress)
    for L in range(n_layers - 1):
        gen = torch.Generator().manual_seed(int(seed))
        w = weight[L].clone().requires_grad_(True)
        b = bias[L].clone().requires_grad_(True)
        opt = torch.optim.Adam([w, b], lr=lr)
        for _ in range(int(steps)):
            rows = torch.randperm(n, generator=gen)[:batch] if n > batch else slice(None)
            with torch.no_grad():
                target = torch.log_softmax(head(norm(final[rows])), dim=-1)
            loss = _kl_rows(target, head(norm(x[rows, L] @ w.T + b))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
        weight[L], bias[L] = w.detach(), b.detach()
    bar.close()
    return weight, bias


def _split_pairs(n_pairs: int, held_out: float, seed: int) -> np.ndarray:
    """Boolean mask over pairs: True = held out (at least one pair on each side)."""
    if n_pairs < 2:
        raise UserError(f"{n_pairs} pair(s): a tuned lens needs at least 2 (one to train on, one held out)")
    n_test = min(n_pairs - 1, max(1, round(held_out * n_pairs)))
    mask = np.zeros(n_pairs, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_pairs)[:n_test]] = True
    return mask


def train_tuned_lens(
    model: Any,
    pairs: Sequence[Any],
    steps: int = 300,
    seed: int = 0,
    lr: float = 3e-3,
    held_out: float = 0.2,
    batch_size: int = 16,
    remote: bool | str = False,
    train_batch: int = 4096,
    positions: str = "latent",
    progress: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
) -> TunedLens:
    """Train a tuned lens on the latent positions of every question of `pairs` (see the module docstring).

    `held_out` of the pairs (seeded split) is kept out of training; `meta` records the mean KL per
    layer on the training and held-out latent positions for the tuned lens (`tuned`) and the plain
    logit lens (`logit`), and the held-out KL per step (bot, latents, answer) and layer
    (`heldout_kl_by_step`). Translators are trained in float64 for a float64 model, else float32;
    `remote` only affects collecting the states (the weights of the final norm and LM head must be
    here). `progress` shows a bar with a time estimate. `positions="all"` also trains (and reports
    `train_kl` / `heldout_kl`) on `bot` and the answer position. The same inputs and seed give the
    same translators. `workers` / `ray_address` shard collecting the states over Ray workers
    (docs/sharding.md); the translators are fitted here.
    """
    from .common import step_labels
    from .probe import collect_states

    if not 0 < held_out < 1:
        raise UserError(f"held-out share {held_out}: expected a number between 0 and 1")
    if positions not in ("latent", "all"):
        raise UserError(f"positions {positions!r}: expected latent or all")
    if steps < 0:
        raise UserError(f"steps {steps}: expected at least 0")
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    norm, head = _decoder_readout(model, dtype)
    test_pairs = _split_pairs(len(pairs), held_out, seed)
    states, infos = collect_states(
        model, pairs, batch_size=batch_size, remote=remote, workers=workers, ray_address=ray_address
    )
    K, n_layers = model.num_latent, model.n_layers
    test_q = np.array([test_pairs[i.pair_index] for i in infos])
    x = torch.as_tensor(states)  # (questions, K + 2 steps, layers, d)
    d = x.shape[-1]
    latent = x[:, 1 : K + 1] if positions == "latent" else x
    train_rows = latent[torch.as_tensor(~test_q)].reshape(-1, n_layers, d)
    test_rows = latent[torch.as_tensor(test_q)].reshape(-1, n_layers, d)
    weight, bias = fit_translators(
        train_rows, norm, head, steps=steps, lr=lr, seed=seed, batch=train_batch, progress=progress
    )
    norm64, head64 = copy.deepcopy(norm).double(), copy.deepcopy(head).double()
    w64, b64 = weight.double(), bias.double()
    eye, zero = torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)

    def kls(rows: torch.Tensor) -> dict[str, list[float]]:
        return {
            "tuned": [_mean_kl(rows[:, L], rows[:, -1], w64[L], b64[L], norm64, head64) for L in range(n_layers)],
            "logit": [_mean_kl(rows[:, L], rows[:, -1], eye, zero, norm64, head64) for L in range(n_layers)],
        }

    held = x[torch.as_tensor(test_q)]
    by_step = {name: [] for name in ("tuned", "logit")}
    for s in range(K + 2):
        got = kls(held[:, s])
        for name in by_step:
            by_step[name].append(got[name])
    import codi_nnsight

    meta = {
        "schema": SCHEMA,
        "model": model_identity(model),
        "trained": True,
        "objective": f"KL(final-layer lens || lens of A_L h + b_L), mean over {positions} positions",
        "positions": positions,
        "seed": int(seed),
        "steps": int(steps),
        "lr": float(lr),
        "optimizer": "Adam",
        "train_batch": int(train_batch),
        "train_dtype": str(dtype).split(".")[-1],
        "held_out": float(held_out),
        "n_pairs": len(pairs),
        "n_train_questions": int((~test_q).sum()),
        "n_heldout_questions": int(test_q.sum()),
        "pairs_source": str(getattr(pairs, "source", None) or ""),
        "pairs_sha256": str(getattr(pairs, "sha256", "") or ""),
        "package_version": getattr(codi_nnsight, "__version__", "unknown"),
        "train_kl": kls(train_rows),
        "heldout_kl": kls(test_rows),
        "heldout_kl_by_step": {"steps": step_labels(K), **by_step},
    }
    return TunedLens(weight, bias, meta)


def kl_table(lens: TunedLens, which: str = "heldout_kl") -> str:
    """The per-layer KL table of a trained lens's `meta` (held-out by default), as text."""
    got = lens.meta.get(which) or {}
    tuned, logit = got.get("tuned", []), got.get("logit", [])
    lines = [f"{'layer':>5}  {'logit lens KL':>13}  {'tuned lens KL':>13}"]
    for L, (a, b) in enumerate(zip(logit, tuned)):
        lines.append(f"{L:>5}  {a:>13.4f}  {b:>13.4f}")
    return "\n".join(lines)
