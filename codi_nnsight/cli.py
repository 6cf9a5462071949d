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
import numpy as np

from .errors import UserError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_SANITY = 3


def default_pairs() -> Path:
    """The demo pairs bundled with the package."""
    return Path(__file__).parent / "assets" / "demo_pairs.json"


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
            hint = (f"; finished pairs are kept in {where} — rerun the same command with --resume "
                    f"to continue") if where else ""
            click.echo(f"interrupted{hint}", err=True)
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.version_option(package_name="codi-nnsight")
def main(debug: bool) -> None:
    """Find where a CODI continuous chain-of-thought model reasons, by activation patching."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # library deprecation chatter is not for end users
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _model_options(f: Any) -> Any:
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available).")(f)
    f = click.option("--dtype", default=None,
                     type=click.Choice(["float32", "float64", "bfloat16", "float16"]),
                     help="Default float32 on CPU, bfloat16 on CUDA; float64 for exactness checks.")(f)
    f = click.option("--model", "model_spec", default=None,
                     help="codi.json, a folder holding one, or a preset (default: the bundled toy model).")(f)
    return f


def _load(model_spec: str | None, dtype: str | None, device: str | None) -> Any:
    from .model.wrapper import load_model

    return load_model(model_spec, dtype=dtype, device=device)


def _remote_value(remote: str | None) -> bool | str:
    if remote is None:
        return False
    if remote == "ndif":
        return True
    return remote


# ---------------------------------------------------------------------------------------------
@main.command()
@_model_options
@click.option("--pairs", "pairs_path", type=click.Path(dir_okay=False), default=None,
              help="Pairs file (default: the bundled demo pairs).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write answers as JSON.")
@click.option("--remote", default=None, help="local | ndif | URL of an NDIF host.")
def evaluate(model_spec, dtype, device, pairs_path, limit, max_new_tokens, batch_size, out, remote) -> None:
    """Greedy answers and accuracy for the clean and corrupted questions."""
    from .data.pairs import load_pairs
    from .model.inference import accuracy_summary, evaluate_pairs

    pairs = load_pairs(pairs_path or default_pairs()).limit(limit)
    model = _load(model_spec, dtype, device)
    answers = evaluate_pairs(model, pairs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=sys.stderr.isatty(), remote=_remote_value(remote))
    acc = accuracy_summary(answers)
    if out:
        _write_json(Path(out), [a.to_record() for a in answers])
    click.echo(f"model {model.name}: {len(pairs)} pairs — accuracy clean {acc['clean']:.1%}, "
               f"corrupted {acc['corrupted']:.1%}, both {acc['both']:.1%}")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------
@main.command()
@_model_options
@click.option("--pairs", "pairs_path", type=click.Path(dir_okay=False), default=None,
              help="Pairs file (default: the bundled demo pairs).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Results netCDF file.")
@click.option("--layers", default=None, help="e.g. 0-3,7 (default: all).")
@click.option("--positions", type=click.Choice(["all", "each"]), default="all", show_default=True)
@click.option("--component", default="resid", show_default=True,
              help="resid, attn, mlp or latent; a comma list (resid,attn,mlp) adds a component dim.")
@click.option("--mode", type=click.Choice(["recurrent", "frozen"]), default="recurrent", show_default=True)
@click.option("--direction", type=click.Choice(["denoise", "noise"]), default="denoise", show_default=True)
@click.option("--batch-size", default="auto", show_default=True, help="Pairs per trace, or auto.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N pairs.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same configuration.")
@click.option("--check", is_flag=True, help="Exit 3 if a sanity check fails (results are still written).")
@click.option("--remote", default=None, help="local | ndif | URL of an NDIF host.")
@click.pass_context
def patch(ctx, model_spec, dtype, device, pairs_path, out, layers, positions, component, mode, direction,
          batch_size, limit, max_new_tokens, seed, resume, check, remote) -> None:
    """Patch source activations into target runs at the CoT positions, layer by layer."""
    from .data.pairs import load_pairs
    from .patching.sweep import patch_sweep
    from .patching.trace import parse_layers

    if batch_size != "auto":
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise UserError(f"--batch-size {batch_size!r}: expected a number or auto") from None
    pairs = load_pairs(pairs_path or default_pairs()).limit(limit)
    model = _load(model_spec, dtype, device)
    layer_list = parse_layers(layers, model.n_layers)
    comps = [c.strip() for c in component.split(",") if c.strip()]
    ctx.meta["partial_store"] = (f"{out}.partial" if len(comps) == 1
                                 else f"{out}.<component>.nc.partial")
    ds = patch_sweep(model, pairs, layers=layer_list, component=comps if len(comps) > 1 else comps[0],
                     positions=positions, mode=mode, direction=direction, batch_size=batch_size,
                     max_new_tokens=max_new_tokens,
                     remote=_remote_value(remote), out=out, resume=resume, progress=sys.stderr.isatty(),
                     seed=seed, command=shlex.join(["codi-nnsight", *ctx.meta.get("argv", sys.argv[1:])]))
    best = ds["kl"].mean("pair")
    for dim in [d for d in best.dims if d != "layer"]:
        best = best.max(dim)
    layer = int(ds["layer"].values[int(np.nanargmax(best.values))])
    flipped = float(ds["flipped"].mean("pair").max())
    status = "passed" if ds.attrs["sanity_passed"] else "FAILED"
    click.echo(f"wrote {out}: {ds.sizes['pair']} pairs x {ds.sizes['layer']} layers; "
               f"largest mean KL at layer {layer} ({float(best.max()):.4g} nats); "
               f"most pairs flipped: {flipped:.0%}; sanity checks {status}")
    if check and not ds.attrs["sanity_passed"]:
        click.echo(f"error: sanity check failed: {ds.attrs['sanity_details']}", err=True)
        ctx.exit(EXIT_SANITY)


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--metric", default="kl", show_default=True)
def analyze(results: str, metric: str) -> None:
    """Print the per-layer table of a results file."""
    from . import analysis

    ds = analysis.load(results)
    if metric not in ds:
        raise UserError(f"{results}: no metric {metric!r} (have {', '.join(sorted(ds.data_vars))})")
    click.echo(analysis.format_layer_table(ds, metric))


@main.command()
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder.")
@click.option("--metric", default="kl", show_default=True)
@click.option("--top-k", "k", type=click.IntRange(min=1), default=3, show_default=True)
def report(results: str, out: str, metric: str, k: int) -> None:
    """Figures, CSV tables and report.md / report.html for a results file."""
    from . import analysis

    ds = analysis.load(results)
    if metric not in ds:
        raise UserError(f"{results}: no metric {metric!r} (have {', '.join(sorted(ds.data_vars))})")
    try:
        path = analysis.write_report(ds, out, metric=metric, k=k)
    except OSError as e:
        raise UserError(f"{out}: cannot write report ({e.strerror or e})") from None
    click.echo(f"wrote {path} (and report.html, figures, tables) in {out}")


# ---------------------------------------------------------------------------------------------
@main.group()
def pairs() -> None:
    """Validate, generate and filter clean/corrupted pairs files."""


@pairs.command("validate")
@click.argument("file", type=click.Path(dir_okay=True))
@_model_options
def pairs_validate(file: str, model_spec, dtype, device) -> None:
    """Check a pairs file; with --model, token lengths and whether the model answers correctly."""
    from .data.pairs import pairs_summary, validate_pairs

    pairset, problems = validate_pairs(file)
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        click.echo(f"{file}: {len(problems)} problem(s)", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(pairs_summary(pairset))
    if model_spec is not None:
        from .model.inference import evaluate_pairs

        model = _load(model_spec, dtype, device)
        diffs = [len(model.encode_question(p.clean.question)) - len(model.encode_question(p.corrupted.question))
                 for p in pairset]
        equal = sum(d == 0 for d in diffs)
        click.echo(f"token length clean - corrupted: equal for {equal}/{len(diffs)} pairs, "
                   f"range {min(diffs)}..{max(diffs)}")
        answers = evaluate_pairs(model, pairset, max_new_tokens=32)
        by = {(a.pair_id, a.variant): a.correct for a in answers}
        both = sum(by[(p.pair_id, "clean")] and by[(p.pair_id, "corrupted")] for p in pairset)
        click.echo(f"model {model.name} answers correctly: clean "
                   f"{sum(by[(p.pair_id, 'clean')] for p in pairset)}/{len(pairset)}, corrupted "
                   f"{sum(by[(p.pair_id, 'corrupted')] for p in pairset)}/{len(pairset)}, both {both}")


@pairs.command("make")
@click.option("--gsm8k", "gsm8k_path", default=None,
              help="GSM8K-format JSON/JSONL file, or 'hub' for the gsm8k dataset (needs internet).")
@click.option("--synthetic", "n_synthetic", type=click.IntRange(min=1), default=None,
              help="Generate N synthetic arithmetic pairs instead.")
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--offsets", default="-1,1", show_default=True, help="Allowed changes to one number.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N pairs.")
def pairs_make(gsm8k_path, n_synthetic, out, seed, offsets, limit) -> None:
    """Make pairs by changing one number and recomputing the answer."""
    try:
        offs = tuple(int(x) for x in offsets.split(","))
    except ValueError:
        raise UserError(f"--offsets {offsets!r}: expected integers like -1,1") from None
    if (gsm8k_path is None) == (n_synthetic is None):
        raise UserError("give exactly one of --gsm8k FILE or --synthetic N")
    if n_synthetic is not None:
        from .data.synthetic import make_synthetic_pairs

        pairset = make_synthetic_pairs(n_synthetic, seed=seed, offsets=offs)
        pairset.save(out)
        click.echo(f"wrote {out}: {len(pairset)} synthetic pairs")
        return
    from .data.gsm8k import load_gsm8k_hub, make_pairs, read_gsm8k

    try:
        records = load_gsm8k_hub() if gsm8k_path == "hub" else read_gsm8k(gsm8k_path)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    pairset, reasons = make_pairs(records, seed=seed, offsets=offs, limit=limit)
    if not len(pairset):
        raise UserError(f"{gsm8k_path}: no consistent pair could be made "
                        f"({', '.join(f'{k}: {v}' for k, v in reasons.most_common())})")
    pairset.save(out)
    rejected = ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) or "none"
    click.echo(f"wrote {out}: {len(pairset)} pairs from {len(records)} records (rejected — {rejected})")


@pairs.command("filter")
@click.argument("file", type=click.Path(dir_okay=False))
@_model_options
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@click.option("--require-different/--allow-equal", default=True, show_default=True,
              help="Also drop pairs whose clean and corrupted answers are equal.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
def pairs_filter(file, model_spec, dtype, device, out, require_different, max_new_tokens) -> None:
    """Keep pairs the model answers correctly in both variants (writes baseline_correct)."""
    from .data.pairs import Pair, PairSet, Question, load_pairs
    from .model.inference import evaluate_pairs

    pairset = load_pairs(file)
    model = _load(model_spec, dtype, device)
    answers = evaluate_pairs(model, pairset, max_new_tokens=max_new_tokens, progress=sys.stderr.isatty())
    by = {(a.pair_id, a.variant): a.correct for a in answers}
    kept = []
    for p in pairset:
        ok = by[(p.pair_id, "clean")] and by[(p.pair_id, "corrupted")]
        if require_different and p.clean.answer == p.corrupted.answer:
            ok = False
        if ok:
            kept.append(Pair(p.pair_id, *(Question(q.question, q.answer,
                                                   {**q.meta, "baseline_correct": by[(p.pair_id, v)]})
                                          for v, q in (("clean", p.clean), ("corrupted", p.corrupted)))))
    PairSet.from_pairs(kept).save(out)
    click.echo(f"wrote {out}: kept {len(kept)} of {len(pairset)} pairs (both variants answered correctly"
               f"{', answers differ' if require_different else ''})")


# ---------------------------------------------------------------------------------------------
@main.command("make-tiny")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--family", type=click.Choice(["gpt2", "llama"]), default="llama", show_default=True)
@click.option("--layers", "n_layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--num-latent", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def make_tiny(out: str, family: str, n_layers: int, hidden: int, num_latent: int, seed: int) -> None:
    """Write a tiny random CODI model in the official layout (a dry run without downloads)."""
    from .testing.tiny import write_tiny_codi

    path = write_tiny_codi(out, family=family, n_layers=n_layers, hidden=hidden, num_latent=num_latent,
                           seed=seed)
    click.echo(f"wrote {path}")


@main.command("train-toy")
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
def train_toy_cmd(out: str, seed: int) -> None:
    """Train the bundled toy CODI model from scratch (CPU)."""
    from .toy.train import train_toy

    info = train_toy(out, seed=seed)
    click.echo(f"wrote {out}: {json.dumps(info.get('final', info), default=str)[:300]}")


if __name__ == "__main__":  # pragma: no cover
    main()
