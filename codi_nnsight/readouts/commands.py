"""`codi-nnsight lens | attention | probe | tuned-lens train`: the readouts on the command line.

Registered on the main group by `register(main)` at the end of `codi_nnsight.cli`. Imports of
torch and the model happen inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..cli_common import (
    check_pairs_source,
    check_workers,
    force_option,
    load_cli_model,
    load_cli_pairs,
    model_options,
    number_list,
    pairs_or_synthetic,
    prepare_output,
    remote_option,
    remote_value,
    workers_options,
)

__all__ = ["READOUT_COMMANDS", "attention", "lens", "probe", "register", "tuned_lens"]


def register(group: click.Group) -> None:
    """Add the readout commands to `group` (`codi_nnsight.cli` calls it on the main group)."""
    for command in READOUT_COMMANDS:
        group.add_command(command)


def _pairs_options(f: Any) -> Any:
    f = click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")(f)
    f = click.option(
        "--pairs",
        "pairs_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Pairs file (default: the bundled demo pairs); both variants of every pair are read.",
    )(f)
    return f


def _common(f: Any) -> Any:
    f = workers_options(f)
    f = remote_option(f)
    f = click.option(
        "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Questions per trace."
    )(f)
    f = force_option(f)
    return f


def _load(
    opts: dict[str, Any],
    synthetic: bool = False,
    default_n: int | None = None,
    folder: bool = False,
    local_weights: bool = False,
) -> tuple[Any, Any]:
    """The pairs and the model of the options every readout shares, each checked before any work:
    the pairs source, the workers, the output; then the pairs, then the model."""
    remote = opts["remote"]
    if synthetic:
        check_pairs_source(opts["pairs_path"], opts["n_synthetic"])
    check_workers(opts["workers"], opts["ray_address"], remote)
    prepare_output(opts["out"], opts["force"], folder=folder)
    if synthetic:
        extra = {} if default_n is None else {"default_n": default_n}
        pairs = pairs_or_synthetic(opts["pairs_path"], opts["n_synthetic"], opts["data_seed"], opts["limit"], **extra)
    else:
        pairs = load_cli_pairs(opts["pairs_path"], opts["limit"])
    if local_weights and remote_value(remote) not in (False, "local"):
        click.echo(
            "note: tuned-lens train fits on this machine and needs the model's weights here: "
            "loading them (the states are still collected remotely)",
            err=True,
        )
    model = load_cli_model(
        opts["model_spec"], opts["dtype"], opts["device"], opts["normalization"], None if local_weights else remote
    )
    return pairs, model


def _trace_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Where and how the traces run: the keywords every readout function takes."""
    return {
        "batch_size": opts["batch_size"],
        "remote": remote_value(opts["remote"]),
        "workers": opts["workers"],
        "ray_address": opts["ray_address"],
    }


def _finish(ds: Any, out: str, what: str) -> None:
    """Write the Dataset (the run layer's writer) and say what it holds."""
    from ..analysis.readouts import readout_summary
    from .common import write_dataset

    write_dataset(ds, out)
    click.echo(f"wrote {out}: {what}\n{readout_summary(ds)}")


@click.command("lens")
@model_options
@_pairs_options
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Lens netCDF file.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Top tokens kept per position.")
@click.option(
    "--tuned",
    "tuned_path",
    type=click.Path(),
    default=None,
    help="Tuned lens folder (from `tuned-lens train`): decode A_L h + b_L instead of h.",
)
@_common
def lens(top_k: int, tuned_path: str | None, **opts: Any) -> None:
    """Logit lens (or tuned lens) at [bot], every latent step and the answer position, for every layer."""
    from .lens import logit_lens

    pairs, model = _load(opts)
    tuned = None
    if tuned_path is not None:
        from .tuned import load_tuned_lens

        tuned = load_tuned_lens(tuned_path, model)
    ds = logit_lens(model, pairs, top_k=top_k, tuned=tuned, **_trace_options(opts))
    _finish(ds, opts["out"], f"{'tuned' if tuned is not None else 'logit'} lens of {2 * len(pairs)} questions")


@click.command("attention")
@model_options
@_pairs_options
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Attention netCDF file.")
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Top question tokens kept per step (averaged over layers and heads).",
)
@_common
def attention(top: int, **opts: Any) -> None:
    """Attention of every step on question, [bot], earlier latents and itself, per layer and head."""
    from .attention import attention_readout

    pairs, model = _load(opts)
    ds = attention_readout(model, pairs, top=top, **_trace_options(opts))
    _finish(ds, opts["out"], f"attention of {2 * len(pairs)} questions")


@click.command("probe")
@model_options
@_pairs_options
@click.option(
    "--synthetic",
    "n_synthetic",
    type=click.IntRange(min=2),
    default=None,
    help="Probe N generated toy pairs (make_toy_pairs) instead of a pairs file.",
)
@click.option("--data-seed", type=int, default=0, show_default=True, help="Seed of the --synthetic pairs.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Probe netCDF file.")
@click.option("--layers", default=None, help="e.g. 0-3,7 (default: all).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds: one train/test split and control each.")
@click.option(
    "--test-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.25,
    show_default=True,
    help="Share of pairs held out.",
)
@click.option("--l2", type=click.FloatRange(min=0), default=1e-3, show_default=True, help="L2 penalty.")
@_common
def probe(layers: str | None, seeds: str, test_fraction: float, l2: float, **opts: Any) -> None:
    """Linear probes for every gold intermediate value at every step and layer, with a control task."""
    from ..patching.config import parse_layers
    from .probe import probe as run_probe

    seed_list = number_list(seeds, "--seeds", int)
    pairs, model = _load(opts, synthetic=True)
    kw = _trace_options(opts)
    ds = run_probe(
        model,
        pairs,
        layers=parse_layers(layers, model.n_layers),
        seeds=seed_list,
        test_fraction=test_fraction,
        l2=l2,
        **kw,
    )
    _finish(ds, opts["out"], f"probes on {2 * len(pairs)} questions")
    if ds.attrs.get("warning"):
        click.echo(f"warning: {ds.attrs['warning']}", err=True)


@click.group("tuned-lens")
def tuned_lens() -> None:
    """Tuned lens: train per-layer affine translators for `lens --tuned` (docs/readouts.md)."""


@tuned_lens.command("train")
@model_options
@_pairs_options
@click.option(
    "--synthetic",
    "n_synthetic",
    type=click.IntRange(min=2),
    default=None,
    help="Train on N generated toy pairs (make_toy_pairs; the default is 500 when --pairs is not given).",
)
@click.option("--data-seed", type=int, default=0, show_default=True, help="Seed of the --synthetic pairs.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Tuned lens folder.")
@click.option("--steps", type=click.IntRange(min=0), default=300, show_default=True, help="Adam steps per layer.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split and minibatches.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True, help="Adam rate.")
@click.option(
    "--held-out",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of pairs held out.",
)
@click.option(
    "--positions",
    type=click.Choice(["latent", "all"]),
    default="latent",
    show_default=True,
    help="Train on the latent positions, or also on [bot] and the answer position.",
)
@_common
def tuned_lens_train(steps: int, seed: int, lr: float, held_out: float, positions: str, **opts: Any) -> None:
    """Train a tuned lens on the model's latent-position states; print the held-out KL per layer."""
    from .tuned import kl_table, save_tuned_lens, train_tuned_lens

    # The translators are fitted here against the final norm and LM head: those weights must be local.
    pairs, model = _load(opts, synthetic=True, default_n=500, folder=True, local_weights=True)
    got = train_tuned_lens(
        model,
        pairs,
        steps=steps,
        seed=seed,
        lr=lr,
        held_out=held_out,
        positions=positions,
        progress=sys.stderr.isatty(),  # a bar with a time estimate: training takes minutes
        **_trace_options(opts),
    )
    out = opts["out"]
    save_tuned_lens(got, out, force=True)  # `prepare_output` refused an existing folder without --force
    n_test = got.meta["n_heldout_questions"]
    click.echo(
        f"wrote {out}: tuned lens of {model.name} trained on {got.meta['n_train_questions']} questions; "
        f"held-out KL (nats, {n_test} questions, {positions} positions):\n{kl_table(got)}"
    )


#: Every readout command, for `main.add_command`.
READOUT_COMMANDS = (lens, attention, probe, tuned_lens)
