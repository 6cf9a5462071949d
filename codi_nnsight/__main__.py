"""`python -m codi_nnsight` = the `codi-nnsight` command."""

from .cli import run

run(prog_name="codi-nnsight")
