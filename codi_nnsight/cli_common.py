"""Options and helpers every `codi-nnsight` command shares (the main CLI and the readout commands).

Its own module so that `cli` and `readouts.commands` both import it and neither imports the other.
Imports of torch and the model happen inside the functions, so `--help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .errors import UserError


def default_pairs() -> Path:
    """The demo pairs bundled with the package."""
    return Path(__file__).parent / "assets" / "demo_pairs.json"


def model_options(f: Any) -> Any:
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available).")(f)
    f = click.option(
        "--dtype",
        default=None,
        type=click.Choice(["float32", "float64", "bfloat16", "float16"]),
        help="Default float32 on CPU, bfloat16 on CUDA; float64 for exactness checks.",
    )(f)
    f = click.option(
        "--model",
        "model_spec",
        default=None,
        help="codi.json, a folder holding one, or a preset (default: the bundled toy model).",
    )(f)
    f = click.option(
        "--question-normalization",
        "normalization",
        default="official",
        show_default=True,
        type=click.Choice(["official", "none"]),
        help="official: question.strip().replace('  ', ' ') as the official CODI evaluation; none: as written.",
    )(f)
    return f


def load_cli_model(
    model_spec: str | None,
    dtype: str | None,
    device: str | None,
    normalization: str = "official",
    remote: str | None = None,
) -> Any:
    from .model.wrapper import load_model

    # A real server holds the weights: read none here (`--remote local` runs here and needs them).
    remote_only = remote_value(remote) not in (False, "local")
    return load_model(
        model_spec, dtype=dtype, device=device, question_normalization=normalization, remote_only=remote_only
    )


def load_cli_pairs(pairs_path: str | None, limit: int | None = None) -> Any:
    """`--pairs` (default: the bundled demo pairs), cut to `--limit`."""
    from .data.pairs import load_pairs

    return load_pairs(pairs_path or default_pairs()).limit(limit)


def check_pairs_source(pairs_path: str | None, n_synthetic: int | None) -> None:
    """`--pairs FILE` and `--synthetic N` together: refused in one line (call before any output is made)."""
    if n_synthetic is not None and pairs_path is not None:
        raise UserError("give --pairs FILE or --synthetic N, not both")


def pairs_or_synthetic(
    pairs_path: str | None, n_synthetic: int | None, data_seed: int, limit: int | None, default_n: int | None = None
) -> Any:
    """`--pairs FILE`, or `--synthetic N` generated toy pairs (`default_n` of them when neither is given);
    both at once is refused in one line."""
    check_pairs_source(pairs_path, n_synthetic)
    n = n_synthetic if n_synthetic is not None else (default_n if pairs_path is None else None)
    if n is None:
        return load_cli_pairs(pairs_path, limit)
    from .data.synthetic import make_toy_pairs

    return make_toy_pairs(n, seed=data_seed).limit(limit)


def number_list(text: str | None, what: str, kind: type = float) -> list[Any] | None:
    """A comma list of numbers of `kind` (None stays None); a one-line error naming the flag otherwise."""
    if text is None:
        return None
    word, example = ("integer", "0,1,2") if kind is int else ("number", "-1,0,0.5")
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r}: expected {word}s like {example}") from None
    if not values:
        raise UserError(f"{what} {text!r}: expected at least one {word}")
    return values


def pairs_option(f: Any) -> Any:
    return click.option(
        "--pairs",
        "pairs_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Pairs file (default: the bundled demo pairs).",
    )(f)


def remote_option(f: Any) -> Any:
    return click.option("--remote", default=None, help="local | ndif | URL of an NDIF host.")(f)


def workers_options(f: Any) -> Any:
    """`--workers N` and `--ray-address ADDR`: shard a command's batches over Ray workers."""
    f = click.option(
        "--ray-address",
        default=None,
        help="Run the workers on this existing Ray cluster (host:port, ray://host:10001 or auto) "
        "instead of a local one started for the run.",
    )(f)
    f = click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Shard the batches over N Ray workers, each loading the model once on one torch thread "
        '(on GPUs: one per GPU). Needs the ray extra: pip install -e ".[ray]". Same results as one '
        "process on one thread; --resume works with any number.",
    )(f)
    return f


def check_workers(workers: int | None, ray_address: str | None, remote: str | None) -> None:
    """Refuse `--workers` / `--ray-address` that cannot run (Ray missing, a remote backend) before
    the model is loaded."""
    from .run.executors import check_executor

    check_executor(workers, ray_address, remote_value(remote))


def force_option(f: Any) -> Any:
    return click.option("--force", is_flag=True, help="Overwrite an existing output.")(f)


def prepare_output(path: str, force: bool, folder: bool = False) -> Path:
    """Check an output location before any work: refuse to overwrite without --force, create its folder.

    Returns the path. A missing parent folder is created (every command does the same), and a
    folder that cannot be written is reported now, not after minutes of work.
    """
    if not str(path).strip():
        raise UserError("--out: empty path")
    out = Path(path)
    if out.exists() and not force:
        kind = "folder" if out.is_dir() else "file"
        raise UserError(f"{out}: {kind} exists; add --force to overwrite it")
    if out.exists() and out.is_dir() != folder:
        raise UserError(
            f"{out}: exists and is {'a file' if folder else 'a folder'}, expected a {'folder' if folder else 'file'}"
        )
    from .atomic import ensure_writable

    ensure_writable(out if folder else out.parent)
    return out


def remote_value(remote: str | None) -> bool | str:
    if remote is None:
        return False
    if remote == "ndif":
        return True
    return remote
