"""`codi-nnsight` command line: a thin layer over the Python API.

Every user error is one line on stderr with exit code 2 (a traceback only with `--debug`);
Ctrl-C exits 130 after saying where finished results are.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from .cli_common import (
    check_workers,
    default_pairs,
    force_option,
    load_cli_model,
    load_cli_pairs,
    model_options,
    pairs_option,
    prepare_output,
    remote_option,
    remote_value,
    workers_options,
)
from .errors import UserError

__all__ = ["default_pairs", "main", "run"]  # default_pairs: re-exported for notebooks written against it

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_SANITY = 3


class _Group(click.Group):
    """Turns known errors into one clean line and an exit code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)  # the command line, for provenance
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("CODI_NNSIGHT_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except UserError as e:
            if debug:
                raise
            msg = str(e).strip().splitlines()
            click.echo(f"error: {msg[0]}" if len(msg) == 1 else "error: " + "\n  ".join(msg), err=True)
            ctx.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            where = ctx.meta.get("partial_store")
            hint = (
                (f"; finished pairs are kept in {where} — rerun the same command with --resume to continue")
                if where
                else ""
            )
            click.echo(f"interrupted{hint}", err=True)
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.version_option(package_name="codi-nnsight")
def main(debug: bool) -> None:
    """Find where a CODI continuous chain-of-thought model reasons, by activation patching."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # library deprecation chatter is not for end users
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


# ---------------------------------------------------------------------------------------------
@main.command()
@model_options
@pairs_option
@click.option(
    "--gsm8k",
    "gsm8k_source",
    default=None,
    metavar="FILE|hub",
    help="Instead of pairs: GSM8K test accuracy by the official CODI protocol, from a GSM8K-format "
    "JSON Lines file, or 'hub' for the gsm8k test split (needs the gsm8k extra).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs (with --gsm8k: questions)."
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Greedy tokens per answer (default: 64; with --gsm8k 256, the official setting).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write answers as JSON.")
@force_option
@remote_option
def evaluate(
    model_spec,
    dtype,
    device,
    normalization,
    pairs_path,
    gsm8k_source,
    limit,
    max_new_tokens,
    batch_size,
    out,
    force,
    remote,
) -> None:
    """Greedy answers and accuracy for the clean and corrupted questions, or (--gsm8k) the GSM8K
    test accuracy computed as the official CODI code computes it (docs/evaluate.md)."""
    if gsm8k_source is not None and pairs_path is not None:
        raise UserError("give --pairs FILE or --gsm8k FILE|hub, not both")
    if out:
        prepare_output(out, force)
    if gsm8k_source is not None:
        _evaluate_gsm8k(
            model_spec, dtype, device, normalization, gsm8k_source, limit, max_new_tokens, batch_size, out, remote
        )
        return
    from .model.inference import accuracy_summary, evaluate_pairs

    pairs = load_cli_pairs(pairs_path, limit)
    model = load_cli_model(model_spec, dtype, device, normalization, remote)
    answers = evaluate_pairs(
        model,
        pairs,
        max_new_tokens=max_new_tokens or 64,
        batch_size=batch_size,
        progress=sys.stderr.isatty(),
        remote=remote_value(remote),
    )
    acc = accuracy_summary(answers)
    if out:
        from .atomic import write_json_atomic

        write_json_atomic(out, [a.to_record() for a in answers])
    click.echo(
        f"model {model.name}: {len(pairs)} pairs — accuracy clean {acc['clean']:.1%}, "
        f"corrupted {acc['corrupted']:.1%}, both {acc['both']:.1%}"
    )


def _evaluate_gsm8k(
    model_spec, dtype, device, normalization, source, limit, max_new_tokens, batch_size, out, remote
) -> None:
    """`evaluate --gsm8k`: the records are checked before the model is loaded."""
    from .model.gsm8k_eval import OFFICIAL_MAX_NEW_TOKENS, evaluate_gsm8k, load_gsm8k_items, source_label

    items = load_gsm8k_items(source, limit)
    model = load_cli_model(model_spec, dtype, device, normalization, remote)
    result = evaluate_gsm8k(
        model,
        items,
        max_new_tokens=max_new_tokens or OFFICIAL_MAX_NEW_TOKENS,
        batch_size=batch_size,
        progress=sys.stderr.isatty(),
        remote=remote_value(remote),
        source=source_label(source),
    )
    if out:
        from .atomic import write_json_atomic

        write_json_atomic(out, result.to_json())
    click.echo(result.summary())


# ---------------------------------------------------------------------------------------------
def _patch_choices() -> dict[str, list[str]]:
    # The sweep's own tables (light modules: `--help` imports no torch).
    from .patching.options import ABLATIONS, DIRECTIONS, MODE_CHOICES, POSITIONS

    return {
        "positions": list(POSITIONS),
        "mode": list(MODE_CHOICES),
        "direction": list(DIRECTIONS),
        "ablation": list(ABLATIONS),
    }


def _families() -> list[str]:
    from .model.families import FAMILIES

    return list(FAMILIES)


@main.command()
@model_options
@pairs_option
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Results netCDF file.")
@force_option
@click.option("--layers", default=None, help="e.g. 0-3,7 (default: all).")
@click.option(
    "--positions",
    type=click.Choice(_patch_choices()["positions"]),
    default="all",
    show_default=True,
    help="all latent positions at once, or each one (adds a position dim).",
)
@click.option(
    "--component",
    default="resid",
    show_default=True,
    help="resid, attn, mlp, latent (the fed-back thought) or head (every head of --layers; on its own); "
    "a comma list of the first four (resid,attn,mlp) adds a component dim.",
)
@click.option(
    "--mode",
    type=click.Choice(_patch_choices()["mode"]),
    default="recurrent",
    show_default=True,
    help="What is blocked between the patched thought and the answer. recurrent: nothing (the total "
    "effect through the latent loop); block-all-feedback: every fed-back latent embedding (was no-feedback, "
    "frozen); block-thought-feedback: the patched thought's own fed-back embedding (the attention route); "
    "block-thought-attention: the patched thought's keys and values (the feedback route; was feedback-only); "
    "routes: total = feedback + attention + interaction on a route dim. The last three need --positions each.",
)
@click.option("--direction", type=click.Choice(_patch_choices()["direction"]), default="denoise", show_default=True)
@click.option(
    "--ablation",
    type=click.Choice(_patch_choices()["ablation"]),
    default=None,
    help="Ablate the site in the clean run instead of patching: zero, mean (over the clean questions), "
    "resample (from the next pair's problem) or noise (random direction, same norm).",
)
@click.option("--batch-size", default="auto", show_default=True, help="Pairs per trace, or auto.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same configuration.")
@click.option("--check", is_flag=True, help="Exit 3 if a sanity check fails (results are still written).")
@remote_option
@workers_options
@click.option(
    "--tokens",
    default=None,
    help="With --positions sequence: patch only these tokens, e.g. number,bot,thoughts or -5,-1 "
    "(offsets from the first thought; regions question, number, bot, thoughts, answer). Default: all.",
)
@click.option(
    "--metric-fn",
    "metric_fns",
    multiple=True,
    metavar="NAME=MODULE:FUNCTION",
    help="Also compute your own metric, stored as variable NAME: MODULE:FUNCTION, FILE.py:FUNCTION or a "
    "factory call with literal arguments, e.g. p_value_1=codi_nnsight.patching.metrics:gold_value_prob(1). "
    "Repeatable.",
)
@click.pass_context
def patch(
    ctx,
    model_spec,
    dtype,
    device,
    normalization,
    pairs_path,
    out,
    force,
    layers,
    positions,
    component,
    mode,
    direction,
    ablation,
    batch_size,
    limit,
    max_new_tokens,
    seed,
    resume,
    check,
    remote,
    workers,
    ray_address,
    tokens,
    metric_fns,
) -> None:
    """Patch source activations into target runs at the latent positions, layer by layer."""
    from .patching.config import canonical_mode, parse_layers
    from .patching.sites import COMPONENTS
    from .patching.summary import sweep_summary
    from .patching.sweep import patch_sweep

    if batch_size != "auto":
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise UserError(f"--batch-size {batch_size!r}: expected a number or auto") from None
    comps = [c.strip() for c in component.split(",") if c.strip()]
    bad = [c for c in comps if c not in COMPONENTS] or ([] if comps else [component])
    if bad:
        raise UserError(f"--component {bad[0]!r}: expected one of {', '.join(COMPONENTS)} (or a comma list)")
    from .patching.options import MODE_ALIASES, ROUTES

    if mode in MODE_ALIASES:
        click.echo(f"note: --mode {mode} is now called {MODE_ALIASES[mode]} (mode names say what they block)", err=True)
    mode = canonical_mode(mode)
    prepare_output(out, force)
    check_workers(workers, ray_address, remote)
    from .patching.metrics import metric_options

    user_metrics = metric_options(metric_fns)  # one-line errors before the model loads
    pairs = load_cli_pairs(pairs_path, limit)
    model = load_cli_model(model_spec, dtype, device, normalization, remote)
    layer_list = parse_layers(layers, model.n_layers)
    ctx.meta["partial_store"] = (
        f"{out}.<route>.nc.partial"
        if mode == ROUTES
        else f"{out}.partial"
        if len(comps) == 1
        else f"{out}.<component>.nc.partial"
    )
    ds = patch_sweep(
        model,
        pairs,
        layers=layer_list,
        component=comps if len(comps) > 1 else comps[0],
        positions=positions,
        mode=mode,
        direction=direction,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        remote=remote_value(remote),
        out=out,
        resume=resume,
        progress=sys.stderr.isatty(),
        seed=seed,
        command=shlex.join(["codi-nnsight", *ctx.meta.get("argv", sys.argv[1:])]),
        ablation=ablation,
        force=force,
        workers=workers,
        ray_address=ray_address,
        metrics=user_metrics,
        tokens=None if tokens is None else tokens.split(","),
    )
    click.echo(sweep_summary(ds, out))
    if check and not ds.attrs["sanity_passed"]:
        click.echo(f"error: sanity check failed: {ds.attrs['sanity_details']}", err=True)
        ctx.exit(EXIT_SANITY)


@main.command("early-exit")
@model_options
@pairs_option
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="netCDF file.")
@force_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--past-trained",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also answer after K+1 ... K+N thoughts (more than the model was trained with).",
)
@remote_option
@workers_options
def early_exit_cmd(
    model_spec,
    dtype,
    device,
    normalization,
    pairs_path,
    out,
    force,
    limit,
    batch_size,
    past_trained,
    remote,
    workers,
    ray_address,
) -> None:
    """Answer after 0, 1, ..., K latent thoughts (0: the no-thought baseline; K + N with --past-trained N):
    accuracy and answer log-probability per thought count."""
    from .patching.ablation import early_exit
    from .run import write_results

    prepare_output(out, force)
    check_workers(workers, ray_address, remote)
    pairs = load_cli_pairs(pairs_path, limit)
    model = load_cli_model(model_spec, dtype, device, normalization, remote)
    ds = early_exit(
        model,
        list(pairs),
        batch_size=batch_size,
        remote=remote_value(remote),
        past_trained=past_trained,
        workers=workers,
        ray_address=ray_address,
    )
    write_results(ds, out)
    acc = ds["correct"].mean(("pair", "variant")).values
    click.echo(
        f"wrote {out}: accuracy by number of thoughts "
        + ", ".join(f"{int(k)}: {a:.0%}" for k, a in zip(ds["n_latent"].values, acc))
    )


@main.command("attribute")
@model_options
@pairs_option
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="AtP netCDF file.")
@force_option
@click.option("--layers", default=None, help="e.g. 0-3,7 (default: all).")
@click.option(
    "--component",
    default="resid",
    show_default=True,
    help="resid, attn, mlp, latent or head; a comma list (no head) adds a component dim.",
)
@click.option("--positions", type=click.Choice(["each", "all"]), default="each", show_default=True)
@click.option("--direction", type=click.Choice(_patch_choices()["direction"]), default="denoise", show_default=True)
@click.option(
    "--method",
    type=click.Choice(["atp", "atp*"]),
    default="atp",
    show_default=True,
    help="atp*: also the GradDrop-corrected ranking score (one more forward and backward per layer).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")
@click.option(
    "--verify",
    "verify_n",
    type=click.IntRange(min=1),
    default=None,
    help="Also run the exact sweep on the N layers AtP ranks highest and print the agreement.",
)
@remote_option
@workers_options
@click.pass_context
def attribute(
    ctx,
    model_spec,
    dtype,
    device,
    normalization,
    pairs_path,
    out,
    force,
    layers,
    component,
    positions,
    direction,
    method,
    batch_size,
    limit,
    verify_n,
    remote,
    workers,
    ray_address,
) -> None:
    """Attribution patching: a first-order estimate of every patch from one backward pass."""

    from .analysis.kinds import verification_sentence
    from .patching.attribution import attribution_patching, verification_attrs, verify_top
    from .patching.config import parse_layers
    from .run import write_results
    from .run.executors import use_executor

    comps = [c.strip() for c in component.split(",") if c.strip()]
    if not comps:
        raise UserError(f"--component {component!r}: expected resid, attn, mlp, latent or head (or a comma list)")
    if verify_n is not None and len(comps) > 1:
        raise UserError("--verify checks one component at a time")
    out_path = prepare_output(out, force)
    check_workers(workers, ray_address, remote)
    pairs = load_cli_pairs(pairs_path, limit)
    model = load_cli_model(model_spec, dtype, device, normalization, remote)
    # One executor for AtP and its --verify sweep: with --workers, one Ray cluster, not two.
    with use_executor(workers, ray_address, remote_value(remote)) as executor:
        ds = attribution_patching(
            model,
            pairs,
            component=comps if len(comps) > 1 else comps[0],
            layers=parse_layers(layers, model.n_layers),
            positions=positions,
            direction=direction,
            batch_size=batch_size,
            command=shlex.join(["codi-nnsight", *ctx.meta.get("argv", sys.argv[1:])]),
            remote=remote_value(remote),
            method=method,
            workers=executor,
        )
        if verify_n is not None:  # stored in the Dataset (and so in its report), not only printed
            checked = verify_top(
                model, pairs, ds, verify_n, batch_size=batch_size, remote=remote_value(remote), workers=executor
            )
            ds.attrs.update(verification_attrs(checked))
    write_results(ds, out_path)
    click.echo(f"wrote {out_path}: AtP of {ds.attrs['component']} for {ds.sizes['pair']} pairs")
    if verify_n is not None:
        click.echo(verification_sentence(ds.attrs))


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--metric", default="kl", show_default=True)
def analyze(results: str, metric: str) -> None:
    """Print the per-layer table of a results file."""
    from . import analysis
    from .analysis import kinds

    ds = analysis.load(results)  # every kind of results file (the output contract says which)
    kind = kinds.result_kind(ds, results)
    if kind in ("sweep", "attribution"):
        metric = metric if kind == "sweep" or metric != "kl" else ds.attrs.get("default_metric", "atp_logprob_diff")
        analysis.io.check_metric(ds, metric, results)
    click.echo(kinds.summary(ds, metric))


@main.command()
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder.")
@click.option("--force", is_flag=True, help="Write into a folder that already holds a report.")
@click.option("--metric", default="kl", show_default=True)
@click.option("--top-k", "k", type=click.IntRange(min=1), default=3, show_default=True)
def report(results: str, out: str, force: bool, metric: str, k: int) -> None:
    """Figures, CSV tables and report.md / report.html for a results file."""
    from . import analysis
    from .analysis.report import prepare_report_dir

    # Refuses an earlier report and any other non-empty folder (the user's files) without --force.
    prepare_report_dir(out, force)
    readout = _readout_dataset(results)
    if readout is not None:  # a lens / attention / probe file: its own figures
        from .analysis.readouts import write_readout_report

        click.echo(f"wrote {write_readout_report(readout, out)} (and figures) in {out}")
        return
    ds = analysis.load(results)
    from .analysis import kinds

    if kinds.result_kind(ds, results) in kinds.KIND_REPORTS:
        kind_metric = None if metric == "kl" else metric
        click.echo(f"wrote {kinds.write_kind_report(ds, out, kind_metric)} (and report.html, a figure) in {out}")
        return
    analysis.io.check_metric(ds, metric, results)
    try:
        path = analysis.write_report(ds, out, metric=metric, k=k, force=force)
    except OSError as e:
        raise UserError(f"{out}: cannot write report ({e.strerror or e})") from None
    click.echo(f"wrote {path} (and report.html, figures, tables) in {out}")


def _readout_dataset(path: str) -> Any:
    """The Dataset of a readout file (lens, attention, probe), or None for anything else."""
    import xarray as xr

    from .analysis.readouts import is_readout

    try:
        ds = xr.load_dataset(path, engine="netcdf4")
    except Exception:  # not netCDF: `analysis.load` says what it is
        return None
    return ds if is_readout(ds) else None


# ---------------------------------------------------------------------------------------------
@main.group()
def pairs() -> None:
    """Validate, generate and filter clean/corrupted pairs files."""


@pairs.command("validate")
@click.argument("file", type=click.Path(dir_okay=True))
@model_options
def pairs_validate(file: str, model_spec, dtype, device, normalization) -> None:
    """Check a pairs file; with --model, token lengths and whether the model answers correctly."""
    from .data.pairs import pair_warnings, pairs_summary, validate_pairs

    pairset, problems = validate_pairs(file)
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        click.echo(f"{file}: {len(problems)} problem(s)", err=True)
        sys.exit(EXIT_USAGE)
    for line in pair_warnings(pairset):
        click.echo(f"warning: {line}", err=True)
    click.echo(pairs_summary(pairset))
    if model_spec is not None:
        from .model.inference import check_pairs_with_model

        model = load_cli_model(model_spec, dtype, device, normalization)
        for line in check_pairs_with_model(model, pairset):
            click.echo(line)


@pairs.command("make")
@click.option(
    "--gsm8k",
    "gsm8k_path",
    default=None,
    help="GSM8K-format JSON/JSONL file, or 'hub' for the gsm8k dataset (needs internet).",
)
@click.option(
    "--synthetic",
    "n_synthetic",
    type=click.IntRange(min=1),
    default=None,
    help="Generate N synthetic arithmetic pairs instead.",
)
@click.option(
    "--kind",
    type=click.Choice(["toy", "wide"]),
    default="toy",
    show_default=True,
    help="Synthetic problems: toy = the bundled model's distribution (3-5 steps of its words); "
    "wide = harder, more varied problems.",
)
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@force_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--offsets", default="-1,1", show_default=True, help="Allowed changes to one number.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N pairs.")
@click.option(
    "--explain",
    is_flag=True,
    help="With --gsm8k: print each record's changes tried (and why each was refused) and each pair's "
    "clean and corrupted chain, for audit.",
)
def pairs_make(gsm8k_path, n_synthetic, kind, out, force, seed, offsets, limit, explain) -> None:
    """Make pairs by changing one number and recomputing the answer."""
    try:
        offs = tuple(int(x) for x in offsets.split(","))
    except ValueError:
        raise UserError(f"--offsets {offsets!r}: expected integers like -1,1") from None
    if (gsm8k_path is None) == (n_synthetic is None):
        raise UserError("give exactly one of --gsm8k FILE or --synthetic N")
    if explain and gsm8k_path is None:
        raise UserError("--explain audits pairs made from GSM8K: use it with --gsm8k FILE")
    prepare_output(out, force)
    if n_synthetic is not None:
        from .data.synthetic import make_synthetic_pairs

        pairset = make_synthetic_pairs(n_synthetic, seed=seed, offsets=offs, kind=kind)
        pairset.save(out)
        click.echo(f"wrote {out}: {len(pairset)} synthetic pairs ({kind})")
        return
    from .data.gsm8k import explain_pairs, load_gsm8k_hub, read_gsm8k

    try:
        records = load_gsm8k_hub() if gsm8k_path == "hub" else read_gsm8k(gsm8k_path)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    pairset, reasons, audit = explain_pairs(records, seed=seed, offsets=offs, limit=limit)
    if explain:
        for line in audit:
            click.echo(line)
    if not len(pairset):
        raise UserError(
            f"{gsm8k_path}: no consistent pair could be made "
            f"({', '.join(f'{k}: {v}' for k, v in reasons.most_common())})"
        )
    pairset.save(out)
    rejected = ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) or "none"
    click.echo(f"wrote {out}: {len(pairset)} pairs from {len(records)} records (rejected — {rejected})")


@pairs.command("filter")
@click.argument("file", type=click.Path(dir_okay=False))
@model_options
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@force_option
@click.option(
    "--require-different/--allow-equal",
    default=True,
    show_default=True,
    help="Also drop pairs whose clean and corrupted answers are equal.",
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
def pairs_filter(file, model_spec, dtype, device, normalization, out, force, require_different, max_new_tokens) -> None:
    """Keep pairs the model answers correctly in both variants (writes baseline_correct)."""
    from .data.pairs import load_pairs
    from .model.inference import filter_pairs

    prepare_output(out, force)
    pairset = load_pairs(file)
    model = load_cli_model(model_spec, dtype, device, normalization)
    kept, dropped = filter_pairs(
        model, pairset, require_different=require_different, max_new_tokens=max_new_tokens, progress=sys.stderr.isatty()
    )
    why = ", ".join(f"{k}: {v}" for k, v in dropped.items() if v) or "none"
    if not len(kept):
        raise UserError(
            f"{file}: model {model.name} answers no pair correctly in both variants (dropped — {why}); nothing written"
        )
    kept.save(out)
    click.echo(f"wrote {out}: kept {len(kept)} of {len(pairset)} pairs (dropped — {why})")


# ---------------------------------------------------------------------------------------------
@main.command("make-tiny")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--family", type=click.Choice(_families()), default="llama", show_default=True)
@click.option("--layers", "n_layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--num-latent", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@force_option
@click.option("--method", type=click.Choice(["codi", "coconut"]), default="codi", show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["meta", "hf"]),
    default="meta",
    show_default=True,
    help="Coconut checkpoint format: Meta's torch.save file or Hugging Face-native safetensors.",
)
def make_tiny(
    out: str, family: str, n_layers: int, hidden: int, num_latent: int, seed: int, force: bool, method: str, fmt: str
) -> None:
    """Write a tiny random CODI (or Coconut) model in the official layout (a dry run without downloads)."""
    from .testing.tiny import write_tiny_codi

    # A folder that already holds anything (another model, say) is replaced only with --force.
    if Path(out).is_dir() and any(Path(out).iterdir()) and not force:
        raise UserError(f"{out}: folder exists and is not empty; add --force to overwrite it")
    created = not Path(out).exists()
    try:
        if method == "coconut":
            from .testing.tiny_coconut import write_tiny_coconut

            path = write_tiny_coconut(
                out, family=family, fmt=fmt, n_layers=n_layers, hidden=hidden, num_latent=num_latent, seed=seed
            )
        else:
            path = write_tiny_codi(
                out, family=family, n_layers=n_layers, hidden=hidden, num_latent=num_latent, seed=seed
            )
    except UserError:
        raise
    except Exception as e:  # a full disk surfaces as OSError or as safetensors' own error type
        import shutil

        from .atomic import DiskError, write_failure

        if created:  # half a model is no model: remove what this command made, never a folder it found
            shutil.rmtree(out, ignore_errors=True)
        raise DiskError(f"{out}: cannot write the model ({write_failure(e, Path(out).resolve().parent)})") from None
    click.echo(f"wrote {path}")


@main.command("train-toy")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@force_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--baseline",
    is_flag=True,
    help="Train the no-latent baseline instead (same model and data, answers with no continuous thoughts).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="torch CPU threads of a one-process run (the toy's small matrix products run fastest on one).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="data-parallel training processes, one core and one thread each (default: the shipped "
    "model's, ToyConfig.workers); the model depends on the count only through rounding.",
)
@click.option(
    "--method",
    type=click.Choice(["codi", "coconut"]),
    default="codi",
    show_default=True,
    help="codi: CODI self-distillation (the default toy); coconut: Coconut's stage curriculum (toy-coconut).",
)
def train_toy_cmd(
    out: str, force: bool, seed: int, baseline: bool, threads: int, workers: int | None, method: str
) -> None:
    """Train a bundled toy model from scratch (CPU): the toy CODI, or with --method coconut the toy Coconut."""
    import torch

    from .toy.train import config_class, describe_training, train_toy

    if Path(out).exists() and any(Path(out).iterdir()) and not force:
        raise UserError(f"{out}: folder is not empty; add --force to train into it")
    if baseline and method != "codi":
        raise UserError("--baseline: the no-latent baseline is trained with --method codi (it has no thoughts)")
    shipped = config_class(method)()
    workers = shipped.workers if workers is None else workers
    if shipped.batch_size % workers:
        raise UserError(f"--workers {workers}: the batch of {shipped.batch_size} problems does not split evenly")
    prepare_output(out, force=True, folder=True)
    torch.set_num_threads(threads)
    log = train_toy(out, seed=seed, baseline=baseline, workers=workers, method=method)
    click.echo(f"wrote {out}: {describe_training(log)}")


@main.command("compare")
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder.")
@click.option(
    "--name", "names", multiple=True, help="Label of each result, in order (default: each file's model name)."
)
@click.option("--metric", default="kl", show_default=True, help="Metric whose layer profile is compared.")
@force_option
def compare_cmd(results: tuple[str, ...], out: str, names: tuple[str, ...], metric: str, force: bool) -> None:
    """Put results of several models (or latent methods) on one model axis: one figure, one report.

    RESULTS are results files of one kind made on the same pairs, e.g. `patch` on the toy CODI and
    on the toy Coconut. Writes comparison.nc, figures/profile_<metric>.png, summary.json,
    report.md and report.html into --out.
    """
    from .analysis.compare import compare_models, finding_lines, write_comparison
    from .analysis.stats import unit_words

    ds = compare_models(list(results), names=list(names) or None)  # refusals come before any folder is made
    md = write_comparison(ds, out, metric=metric, force=force)
    summary = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    click.echo(f"wrote {md}: {' '.join(finding_lines(summary, unit_words(ds, metric)))}")


from .readouts.commands import register as _register_readouts  # noqa: E402  (lens, attention, probe)

_register_readouts(main)

from .interventions.commands import register as _register_interventions  # noqa: E402  (transplant, steer, thought-graph)

_register_interventions(main)


def run(prog_name: str | None = None) -> None:
    """Console entry point: `main`, with Ctrl-C during start-up (imports, loading) handled too."""
    try:
        main(prog_name=prog_name)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # pragma: no cover
    run()
