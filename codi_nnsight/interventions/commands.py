"""`codi-nnsight transplant | steer | thought-graph`: the interventions on thoughts on the command line.

Registered on the main group by `register(main)`. Imports of torch and the model happen inside
the commands, so `--help` stays fast.
"""

from __future__ import annotations

from typing import Any

import click

from ..cli_common import (
    check_workers,
    force_option,
    load_cli_model,
    model_options,
    number_list,
    pairs_or_synthetic,
    prepare_output,
    remote_option,
    remote_value,
    workers_options,
)

__all__ = ["INTERVENTION_COMMANDS", "register", "steer", "thought_graph", "transplant"]


def register(group: click.Group) -> None:
    """Add the intervention commands to `group` (`codi_nnsight.cli` calls it on the main group)."""
    for command in INTERVENTION_COMMANDS:
        group.add_command(command)


def _common(f: Any) -> Any:
    f = workers_options(f)
    f = remote_option(f)
    f = click.option(
        "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Edited runs per trace."
    )(f)
    f = click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Greedy answer tokens.")(f)
    f = force_option(f)
    f = click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")(f)
    f = click.option("--data-seed", type=int, default=0, show_default=True, help="Seed of the --synthetic pairs.")(f)
    f = click.option(
        "--synthetic",
        "n_synthetic",
        type=click.IntRange(min=2),
        default=None,
        help="N generated toy pairs (make_toy_pairs) instead of a pairs file.",
    )(f)
    f = click.option(
        "--pairs",
        "pairs_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Pairs file (default: the bundled demo pairs); pairs carry their chains (`steps`).",
    )(f)
    f = click.option("--out", type=click.Path(dir_okay=False), required=True, help="netCDF file.")(f)
    return model_options(f)


def _load(opts: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """The pairs, the model and the run keywords of the options every command shares (output checked first)."""
    remote = opts["remote"]
    check_workers(opts["workers"], opts["ray_address"], remote)
    prepare_output(opts["out"], opts["force"])
    pairs = pairs_or_synthetic(opts["pairs_path"], opts["n_synthetic"], opts["data_seed"], opts["limit"])
    model = load_cli_model(opts["model_spec"], opts["dtype"], opts["device"], opts["normalization"], remote)
    run = {
        "batch_size": opts["batch_size"],
        "max_new_tokens": opts["max_new_tokens"],
        "remote": remote_value(remote),
        "workers": opts["workers"],
        "ray_address": opts["ray_address"],
    }
    return list(pairs), model, run


def _finish(ds: Any, out: str, line: str) -> None:
    from ..run import write_results

    write_results(ds, out)
    click.echo(f"wrote {out}: {line}")


@click.command("transplant")
@_common
@click.option("--thoughts", default=None, help="Latent positions k, e.g. 0,3 (default: all).")
@click.option(
    "--layers", default=None, help="Transplant block L's output at latent k instead of the thought, e.g. 0-3."
)
@click.option("--donors", default="twin,next", show_default=True, help="twin, next and/or self.")
def transplant(thoughts: str | None, layers: str | None, donors: str, **opts: Any) -> None:
    """Replace thought k of each pair's clean question by a donor problem's: does the answer follow the donor?"""
    from ..patching.config import parse_layers
    from .transplant import transplant as run

    ks = number_list(thoughts, "--thoughts", int)
    pairs, model, kw = _load(opts)
    layer_list = None if layers is None else parse_layers(layers, model.n_layers)
    donor_list = [d.strip() for d in donors.split(",") if d.strip()]
    ds = run(model, pairs, thoughts=ks, layers=layer_list, donors=donor_list, **kw)
    by_k = ds["follows_donor"].mean([d for d in ds["follows_donor"].dims if d != "thought"]).values
    _finish(
        ds, opts["out"], "answer follows the donor by thought " + ", ".join(f"{k}: {v:.0%}" for k, v in enumerate(by_k))
    )


@click.command("steer")
@_common
@click.option(
    "--probe",
    "probe_path",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="probe.nc: steer at its most selective value probe's step, layer and intermediate.",
)
@click.option("--intermediate", type=click.IntRange(min=0), default=None, help="Gold intermediate j (default 0).")
@click.option("--thought", type=click.IntRange(min=0), default=None, help="Latent position k (default K-1).")
@click.option(
    "--layer", type=click.IntRange(min=0), default=None, help="Steer block L's output (default: the thought)."
)
@click.option("--directions", default="probe,mean-diff,random", show_default=True)
@click.option("--n-random", type=click.IntRange(min=1), default=3, show_default=True, help="Random control directions.")
@click.option("--scales", default="-1,-0.5,-0.25,0,0.25,0.5,1", show_default=True, help="λ in thought norms.")
@click.option("--project", is_flag=True, help="Project the direction out (scale = share removed) instead of adding.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random directions.")
def steer(
    probe_path: str | None,
    intermediate: int | None,
    thought: int | None,
    layer: int | None,
    directions: str,
    n_random: int,
    scales: str,
    project: bool,
    seed: int,
    **opts: Any,
) -> None:
    """Add λ‖h‖v̂ to a thought (or project v̂ out) for value-probe, mean-difference and random directions."""
    from .steer import steer as run

    scale_list = number_list(scales, "--scales")
    pairs, model, kw = _load(opts)
    ds = run(
        model,
        pairs,
        intermediate=intermediate,
        thought=thought,
        layer=layer,
        probe=probe_path,
        scales=scale_list,
        directions=[d.strip() for d in directions.split(",") if d.strip()],
        n_random=n_random,
        project=project,
        seed=seed,
        **kw,
    )
    changed = ds["answer_changed"].mean(("pair", "scale")).values
    _finish(
        ds,
        opts["out"],
        f"steered thought {ds.attrs['thought']} (layer {ds.attrs['layer']}, intermediate {ds.attrs['intermediate']}); "
        "answer changed: " + ", ".join(f"{n} {v:.0%}" for n, v in zip(ds["direction"].values, changed)),
    )


@click.command("thought-graph")
@_common
@click.option("--interventions", default="zero,mean,resample,noise", show_default=True)
@click.option(
    "--layer", type=click.IntRange(min=0), default=None, help="Intervene on block L's output (default: the thought)."
)
@click.option(
    "--noise-scale", type=click.FloatRange(min=0), default=1.0, show_default=True, help="σ = mean‖h‖/√d × this."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise.")
def thought_graph(interventions: str, layer: int | None, noise_scale: float, seed: int, **opts: Any) -> None:
    """Intervene on thought i and measure every later thought j and the answer: a K × K graph per pair."""
    from .graph import thought_graph as run

    pairs, model, kw = _load(opts)
    chosen = [x.strip() for x in interventions.split(",") if x.strip()]
    ds = run(model, pairs, interventions=chosen, layer=layer, noise_scale=noise_scale, seed=seed, **kw)
    changed = ds["answer_changed"].mean(("pair", "source")).values
    _finish(
        ds,
        opts["out"],
        "thought graph; answer changed: "
        + ", ".join(f"{n} {v:.0%}" for n, v in zip(ds["intervention"].values, changed)),
    )


#: Every intervention command, for `main.add_command`.
INTERVENTION_COMMANDS = (transplant, steer, thought_graph)
